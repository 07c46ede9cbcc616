"""The run directory and the data a run keeps: what every training run does before its first step.

A run directory (`--out`) holds one run: its checkpoint (tinyllm/checkpoint.py) and its metrics
file (tinyllm/train.py). One run writes to it at a time (an exclusive lock held for the whole
run), and a run starts by removing what an interrupted save left behind. A new run starts only
in a new or empty directory, or one holding just what a failed first save left: any other
directory without a config.json may hold the user's files, and only --force, which removes
the files a run writes and nothing else (`is_run_file`), starts a run there. Every check that can
refuse the run (`check_out_path`, `prepare_out_dir`) comes before any work, and the directory is
created or emptied (`start_out_dir`) only once the data has been read and checked, so a bad flag
never costs an existing run its files. `starting_state` is the state the loop starts from:
fresh weights, or the checkpoint's when resuming.

The data a run keeps: a run records the name or absolute path of its data and the text's sha256,
so that --resume reads the same text again (`run_corpus`) and refuses a text that has changed.
A resumed run must also agree with the run it continues on its total of steps and its number of
MPI processes (`check_resumed_total`, `check_same_ranks`).

tinyllm/pretrain.py, the fine-tuning runs and the seq2seq run all start this way; the loop they
then hand the state to is tinyllm/train.py, which imports nothing from here. The memory checks
(`train.check_memory`) stay in train.py: their estimate follows how the loop runs a step and an
evaluation, and must change when that does.
"""

import hashlib
import os
import stat
import tempfile

import numpy as onp

try:
    import fcntl  # POSIX; on Windows runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

from .checkpoint import TEMP_FILE, is_run_file, remove_file, remove_leftovers, stored_ranks
from .data import DEFAULT_CORPUS, EMBEDDED_CORPORA, load_corpus, read_text_file
from .errors import TinyLLMError
from .fileio import TMP_PREFIX
from .optim import adamw_init
from .train import Committed, logged_eval_iter, read_metrics_counted, truncate_metrics


# ----------------------------------------------------------------------------- the run directory


_LOCKS = {}  # (device, inode) of a run directory -> the open descriptor that holds its lock


def lock_run_dir(out_dir):
    """Take an exclusive lock on the run directory, held until the run ends (or the process).

    A second writer, in this process or another, is refused at once. The lock is on the
    directory itself (flock), so it leaves no file behind and dies with the process.
    """
    if fcntl is None:  # pragma: no cover
        return
    fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    if key in _LOCKS:
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TinyLLMError(f"another tinyllm run is writing to {out_dir}: wait for it to finish,"
                           " or choose another --out") from None
    _LOCKS[key] = fd


