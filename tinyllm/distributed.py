"""Data-parallel training over MPI: N processes train one model, each on its own micro-batches.

    mpirun -n 2 tinyllm pretrain --batch-size 12 ...   # same losses as: --batch-size 12 --grad-accum 2

A step on N ranks (processes), each doing K = --grad-accum micro-batches of B sequences:
1. every rank computes the gradients of its K micro-batches and sums them into one flat float32
   buffer (the gradients of every parameter end to end, then the summed loss);
2. one `Allreduce` (sum) over that buffer; every rank divides it by N K, the mean gradient of
   the N K B sequences of the step;
3. every rank clips and applies the same AdamW step to the same weights, so the weights stay
   identical without ever being sent. A cheap check (a CRC32 of the weights, gathered from every
   rank) runs at each evaluation and stops the job with a clear message if they ever differ.

The seed layout. Micro-batch j of a step (j = 0 .. N K - 1; rank r does j = r K .. r K + K - 1)
draws its batch and its dropout masks from one Generator: j = 0 from the run's own stream (seeded
by --seed, saved in the checkpoint), exactly as a run without accumulation draws every batch;
j >= 1 from a Generator seeded afresh by (MICRO_BATCH_TAG, seed, step, j). So micro-batch j is
the same whether one process draws it (--grad-accum N) or rank j does (mpirun -n N), and N = 1
with K = 1 is today's run, bit for bit. Evaluation batches are drawn by every rank from the
same evaluation Generator; each rank evaluates its share and the sums are reduced.

What each step sends. A ring all-reduce moves about 2 (N - 1) / N times the buffer per rank:
for P parameters, 4 P bytes out and 4 P in, twice (reduce-scatter, then all-gather). It pays
when a step's compute dwarfs that: on one machine the copy is a memcpy; across machines at
1 Gbit/s, 2 x 4 P bytes for the default 1.1M-parameter model is 8.8 MB, about 70 ms a step.

Only rank 0 prints, writes metrics and checkpoints; the other ranks send their stdout and
stderr to /dev/null (a dying rank still gets its one line out, see `abort_on_error`). In
pretraining rank 0 reads the data and the run directory and broadcasts what the others need
(`from_root`), so --out is rank 0's by construction; fine-tuning, whose code writes as it goes,
runs the other ranks in scratch copies of the run directory (`rank_run_dir`). Ctrl-C on mpirun
reaches every rank; only rank 0 acts on it (it saves, then aborts the job).

Errors: an error every rank meets at the same point (a bad flag, a bad --out or data file,
weights that differ, a step that diverges) ends every rank in order, with rank 0's one line; an
error only one rank meets (a crash, a full disk on rank 0) ends the whole job with MPI_Abort
after its one line, so no rank is left waiting in an all-reduce for a rank that is gone.

mpi4py is imported only when the job was launched by an MPI launcher with more than one
process (its environment says so); a plain `tinyllm pretrain` never imports it.
"""

import contextlib
import functools
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib

import numpy as onp

from .errors import TinyLLMError
from .fileio import open_regular, read_fd
from .tree import flatten

MICRO_BATCH_TAG = 0x6D696372  # "micr": keeps micro-batch seeds apart from evaluation seeds
# Environment variables in which MPI launchers give the job's size and this process's rank:
# MPICH and Intel MPI (Hydra: PMI_*), Open MPI (OMPI_COMM_WORLD_*).
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
INSTALL_HINT = "pip install mpi4py mpich"  # the mpi extra, named so (see plot.INSTALL_HINT)
AGREE_SECONDS = 20.0  # how long ranks that fail before training wait for each other (a bad flag
# or a bad data file fails on every rank within moments; a failure only one rank has then aborts)
STEP_AGREE_SECONDS = 3.0  # the same in training, where each step's all-reduce keeps the ranks
# within milliseconds of each other (a step that diverges fails on every rank at once)
ABORT_PAUSE = 0.5  # seconds between a failing rank's one line and MPI_Abort (see `abort`)


class AllRanksError(TinyLLMError):
    """An error every rank raises at the same point: rank 0 reports it, the others exit quietly."""


# ----------------------------------------------------------------------------- the seed layout


def micro_batch_rng(run_rng, seed, step, j):
    """The Generator that draws micro-batch j of `step` (see the module docstring).

    Example: j = 0 -> the run's own stream `run_rng`; j = 1, seed 5, step 3 ->
    default_rng([MICRO_BATCH_TAG, 5, 3, 1]), the same on whichever rank draws it.
    """
    if j == 0:
        return run_rng
    return onp.random.default_rng([MICRO_BATCH_TAG, seed, step, j])


def rank_micro_batches(rank, grad_accum):
    """The micro-batch indices rank `rank` does in each step: rank 1, K = 2 -> range(2, 4)."""
    return range(rank * grad_accum, (rank + 1) * grad_accum)


# ----------------------------------------------------------------------------- one flat buffer


def pack(grads, loss, like):
    """Gradients and a loss -> one flat float32 buffer, the loss last; the arrays in the order of
    the parameter tree `like` (whatever order the gradient tree was built in).

    Example: grads {"b": [3], "a": [[1, 2]]}, loss 0.5, like {"a": .., "b": ..} -> [1, 2, 3, 0.5].
    """
    flat = flatten(grads)
    parts = [onp.ravel(flat[key]).astype(onp.float32, copy=False) for key in flatten(like)]
    return onp.concatenate(parts + [onp.array([loss], dtype=onp.float32)])  # (P + 1,)


def unpack(buffer, like):
    """The inverse of pack: buffer -> ({path: array shaped as in `like`}, loss). The arrays are
    views of the buffer, in the dtype of `like`'s arrays."""
    grads, start = {}, 0
    for key, ref in flatten(like).items():
        size = onp.size(ref)
        part = buffer[start:start + size].reshape(onp.shape(ref))
        grads[key] = part if part.dtype == ref.dtype else part.astype(ref.dtype)
        start += size
    return grads, float(buffer[start])


def weights_digest(params):
    """A CRC32 of every weight's bytes, in path order: equal weights give equal digests."""
    digest = 0
    for key, array in flatten(params).items():
        digest = zlib.crc32(key.encode("utf-8"), digest)
        digest = zlib.crc32(onp.ascontiguousarray(array).tobytes(), digest)
    return digest


# ----------------------------------------------------------------------------- the process group


class SingleProcess:
    """The group of one process: every collective operation is the identity."""

    rank, size, is_root = 0, 1, True

    def allreduce_sum(self, buffer):
        """Sum of `buffer` over all ranks, in place: with one rank, the buffer itself."""
        return buffer

    def sum_floats(self, *values):
        """The sums over all ranks of a few numbers: with one rank, the numbers themselves."""
        return values

    def from_root(self, fn):
        """fn() computed on rank 0 and sent to every rank: here, just fn()."""
        return fn()

    def gather(self, fn):
        """[fn() of every rank]: here, [fn()]."""
        return [fn()]

    def check_same_weights(self, params, iteration):
        """Raise if the ranks' weights differ: one rank cannot differ from itself."""

    def barrier(self):
        """Wait until every rank is here: one rank is always there."""


class MPIGroup:
    """All the processes of an MPI job (MPI.COMM_WORLD), seen from one of them."""

    def __init__(self, comm, mpi):
        self.comm, self.mpi = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.in_step = False  # True once training's collectives have begun (see abort_on_error)

    def allreduce_sum(self, buffer):
        """Sum a contiguous array over all ranks, in place: one Allreduce."""
        self.in_step = True
        self.comm.Allreduce(self.mpi.IN_PLACE, buffer, op=self.mpi.SUM)
        return buffer

    def sum_floats(self, *values):
        """The sums over all ranks of a few numbers (float64), as a tuple of floats."""
        return tuple(float(v) for v in self.allreduce_sum(onp.array(values, dtype=onp.float64)))

    def from_root(self, fn):
        """fn() computed on rank 0 alone and broadcast to every rank (mpi4py pickles it).

        A TinyLLMError on rank 0 is raised on every rank as an AllRanksError, so the job ends
        with rank 0's one line and no rank waits for a message that will never come.
        """
        if self.is_root:
            try:
                value = fn()
            except TinyLLMError as err:
                self.comm.bcast(("error", str(err)), root=0)
                raise AllRanksError(str(err)) from None
            self.comm.bcast(("ok", value), root=0)
            return value
        kind, value = self.comm.bcast(None, root=0)
        if kind == "error":
            raise AllRanksError(value)
        return value

    def gather(self, fn):
        """[fn() of rank 0, fn() of rank 1, ...] on every rank (mpi4py pickles them). A
        TinyLLMError on any rank is raised on every rank as an AllRanksError (the first failing
        rank's, named), so a rank that fails here never leaves the others waiting."""
        try:
            mine = ("ok", fn())
        except TinyLLMError as err:
            mine = ("error", str(err))
        gathered = self.comm.allgather(mine)
        for rank, (kind, value) in enumerate(gathered):
            if kind == "error":
                raise AllRanksError(value if rank == 0 else f"rank {rank} of {self.size}: {value}")
        return [value for _, value in gathered]

    def check_same_weights(self, params, iteration):
        """Stop every rank if any rank's weights differ from rank 0's (digests gathered)."""
        self.in_step = True
        digests = self.comm.allgather(weights_digest(params))
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise AllRanksError(
                f"at iteration {iteration} the weights of rank(s) {differ} differ from rank 0's:"
                " the ranks no longer train one model (are numpy and tinyllm the same version on"
                " every machine?); the last checkpoint is kept")

    def all_failing(self, timeout):
        """True if every rank calls this within `timeout` seconds (each has hit the same error,
        so all may exit in order); False if some rank is still working, or waiting elsewhere."""
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def barrier(self):
        """Wait until every rank is here."""
        self.comm.Barrier()

    def abort(self, message, code=1):
        """Print one line on this rank's real stderr and end the whole job (MPI_Abort).

        The launcher forwards a rank's output through a pipe; MPI_Abort kills the job at
        once, and on a loaded machine it could win the race and the line be lost, so the
        launcher is given a moment (ABORT_PAUSE seconds) to forward it first."""
        _stderr_line(message)
        time.sleep(ABORT_PAUSE)
        self.comm.Abort(code)