def unlock_run_dir(out_dir):
    """Release the lock lock_run_dir took (a no-op if this process does not hold it)."""
    try:
        info = os.stat(out_dir)
    except OSError:
        return
    fd = _LOCKS.pop((info.st_dev, info.st_ino), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def check_out_path(out_dir):
    """One-line errors for an --out that cannot be a run directory, before any work is done."""
    if not out_dir:
        raise TinyLLMError("--out must not be empty")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        kind = "FIFO" if stat.S_ISFIFO(os.stat(out_dir).st_mode) else "file, not a directory"
        raise TinyLLMError(f"--out {out_dir!r} is a {kind}")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TinyLLMError(f"--out {out_dir!r} cannot be created: {existing!r} is a file")
    try:  # a real probe: os.access says yes to root on a directory it still cannot write
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise TinyLLMError(f"--out {out_dir!r} is not writable ({existing}: {err.strerror})") from None


def _check_existing_run(out_dir, resume, force):
    has_run = os.path.lexists(os.path.join(out_dir, "config.json"))
    if resume and not has_run:
        raise TinyLLMError(f"--resume: no checkpoint in {out_dir!r} to resume")
    if has_run and not resume and not force:
        raise TinyLLMError(
            f"--out {out_dir!r} already holds a run: pass --resume to continue it or --force to"
            " start over (which replaces it)"
        )
    if not has_run and not force and first_save_leftovers(out_dir) is None:
        raise TinyLLMError(
            f"--out {out_dir!r} is not empty and holds no tinyllm run (no config.json): choose a"
            " new or empty directory, or pass --force to start the run there (it removes the"
            " files a run writes, such as metrics.jsonl, tokenizer.json and model-*.npz, and"
            " nothing else)"
        )


def prepare_out_dir(out_dir, resume, force):
    """Check --out before any work: a usable path, and no run replaced by mistake. If the
    directory exists, lock it and remove what an interrupted save left (see start_out_dir)."""
    check_out_path(out_dir)
    if os.path.isdir(out_dir):
        lock_run_dir(out_dir)
        _check_existing_run(out_dir, resume, force)
        remove_leftovers(out_dir)
    elif resume:
        raise TinyLLMError(f"--resume: no checkpoint in {out_dir!r} to resume")


def start_out_dir(out_dir, resume, force):
    """Create out_dir, lock it, and start the run afresh: with --force, remove the files a run
    writes; else clear what a failed first save left (`first_save_leftovers`). Called only once
    the data has been checked, so a bad --data or --block-size never costs a run its files."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise TinyLLMError(f"cannot create --out {out_dir!r}: {err.strerror}") from None
    lock_run_dir(out_dir)
    _check_existing_run(out_dir, resume, force)  # again: another run may have finished meanwhile
    if force and not resume:
        # config.json first: it commits the run, so a crash midway leaves no run half-removed
        names = sorted(filter(is_run_file, os.listdir(out_dir)), key=lambda n: n != "config.json")
    elif not resume:
        names = first_save_leftovers(out_dir) or []  # checked above: all of out_dir
    else:
        names = []
    for name in names:
        remove_file(os.path.join(out_dir, name))
    remove_leftovers(out_dir)


# What the first save of a run writes, in this order, before config.json commits it
# (save_checkpoint's step 1); train.py appends the evaluation's metrics.jsonl line before it.
FIRST_SAVE_FILES = ("model-000000.npz", "optim-000000.npz", "tokenizer.json")
FIRST_METRICS_MAX_BYTES = 1 << 16  # a few lines of iteration 0, each about 150 bytes


def first_save_leftovers(out_dir):
    """The entries of out_dir, a directory with no config.json, if every one of them is what
    a first save that was killed or failed (a full disk) can leave; else None.

    That is: metrics.jsonl holding only records of iteration 0, then a prefix of
    FIRST_SAVE_FILES in their write order, and temporary files of those or of config.json, all
    plain files. Removing them is safe: they hold nothing but a step-0 checkpoint that never
    committed and its one evaluation, which the new run writes again. Anything else (the
    user's tokenizer.json alone, a metrics.jsonl of other steps, a model-000001.npz) makes the
    directory someone else's. A missing out_dir has no entries ([]).
    """
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    present = [name for name in FIRST_SAVE_FILES if name in names]
    if present != list(FIRST_SAVE_FILES[:len(present)]):
        return None
    for name in names:
        path = os.path.join(out_dir, name)
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        temp = TEMP_FILE.fullmatch(name)
        if name in FIRST_SAVE_FILES or (temp is not None and temp.group(1) in (
                None, "config.json", *FIRST_SAVE_FILES)):
            continue
        if name != "metrics.jsonl" or not _only_first_evaluation(out_dir):
            return None
    return names


def _only_first_evaluation(out_dir):
    """Does out_dir/metrics.jsonl hold only records of iteration 0 (or nothing), every line a
    record? A larger file than a few such lines is not read at all."""
    if os.lstat(os.path.join(out_dir, "metrics.jsonl")).st_size > FIRST_METRICS_MAX_BYTES:
        return False
    try:
        records, skipped = read_metrics_counted(out_dir)
    except TinyLLMError:
        return False
    return not skipped and all(r["iter"] == 0 for r in records)


def starting_state(out_dir, tc, init_fn, ckpt=None, log=print):
    """The state a run starts from: the checkpoint's when resuming (its later metrics dropped),
    else fresh parameters `init_fn(rng)` from a Generator seeded by tc.seed and fresh AdamW."""
    if ckpt is not None:
        kept = truncate_metrics(out_dir, ckpt.iter, log)
        log(f"resuming {out_dir} at iteration {ckpt.iter} of {tc.max_iters}")
        return Committed(ckpt.params, ckpt.opt_state, ckpt.rng_state, ckpt.iter,
                         logged_eval_iter(ckpt.meta, kept), on_disk=True)
    rng = onp.random.default_rng(tc.seed)
    params = init_fn(rng)
    return Committed(params, adamw_init(params), rng.bit_generator.state, 0, -1)


# ----------------------------------------------------------------------------- the data a run keeps


BYTE_ORDER_MARK = "\ufeff"  # dropped by read_text_file; kept in the text of runs made earlier


def text_fingerprint(text):
    """The sha256 of the corpus (hex), stored in the checkpoint so --resume can check the data."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_fingerprint(stored, text):
    """Does `text` have the stored fingerprint? Version-1 runs stored the first 16 hex digits."""
    full = text_fingerprint(text)
    return isinstance(stored, str) and len(stored) in (16, 64) and full.startswith(stored)


def stored_data_name(data, embedded=EMBEDDED_CORPORA, default=DEFAULT_CORPUS):
    """What a run records as its data: an embedded data set's name (`default` when None), or the
    file's absolute path, so that --resume does not depend on the working directory.

    `embedded` holds the names the run's loader knows (pretraining corpora by default; the
    seq2seq run passes its tasks). Example: None -> "python-docs", "pydoc" -> "pydoc",
    "my.txt" -> "/home/me/my.txt".
    """
    if data is None:
        return default
    if data in embedded and not os.path.exists(data):
        return data
    return os.path.abspath(data)


def run_corpus(meta, run_dir, data=None, way_out="--resume --data FILE"):
    """The text a run was trained on, read again and returned only if its sha256 matches.

    The path comes from the run directory, so it is untrusted: it is read as a regular file of
    bounded size (never a FIFO), and nothing of it is used or shown before the hash matches.
    `data`, a path the user gives (`--resume --data FILE`), reads the same text from a new
    place instead: a file that was moved, or a pipe (`--data <(zcat corpus.gz)`) read again.
    `way_out` is how the caller's command is given the text instead, which the errors name
    (`tinyllm fewshot` has no --resume; it passes "--icl-data FILE").
    """
    from_run = data is None
    if from_run:
        data = meta.get("data") or "pydoc"  # runs made before the default had a stored name
    if not from_run or data in EMBEDDED_CORPORA:
        text = load_corpus(data)
    else:
        check_still_there(data, run_dir, way_out=way_out)  # and a regular file: a pipe was read once
        text = read_stored_text(data, run_dir, way_out)
    if same_fingerprint(meta.get("data_sha256"), BYTE_ORDER_MARK + text):
        return BYTE_ORDER_MARK + text  # a run made before 2026-12-01 trained on a file's mark too
    if not same_fingerprint(meta.get("data_sha256"), text):
        hint = f"; if its text is elsewhere now, give it with {way_out}" if from_run else ""
        raise TinyLLMError(f"the data {data!r} of the run in {run_dir} has changed since the run"
                           f" began (its sha256 differs){hint}")
    return text


def read_stored_text(path, run_dir, way_out):
    """read_text_file of a path the run directory names, with one generic error: read_text_file's
    own (the line, byte and character that are not UTF-8, say) would show a file the run may
    only name, such as another user's, before its hash says it is the run's data."""
    try:
        return read_text_file(path, allow_pipe=False)
    except TinyLLMError:
        raise TinyLLMError(f"the data file {path!r} of the run in {run_dir} cannot be read as the"
                           f" text the run was trained on: if that text is elsewhere now, give"
                           f" it with {way_out}") from None


def check_still_there(path, run_dir, flag="--data", way_out=None):
    """A data file a run stored, which --resume reads again, must still be where it was, and be
    a regular file (a pipe, `--data /dev/stdin` or `<(zcat ...)`, was read once); if not, the
    error names `way_out`, how the command is given its text now (`--resume FLAG FILE` by
    default)."""
    way_out = way_out or f"--resume {flag} FILE"
    if not os.path.exists(path):
        raise TinyLLMError(f"the {flag} file {path!r} of the run in {run_dir} is gone (moved or"
                           f" renamed?): give it again with {way_out}")
    if not stat.S_ISREG(os.stat(path).st_mode):  # stat opens nothing: a FIFO cannot block it
        raise TinyLLMError(f"the {flag} file {path!r} of the run in {run_dir} is not a regular"
                           f" file (a pipe, read once?): give its text again with {way_out}")


# ----------------------------------------------------------------------------- resuming


def check_resumed_total(max_iters, done, out_dir):
    """--max-iters given with --resume is the run's new total, so it must not be below the steps
    the run has already done (that would train nothing and report the run as if it had)."""
    if max_iters is not None and max_iters < done:
        raise TinyLLMError(f"--max-iters {max_iters} is below the {done} steps the run in"
                           f" {out_dir!r} has already done: give a larger total, or leave it out")


def check_same_ranks(meta, ranks, out_dir):
    """--resume needs the number of processes the run was trained with: each step's batches
    depend on it (see tinyllm/distributed.py)."""
    stored = stored_ranks(meta, out_dir)
    if stored != ranks:
        how = f"mpirun -n {stored} tinyllm ..." if stored > 1 else "one process (no mpirun)"
        raise TinyLLMError(f"--resume: the run in {out_dir} was trained on {stored} process(es)"
                           f" and this job has {ranks}: resume it with {how}")