SINGLE_PROCESS = SingleProcess()  # immutable: safe as a default argument

_STDERR_FD = None  # this rank's original stderr, kept when a rank > 0 is silenced


def _stderr_line(message):
    fd = _STDERR_FD if _STDERR_FD is not None else sys.stderr.fileno()
    try:
        os.write(fd, (message.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _silence_output():
    """Send this rank's stdout and stderr to /dev/null, keeping the real stderr for one line."""
    global _STDERR_FD
    sys.stdout.flush()
    sys.stderr.flush()
    _STDERR_FD = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


SCRATCH_PREFIX = "tinyllm-rank"  # a scratch directory is SCRATCH_PREFIX + "{rank}-pid{pid}-..."


@contextlib.contextmanager
def rank_run_dir(out_dir, resume, group):
    """The run directory this rank works in: --out on rank 0; on the others a scratch directory,
    deleted at the end. When resuming, rank 0 sends the files of --out (read before it changes
    anything) and each other rank writes them into its scratch directory, so --out need exist
    only on rank 0's machine. For runs whose code writes as it goes (fine-tuning): only rank
    0's files are kept."""
    files = group.from_root(lambda: run_dir_files(out_dir) if resume else {})
    if group.is_root:
        yield out_dir
        return
    remove_scratch_of_ended_jobs()
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{group.rank}-pid{os.getpid()}-")
    try:
        run_dir = os.path.join(scratch, "run")
        os.mkdir(run_dir)
        for name, content in files.items():
            with open(os.path.join(run_dir, name), "xb") as f:
                f.write(content)
        yield run_dir
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_dir_files(out_dir):
    """{name: bytes} of the plain files directly in a run directory (what a resumed run reads;
    a symbolic link, a FIFO or a subdirectory is left out: the run refuses those itself)."""
    files = {}
    with os.scandir(out_dir) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                fd, size = open_regular(entry.path, "run file", follow_symlinks=False)
                files[entry.name] = read_fd(fd, size, "run file", entry.path)
    return files


def check_same_data_files(group, fingerprints):
    """Refuse, on every rank, data files that are not the same on every rank: each rank reads
    them itself (fine-tuning), and ranks that train on different records do not train one
    model. `fingerprints()` gives this rank's {setting: sha256}, such as {"val_data": "9f2c.."}.
    """
    everyone = group.gather(fingerprints)
    for rank, theirs in enumerate(everyone):
        for name, digest in everyone[0].items():
            if theirs.get(name) != digest:
                flag = "--" + name.replace("_", "-")
                raise AllRanksError(
                    f"{flag} is another file on rank {rank} than on rank 0 (its sha256"
                    " differs): under mpirun every rank reads the data files itself, so each"
                    " machine needs the same file at the same path")


def remove_scratch_of_ended_jobs():
    """Delete the scratch directories whose rank has ended without deleting its own: after
    Ctrl-C, rank 0 saves and aborts the job, and MPI_Abort kills the others where they wait.
    The process id in a directory's name tells whether its rank still runs."""
    temp = tempfile.gettempdir()
    for name in os.listdir(temp):
        match = re.fullmatch(rf"{SCRATCH_PREFIX}[0-9]+-pid([0-9]+)-\w+", name)
        if match and not _process_exists(int(match.group(1))):
            shutil.rmtree(os.path.join(temp, name), ignore_errors=True)


def _process_exists(pid):
    """Whether process `pid` runs (signal 0 sends nothing; it only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True


def _launcher_number(names, environ, default):
    """The first of the launcher's variables `names` that holds a number, or `default`."""
    for name in names:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def launched_size(environ=os.environ):
    """The number of processes an MPI launcher started, from its environment (1 if none)."""
    return _launcher_number(SIZE_VARS, environ, 1)


def launched_rank(environ=os.environ):
    """This process's rank, from the launcher's environment (0 if none)."""
    return _launcher_number(RANK_VARS, environ, 0)


PARALLEL_COMMANDS = ("pretrain", "finetune")  # the commands that train over mpirun


def check_command_runs_here(command, environ=os.environ):
    """Refuse, in one line from rank 0, a command that does not train over MPI when mpirun
    started N > 1 copies of it (they would race for the same files); the other ranks exit
    quietly. Nothing of MPI is touched, so all of them simply exit."""
    size = launched_size(environ)
    if size <= 1 or command in PARALLEL_COMMANDS:
        return
    if launched_rank(environ) != 0:
        sys.exit(1)
    raise TinyLLMError(f"tinyllm {command} runs on one process, and mpirun started {size}: of"
                       f" the commands, only {' and '.join(PARALLEL_COMMANDS)} train over MPI")


@functools.lru_cache(maxsize=None)
def world():
    """The process group of this run: SingleProcess unless an MPI launcher started more than
    one process, in which case mpi4py is imported (and MPI initialised) here, once."""
    size = launched_size()
    if size <= 1:
        return SINGLE_PROCESS
    try:
        from mpi4py import MPI
    except ImportError:
        if launched_rank() != 0:
            sys.exit(1)  # rank 0 says why
        raise TinyLLMError(f"started by mpirun as {size} processes, but mpi4py is not installed:"
                           f" {INSTALL_HINT}") from None
    group = MPIGroup(MPI.COMM_WORLD, MPI)
    if not group.is_root:
        _silence_output()
        _leave_signals_to_rank_0()
    return group


def _leave_signals_to_rank_0():
    """mpirun passes Ctrl-C (and SIGTERM) to every rank; only rank 0 acts on it: it ends its
    step, saves the checkpoint and aborts the job (the others never hold a step it needs)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def abort_on_error(command):
    """In an MPI job, end the whole job on an error that only this rank has: one line, then
    MPI_Abort, so no rank is left waiting forever. Errors all ranks share pass through (rank 0
    prints them, the others are silent): AllRanksError, and a TinyLLMError that every rank
    meets at the same point (a bad flag or data file: every rank runs the same checks on the
    same command line; a step that diverges), which the ranks confirm with a barrier of at most
    AGREE_SECONDS before training and STEP_AGREE_SECONDS in it. Single-process runs pass
    through untouched."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        group = world()
        if group.size == 1:
            return command(*args, **kwargs)
        try:
            return command(*args, **kwargs)
        except AllRanksError:
            raise  # every rank stops here; rank 0's message is the one shown
        except TinyLLMError:
            if not group.all_failing(STEP_AGREE_SECONDS if group.in_step else AGREE_SECONDS):
                _abort_job(group)
            raise  # seen by every rank: rank 0 prints it, the others exit quietly
        except BaseException:  # noqa: BLE001 - any other way out would hang the others
            _abort_job(group)

    return wrapper


def _abort_job(group):
    """Abort the job with one line about the exception being handled."""
    err = sys.exc_info()[1]
    who = "" if group.is_root else f"rank {group.rank} of {group.size}: "
    if hasattr(err, "out_dir"):  # Ctrl-C or SIGTERM: rank 0 saved its checkpoint first
        group.abort(f"{who}{err}. Continue with the same mpirun -n {group.size} command and"
                    " --resume", 128 + err.signum)
    elif hasattr(err, "signum"):
        group.abort(f"{who}interrupted", 128 + err.signum)
    elif isinstance(err, KeyboardInterrupt):
        group.abort(f"{who}interrupted", 130)
    elif isinstance(err, (TinyLLMError, OSError)):
        group.abort(f"Error: {who}{err}", 1)
    else:
        group.abort(f"Error: {who}{type(err).__name__}: {err}", 1)
