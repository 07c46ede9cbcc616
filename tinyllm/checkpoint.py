"""Versioned checkpoints: a run directory a person can inspect, saved whole or not at all.

Format (version 2)
------------------
A checkpoint is four files in the run directory:

    config.json          {"format": "tinyllm-checkpoint", "version": 2, "kind": "gpt", "iter": 500,
                          "model_file": "model-000500.npz", "optim_file": "optim-000500.npz",
                          "tokenizer_file": "tokenizer.json", "model": {GPTConfig fields},
                          "train": {TrainConfig fields}, "data": "/abs/path/corpus.txt" or "pydoc",
                          "data_sha256": "<64 hex digits>", "data_characters": 1756444,
                          "dtype": "float32", "last_eval_iter": 500, "ranks": 1}
    model-000500.npz     one array per parameter, named by its dotted path ("wte", "h.0.attn.c_attn.w")
    optim-000500.npz     AdamW moments "m.<path>" and "v.<path>", "step", and "rng_state": the JSON of
                         the numpy Generator's state as UTF-8 bytes (uint8), so a resumed run draws
                         the same batches it would have drawn
    tokenizer.json       the tokenizer (see tinyllm/tokenizers.py)

A field missing from "model" or "train" takes its default: a field added after a run was made
is one the run did not use (GPTConfig.distance_bias, for one, is False).

A pretraining run's config.json also holds "short_context": null, or {"tokens": 64, "steps":
720} when its first steps read shorter windows (`pretrain --short-context`; absent, as null, in
runs made before it), and an MLM run's "mask_rate" (0.15 when absent). `--resume` keeps both.

"ranks" is the number of MPI processes the run trains on (`mpirun -n N`; 1 without mpirun, and
for runs made before it was recorded); `--resume` needs the same number. "train" holds
"grad_accum", the micro-batches per step on each rank (1 when absent).

Both .npz files also hold "_iter", the step they were saved at. config.json names the other three
files; they are plain names inside the run directory (a name with a directory part, "..", or a
symbolic link is refused when loading). Arrays load with `numpy.load(..., allow_pickle=False)`
after every array's header has been checked (names, shapes, dtypes, sizes), and every weight and
moment must be finite. What the commands read besides the arrays is checked too: a classifier's
"labels" name its n_classes, a kind's tokenizer holds the special tokens KIND_SPECIAL_TOKENS names,
and loading to resume needs "train", a fine-tuning run's "before" and the fields RESUME_FIELDS
names. Version 1 (tinyllm before this protocol) had fixed names "model.npz" and "optim.npz" and no
"model_file"/"optim_file"; it still loads, and the next save writes version 2.

How a save commits (a crash at any moment leaves one complete checkpoint)
--------------------------------------------------------------------------
1. The new model and optimizer files are written beside the old ones under names the current
   config.json does not use (`model-<step>.npz`; `-2` is added if the same step is saved again),
   each to a temporary file that is flushed to disk (fsync) and then renamed. tokenizer.json is
   kept when it already holds the same bytes. Then the directory is fsynced.
2. The switch: a new config.json naming the new files is written to a temporary file, fsynced,
   and renamed over the old config.json (one atomic rename), and the directory is fsynced.
3. Only then are the previous checkpoint's files (no longer named by config.json) removed.

Until step 2 the old config.json names the old, untouched files; after it, the new one names
new, complete files. A kill leaves at most some unreferenced files, which the next run removes
(`remove_leftovers`). A full disk in steps 1-2 removes what this save wrote and raises a one-line
TinyLLMError; the previous checkpoint, if the run has one, is intact.
"""

import io
import json
import math
import os
import re
import typing
import zipfile
from dataclasses import dataclass, fields

import numpy as onp

from .config import MAX_SIZE, MAX_STEPS, GPTConfig, TrainConfig, from_dict, to_dict
from .errors import TinyLLMError
from .fileio import (TMP_PREFIX, atomic_write_bytes, available_memory, check_plain_name,
                     fsync_directory, json_bytes, npz_bytes, parse_json, read_run_file)
from .finetune import ClassifierConfig, init_classifier
from .labelled_data import control_character
from .lora import LoRAGPTConfig, init_lora_gpt
from .models import init_gpt
from .seq2seq import Seq2SeqConfig, init_seq2seq
from .seq2seq_data import SEQ2SEQ_SPECIAL_TOKENS
from .tokenizers import MASK_TOKEN, load_tokenizer_bytes
from .tree import flatten, unflatten

FORMAT = "tinyllm-checkpoint"
FORMAT_VERSION = 2
FILE_FIELDS = ("model_file", "optim_file", "tokenizer_file")
VERSION_1_FILES = {"model_file": "model.npz", "optim_file": "optim.npz",
                   "tokenizer_file": "tokenizer.json"}
STAMPED_FILE = re.compile(r"(model|optim)-\d{6,}(-2)?\.npz|tokenizer-2\.json")
# The names a run writes in its directory: config.json, the files it names (STAMPED_FILE, or
# version 1's model.npz and optim.npz), metrics.jsonl, and a fine-tuning run's best.npz and
# final report (metrics.json; for instruct also responses.jsonl). --force removes these and
# their temporary files, and nothing else; a directory may hold the user's files too.
RUN_FILES = ("config.json", "tokenizer.json", "model.npz", "optim.npz", "metrics.jsonl",
             "best.npz", "metrics.json", "responses.jsonl")
# fileio.atomic_write_bytes writes TARGET through ".tmp-" + the 8 random characters of
# tempfile.mkstemp + "-TARGET"; rundir.check_out_path's probe has no "-TARGET".
TEMP_FILE = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}(?:-(.+))?")
CONFIG_MAX_BYTES = 1 << 20  # a config.json is a few kB; a bigger one is not ours
TOKENIZER_MAX_BYTES = 64 << 20  # a 50k-token BPE file is about 2 MB
RNG_STATE_MAX_BYTES = 1 << 16
INT64_END = 1 << 63  # steps, sizes and seeds are saved as int64 (numpy seeds take no more)
FLOAT_DTYPES = ("float32", "float64")
TRAIN_LIMITS = {"batch_size": MAX_SIZE, "grad_accum": MAX_SIZE, "eval_iters": MAX_SIZE,
                "max_iters": MAX_STEPS, "warmup_iters": MAX_STEPS, "eval_interval": MAX_STEPS}

# Every model family a checkpoint can hold ("kind" in config.json): kind -> (config dataclass,
# init function(config, rng)). Loading builds a fresh model of the saved config to check every
# array's name and shape. A new family is added here, in this one table.
MODEL_KINDS = {
    "gpt": (GPTConfig, init_gpt),  # pretraining and instruction fine-tuning
    "mlm": (GPTConfig, init_gpt),  # the GPT tree pretrained as a bidirectional encoder by masked-
    # token prediction (`tinyllm pretrain --objective mlm`, tinyllm/mlm.py): the kind records the
    # objective, so the commands that need a causal model refuse it
    "gpt-lora": (LoRAGPTConfig, init_lora_gpt),  # instruction fine-tuning with LoRA adapters
    "classifier": (ClassifierConfig, init_classifier),  # classification fine-tuning
    "seq2seq": (Seq2SeqConfig, init_seq2seq),  # the encoder-decoder
}
# The special tokens the commands look up in a kind's tokenizer (the kinds not named need none).
KIND_SPECIAL_TOKENS = {"mlm": (MASK_TOKEN,), "seq2seq": SEQ2SEQ_SPECIAL_TOKENS}
# What a resumed run reads back from config.json besides its weights: every run its training
# settings ("train"), a fine-tuning run its base model's scores ("before"), and by kind:
RESUME_FIELDS = {"classifier": ("labels",), "seq2seq": ("label_smoothing", "schedule")}
# The scores "before" holds, by fine-tuning task (classify: one accuracy per split it has)
BEFORE_SCORES = {"instruct": ("exact_match", "token_f1")}


@dataclass
class Checkpoint:
    """Everything a run directory holds."""

    params: dict
    model_config: GPTConfig
    tokenizer: object
    meta: dict  # the whole config.json
    train_config: TrainConfig = None
    opt_state: dict = None  # None when loaded for inference only
    rng_state: dict = None

    @property
    def iter(self):
        return self.meta["iter"]


# ----------------------------------------------------------------------------- save


def save_checkpoint(out_dir, params, opt_state, rng_state, model_config, train_config,
                    tokenizer, iteration, extra=None, kind="gpt"):
    """Commit a checkpoint to out_dir (created if needed) by the protocol of the module docstring.

    `kind` names the model family (see MODEL_KINDS); `extra` adds fields to config.json.
    Non-finite weights or moments are refused before anything is written.
    """
    flat = flatten(params)
    optim = {f"m.{k}": a for k, a in flatten(opt_state["m"]).items()}
    optim.update({f"v.{k}": a for k, a in flatten(opt_state["v"]).items()})
    bad = first_non_finite({**flat, **optim})
    if bad is not None:
        raise TinyLLMError(f"refusing to save non-finite values ({bad!r}) at iteration"
                           f" {iteration}; the checkpoint in {out_dir} is unchanged")
    stamp = {"_iter": onp.array(iteration, dtype=onp.int64)}
    optim["step"] = onp.array(opt_state["step"], dtype=onp.int64)
    optim["rng_state"] = onp.frombuffer(json.dumps(rng_state).encode("utf-8"), dtype=onp.uint8)
    os.makedirs(out_dir, exist_ok=True)
    first = not os.path.lexists(os.path.join(out_dir, "config.json"))  # the run's first save
    current, written = current_files(out_dir) or {}, []
    try:
        # 1. the new files, complete and on disk, beside the old ones
        names = {"model_file": _write_new(out_dir, current, "model", iteration,
                                          npz_bytes({**flat, **stamp}), written),
                 "optim_file": _write_new(out_dir, current, "optim", iteration,
                                          npz_bytes({**optim, **stamp}), written),
                 "tokenizer_file": _write_tokenizer(out_dir, current, tokenizer, written)}
        fsync_directory(out_dir)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "iter": int(iteration),
                **names, "model": to_dict(model_config), "train": to_dict(train_config),
                "dtype": str(next(iter(flat.values())).dtype), **(extra or {})}
        # 2. the switch: one atomic rename of config.json
        atomic_write_bytes(os.path.join(out_dir, "config.json"), json_bytes(meta))
    except OSError as err:
        _remove_unnamed(out_dir, written)  # what this save wrote; the previous checkpoint stays
        where = f" (writing {os.path.basename(err.filename)})" if err.filename else ""
        kept = ("nothing was saved (the run had no checkpoint yet)" if first else
                "the previous checkpoint is intact")
        raise TinyLLMError(f"could not save the checkpoint of iteration {iteration} in {out_dir}:"
                           f" {err.strerror or err}{where}; {kept}") from None
    # 3. the previous checkpoint's files are no longer named by config.json
    remove_leftovers(out_dir)
    return meta


def _write_new(out_dir, current, stem, iteration, data, written):
    """Write `data` under a step-stamped name the current checkpoint does not use; return the
    name, also added to `written`."""
    for name in (f"{stem}-{iteration:06d}.npz", f"{stem}-{iteration:06d}-2.npz"):
        if name not in current.values():
            atomic_write_bytes(os.path.join(out_dir, name), data)
            written.append(name)
            return name
    raise AssertionError("the current checkpoint names one file per role")  # pragma: no cover


def _write_tokenizer(out_dir, current, tokenizer, written):
    """Keep the current tokenizer file if it holds the same bytes, else write a new one (its
    name added to `written`)."""
    data = json_bytes(tokenizer.to_dict())
    name = current.get("tokenizer_file")
    if name is not None:
        try:
            if read_run_file(out_dir, name, TOKENIZER_MAX_BYTES, "tokenizer file") == data:
                return name
        except TinyLLMError:
            pass  # unreadable or odd: write a fresh one
    for name in ("tokenizer.json", "tokenizer-2.json"):
        if name not in current.values():
            atomic_write_bytes(os.path.join(out_dir, name), data)
            written.append(name)
            return name
    raise AssertionError("the current checkpoint names one tokenizer")  # pragma: no cover


def first_non_finite(flat):
    """The name of the first array holding a NaN or an infinity, or None."""
    for name, array in flat.items():
        if not onp.isfinite(array).all():
            return name
    return None


def current_files(run_dir):
    """{"model_file": name, ...} of the checkpoint config.json names now; None if there is no
    readable config.json."""
    try:
        return checkpoint_files(read_meta(run_dir), run_dir)
    except TinyLLMError:
        return None


def checkpoint_paths(run_dir):
    """{"model": path, "optim": path, "tokenizer": path} of the checkpoint in run_dir now."""
    files = checkpoint_files(read_meta(run_dir), run_dir)
    return {key[:-len("_file")]: os.path.join(run_dir, name) for key, name in files.items()}


def is_run_file(name):
    """Is `name` a file a tinyllm run writes in its directory, or a temporary file of one?

    Example: "model-000500.npz", "metrics.jsonl", ".tmp-k2x9_a0q-config.json" -> True;
    "notes.txt", "model-final.npz", ".tmp-notes" -> False.
    """
    temp = TEMP_FILE.fullmatch(name)
    if temp is not None:
        return temp.group(1) is None or is_run_file(temp.group(1))
    return name in RUN_FILES or STAMPED_FILE.fullmatch(name) is not None


def _remove_unnamed(out_dir, names):
    """Remove those of `names` that config.json does not name now (what a failed save wrote)."""
    kept = (current_files(out_dir) or {}).values()
    for name in names:
        if name not in kept:
            remove_file(os.path.join(out_dir, name))


def remove_leftovers(run_dir):
    """Remove what an interrupted or superseded save left in a run directory: temporary files,
    and checkpoint files that config.json does not name. Never touches a file it does not own.

    Only a directory with a config.json is a run: in any other, nothing is removed, as its
    files may be the user's (rundir.start_out_dir decides what a new run may clear there).
    Step-stamped files ("model-000500.npz") are tinyllm's alone and go unless referenced. The
    version-1 names "model.npz" and "optim.npz" go only once a readable config.json names other
    files; with a config.json that cannot be read, only temporary files are removed.
    """
    has_config = os.path.lexists(os.path.join(run_dir, "config.json"))
    if not os.path.isdir(run_dir) or not has_config:
        return
    referenced = current_files(run_dir)
    for name in os.listdir(run_dir):
        if TEMP_FILE.fullmatch(name):
            drop = is_run_file(name)
        elif referenced is None:
            drop = False
        elif STAMPED_FILE.fullmatch(name):
            drop = name not in referenced.values()
        elif name in ("model.npz", "optim.npz"):
            drop = referenced is not None and name not in referenced.values()
        else:
            drop = False
        if drop:
            remove_file(os.path.join(run_dir, name))


def remove_file(path):
    """Remove a file or symbolic link (never a directory); ignore one that is already gone."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- load


def read_meta(ckpt_dir):
    """Read and check config.json of a checkpoint directory (bounded, no symlinks followed)."""
    if not os.path.isdir(ckpt_dir):
        raise TinyLLMError(f"checkpoint directory {ckpt_dir!r} not found")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.lexists(path):
        raise TinyLLMError(f"{ckpt_dir!r} is not a tinyllm checkpoint (no config.json)")
    meta = parse_json(read_run_file(ckpt_dir, "config.json", CONFIG_MAX_BYTES, "checkpoint config"),
                      path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint config")
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        raise TinyLLMError(f"{path}: \"version\" must be a whole number from 1, not"
                           f" {version!r:.20}")
    if version > FORMAT_VERSION:
        raise TinyLLMError(
            f"{path} has format version {version}; this tinyllm reads version"
            f" {FORMAT_VERSION} or older: upgrade tinyllm"
        )
    for key, kinds in FIELD_TYPES:
        _check_field(meta, key, kinds, path)
    if not all(isinstance(label, str) for label in meta.get("labels") or []):
        raise TinyLLMError(f"{path}: field 'labels' must be a list of strings")
    if any(control_character(label) for label in meta.get("labels") or []):
        raise TinyLLMError(f"{path}: field 'labels' holds a control character (a class name is"
                           " printed as it is, and could send commands to the terminal)")
    labels = meta.get("labels") or []
    if len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
        raise TinyLLMError(f"{path}: field 'labels' must name each class once, none of them"
                           " empty (a data file's labels give distinct, non-empty names)")
    if not 0 <= meta["iter"] < INT64_END:
        raise TinyLLMError(f"{path}: \"iter\" must not be negative, nor 2^63 or more")
    if meta.get("dtype", "float32") not in FLOAT_DTYPES:
        raise TinyLLMError(f"{path}: \"dtype\" must be one of {', '.join(FLOAT_DTYPES)}")
    _check_before(meta, path)
    return meta


def _check_before(meta, path):
    """"before", a fine-tuning run's scores of its base model (printed again by --resume), must
    be fractions from 0 to 1, holding every score its task reports."""
    before = meta.get("before")
    if before is None:
        return
    task = (meta.get("finetune") or {}).get("task")
    if (not all(_is_number(v) and 0 <= v <= 1 for v in before.values())
            or not set(BEFORE_SCORES.get(task, ())) <= set(before)):
        raise TinyLLMError(f"{path}: field 'before' must hold the base model's scores, numbers"
                           f" from 0 to 1 ({', '.join(BEFORE_SCORES.get(task, ('any',)))})")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The type of every field config.json may have (None: optional, may be null). The last ones are
# written by the fine-tuning and seq2seq runs; checking them here gives every run one-line errors.
FIELD_TYPES = (("iter", int), ("kind", str), ("model", dict), ("train", (dict, None)),
               ("last_eval_iter", (int, None)), ("dtype", (str, None)), ("data", (str, None)),
               ("data_sha256", (str, None)), ("data_characters", (int, None)),
               ("labels", (list, None)), ("finetune", (dict, None)), ("before", (dict, None)),
               ("data_files_sha256", (dict, None)), ("weights_iter", (int, None)),
               ("label_smoothing", (float, int, None)), ("schedule", (str, None)),
               ("ranks", (int, None)))


def _check_field(meta, key, kinds, path):
    """meta[key] must exist and have one of `kinds` (None in kinds: optional, may be null)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in meta:
        if None in kinds:
            return
        raise TinyLLMError(f"{path} lacks the field {key!r}")
    value = meta[key]
    ok = any((value is None) if k is None else (_is_int(value) if k is int else isinstance(value, k))
             for k in kinds)
    if not ok:
        names = " or ".join("null" if k is None else k.__name__ for k in kinds)
        raise TinyLLMError(f"{path}: field {key!r} must be {names}, not {type(value).__name__}")


def stored_ranks(meta, ckpt_dir):
    """The number of MPI processes a run was trained on ("ranks"; 1 for runs that predate it)."""
    ranks = meta.get("ranks")
    if ranks is None:
        return 1
    if ranks < 1:
        raise TinyLLMError(f"{os.path.join(ckpt_dir, 'config.json')}: \"ranks\" must be at least 1")
    return ranks


def checkpoint_files(meta, ckpt_dir):
    """The file names config.json gives (version 1: the fixed names), each a plain name."""
    where = os.path.join(ckpt_dir, "config.json")
    files = {}
    for key in FILE_FIELDS:
        if meta["version"] >= 2 or key == "tokenizer_file":
            files[key] = meta.get(key, VERSION_1_FILES[key] if meta["version"] < 2 else None)
        else:
            files[key] = VERSION_1_FILES[key]
        if files[key] is None:
            raise TinyLLMError(f"{where} lacks the field {key!r}")
        check_plain_name(files[key], f"{where} field {key!r}")
    return files


def read_npz(run_dir, name):
    """Every array of run_dir/name, read as untrusted input: a dict of name -> array.

    The file is read whole (its size checked against free memory first), every member's .npy
    header is checked before any array is built (uncompressed, no object dtype, no more data
    declared than the member holds), then numpy loads it without pickle.
    """
    path = os.path.join(run_dir, name)
    data = read_run_file(run_dir, name, available_memory() // 2, "checkpoint file")
    if not data.startswith(b"PK"):
        raise TinyLLMError(f"checkpoint file {path} is not an .npz archive (truncated or corrupted)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            _check_directory(archive.infolist(), path, len(data))
            for info in archive.infolist():
                _check_member(archive, info, path, len(data))
        with onp.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except TinyLLMError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise TinyLLMError(f"checkpoint file {path} is truncated or corrupted"
                           f" ({type(err).__name__})") from None


def _check_directory(infos, path, archive_bytes):
    """The archive's directory lists each member once, and members that fit in the archive.

    numpy loads every listed member, and the directory may list one member's data thousands of
    times: a 5 MB file naming a 4 MB member 20,000 times made numpy read 80 GB. Members that
    hold their own bytes cannot together declare more than the archive has.
    """
    seen = set()
    for info in infos:
        if info.filename in seen:
            raise TinyLLMError(f"checkpoint file {path} lists the member {info.filename[:60]!r}"
                               " more than once (corrupted or crafted)")
        seen.add(info.filename)
    if sum(info.compress_size for info in infos) > archive_bytes:
        raise TinyLLMError(f"checkpoint file {path}: its directory claims more bytes than the"
                           f" file has, for its {len(infos):,} members (corrupted or crafted)")


def _check_member(archive, info, path, archive_bytes):
    """One .npy member of an .npz: stored (not compressed), numeric, no more data than it holds.

    The member's size comes from the archive's directory, which may lie: numpy allocates the
    whole array before reading, so a stored member may not claim more bytes than the archive has.
    """
    if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
        raise TinyLLMError(f"checkpoint file {path} has a member tinyllm does not write"
                           f" ({info.filename[:60]!r}: compressed or not .npy)")
    if info.file_size > archive_bytes:
        raise TinyLLMError(f"checkpoint file {path}: {info.filename[:60]!r} claims more bytes than"
                           " the file has (truncated or corrupted)")
    with archive.open(info) as f:
        version = onp.lib.format.read_magic(f)
        read_header = (onp.lib.format.read_array_header_1_0 if version == (1, 0)
                       else onp.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise TinyLLMError(f"checkpoint file {path}: {info.filename[:-4]!r} is not a numeric array")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise TinyLLMError(f"checkpoint file {path}: {info.filename[:-4]!r} declares more data"
                           " than it holds (truncated or corrupted)")


def _check_stamp(arrays, path, iteration):
    """Pop "_iter", the step the file was saved at, which must be the step config.json gives."""
    stamp = arrays.pop("_iter", None)
    if stamp is None or stamp.shape != () or stamp.dtype.kind not in "iu":
        raise TinyLLMError(f"{path}: its step \"_iter\" is missing or not a whole number"
                           " (corrupted or altered)")
    if int(stamp) != iteration:
        raise TinyLLMError(f"{path} is from step {int(stamp)} but config.json says {iteration}:"
                           " the checkpoint was interrupted while being saved")
    return arrays


def check_arrays(flat, reference, path, dtype):
    """Exactly the names and shapes a fresh model of this config has, of `dtype`, all finite."""
    got = {k: a.shape for k, a in flat.items()}
    want = {k: a.shape for k, a in flatten(reference).items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise TinyLLMError(
            f"{path} does not match its config.json (missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}, wrong shapes {wrong[:3]})"
        )
    odd = sorted(k for k, a in flat.items() if a.dtype != onp.dtype(dtype))
    if odd:
        raise TinyLLMError(f"{path}: {odd[0]!r} is {flat[odd[0]].dtype}, not {dtype} as config.json"
                           " says")
    bad = first_non_finite(flat)
    if bad is not None:
        raise TinyLLMError(f"{path}: {bad!r} holds NaN or infinite values (the run diverged or"
                           " the file was altered); use an earlier run")


def _model_config(config_cls, data, where):
    """A model config from config.json's "model": every field of the right type, then validated."""
    # every whole number of a model config is a size: at most what a flag may ask for
    config = from_dict(config_cls, check_field_types(config_cls, data, where, most=MAX_SIZE),
                       where=where)
    try:
        return config.validate()
    except TinyLLMError as err:
        raise TinyLLMError(f"{where}: {err}") from None


def check_field_types(cls, data, where, most=INT64_END - 1, limits=None):
    """Check a dict's values against dataclass `cls`'s field types (by each field's default, or
    for a default of None by its annotation, `Optional[str]`: a string or null); a whole number
    must be from 0 to `most`, or to limits[name] where that names the field."""
    if not isinstance(data, dict):
        raise TinyLLMError(f"{where}: the {cls.__name__} settings must be a JSON object")
    for field in fields(cls):
        if field.name not in data:
            continue
        value, kind = data[field.name], _field_type(cls, field)
        if value is None and field.default is None:
            ok = True
        elif kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:  # a size, count, step or seed: never negative
            ok = _is_int(value) and 0 <= value <= (limits or {}).get(field.name, most)
        elif kind is float:
            ok = _is_number(value) and math.isfinite(value)
        elif kind is str:
            ok = isinstance(value, str)
        else:  # any other default: a JSON scalar
            ok = value is None or isinstance(value, (str, bool)) or (
                isinstance(value, (int, float)) and math.isfinite(value))
        if not ok:
            raise TinyLLMError(f"{where}: {cls.__name__} field {field.name!r} has the wrong type"
                               f" or is out of range ({type(value).__name__})")
    return data


def _field_type(cls, field):
    """bool, int, float or str: the type of a field's default, or for a default of None the one
    type its annotation allows besides None (Optional[int] -> int); else None."""
    if field.default is not None:
        return type(field.default)
    hinted = typing.get_args(typing.get_type_hints(cls).get(field.name))
    named = [t for t in hinted if t is not type(None)]
    return named[0] if len(named) == 1 else None


def _check_model_size(model_config, arrays, path):
    """Refuse a config.json that describes a model far bigger than its weights file, before
    building one (a doctored config could ask for more memory than the machine has)."""
    c, n_layer = model_config.n_embd, model_config.n_layer
    n_classes, rank = getattr(model_config, "n_classes", 0), getattr(model_config, "lora_rank", 0)
    learned = getattr(model_config, "positions", "learned") == "learned"  # seq2seq: maybe not
    # The token table (V, C), learned positions (T, C), a classification head (C, K), and in
    # each block 12 C^2 weights (attention 4 C^2, MLP 8 C^2) and 16 C r of LoRA adapters.
    at_least = (c * (model_config.vocab_size + learned * model_config.block_size + n_classes)
                + n_layer * (12 * c * c + 16 * c * rank))
    file_bytes = sum(a.nbytes for a in arrays.values())
    if 4 * at_least > file_bytes + (1 << 16) or n_layer > len(arrays):
        raise TinyLLMError(f"{path} holds {len(arrays):,} arrays of {file_bytes:,} bytes, too few"
                           f" for the model of {n_layer:,} blocks and at least {at_least:,}"
                           " parameters that config.json describes")


def load_checkpoint(ckpt_dir, with_optimizer=False, kind="gpt"):
    """Load a run directory: params, configs, tokenizer and (optionally) optimizer state.

    `kind` is the model family the caller expects (a tuple allows several; None allows any).
    """
    meta = read_meta(ckpt_dir)
    where = f"{ckpt_dir}/config.json"
    allowed = (kind,) if isinstance(kind, str) else kind
    if allowed is not None and meta["kind"] not in allowed:
        want = " or ".join(repr(k) for k in allowed)
        if meta["kind"] == "mlm" and "gpt" in allowed:
            raise TinyLLMError(f"{ckpt_dir!r} holds a masked language model (pretrained with"
                               " --objective mlm), which does not predict the next token: this"
                               " needs a causal model (tinyllm pretrain --objective clm)")
        raise TinyLLMError(f"{ckpt_dir!r} holds a {meta['kind']!r} model, not a {want} model")
    if meta["kind"] not in MODEL_KINDS:
        raise TinyLLMError(f"{ckpt_dir!r} holds a model of unknown kind {meta['kind']!r}")
    config_cls, init_fn = MODEL_KINDS[meta["kind"]]
    model_config = _model_config(config_cls, meta["model"], where)
    files = checkpoint_files(meta, ckpt_dir)
    model_path = os.path.join(ckpt_dir, files["model_file"])
    arrays = _check_stamp(read_npz(ckpt_dir, files["model_file"]), model_path, meta["iter"])
    _check_model_size(model_config, arrays, model_path)
    reference = init_fn(model_config, onp.random.default_rng(0))  # names and shapes to expect
    check_arrays(arrays, reference, model_path, meta.get("dtype", "float32"))
    params = unflatten(arrays)
    tokenizer_path = os.path.join(ckpt_dir, files["tokenizer_file"])
    tokenizer = load_tokenizer_bytes(
        read_run_file(ckpt_dir, files["tokenizer_file"], TOKENIZER_MAX_BYTES, "tokenizer file"),
        tokenizer_path)
    if getattr(model_config, "vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise TinyLLMError(f"{ckpt_dir}: tokenizer and model disagree on the vocabulary size")
    _check_run_fields(meta, model_config, tokenizer, where, resume=with_optimizer)
    ckpt = Checkpoint(params=params, model_config=model_config, tokenizer=tokenizer, meta=meta)
    if "train" in meta:
        ckpt.train_config = _train_config(meta["train"], where)
    if with_optimizer:
        ckpt.opt_state, ckpt.rng_state = _load_optimizer(ckpt_dir, files["optim_file"], meta,
                                                         reference)
    return ckpt


def _check_run_fields(meta, model_config, tokenizer, where, resume):
    """What the commands read besides the weights: a classifier's class names, the special tokens
    of the kind's tokenizer, and with `resume` (training continues) every field RESUME_FIELDS
    names."""
    kind = meta["kind"]
    if kind == "classifier" and len(meta.get("labels") or []) != model_config.n_classes:
        raise TinyLLMError(f"{where}: field 'labels' must name the model's"
                           f" {model_config.n_classes} classes")
    missing = [t for t in KIND_SPECIAL_TOKENS.get(kind, ()) if t not in tokenizer.special_tokens]
    if missing:
        raise TinyLLMError(f"{where}: its tokenizer lacks the special token {missing[0]}, which"
                           f" a {kind!r} model needs")
    needed = ("train", *RESUME_FIELDS.get(kind, ()), *(("before",) if "finetune" in meta else ()))
    absent = [key for key in needed if meta.get(key) is None] if resume else []
    if absent:
        raise TinyLLMError(f"{where} lacks the field {absent[0]!r}, which --resume needs")


def _train_config(data, where):
    config = from_dict(TrainConfig, check_field_types(TrainConfig, data, where,
                                                      limits=TRAIN_LIMITS), where=where)
    try:
        return config.validate()
    except TinyLLMError as err:
        raise TinyLLMError(f"{where}: {err}") from None


def _load_optimizer(ckpt_dir, name, meta, reference):
    path = os.path.join(ckpt_dir, name)
    arrays = _check_stamp(read_npz(ckpt_dir, name), path, meta["iter"])
    step, rng_bytes = arrays.pop("step", None), arrays.pop("rng_state", None)
    if (step is None or step.shape != () or step.dtype.kind not in "iu"
            or not 0 <= int(step) < INT64_END):
        raise TinyLLMError(f"{path}: \"step\" is missing or not a whole number")
    if (rng_bytes is None or rng_bytes.dtype != onp.uint8 or rng_bytes.ndim != 1
            or rng_bytes.size > RNG_STATE_MAX_BYTES):
        raise TinyLLMError(f"{path}: \"rng_state\" is missing or not JSON bytes (uint8)")
    rng_state = parse_json(rng_bytes.tobytes(), f"{path} (rng_state)")
    try:
        onp.random.default_rng().bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError, OverflowError):
        raise TinyLLMError(f"{path}: \"rng_state\" is not a random generator state") from None
    moments = {}
    for prefix in ("m", "v"):
        flat = {k[2:]: a for k, a in arrays.items() if k.startswith(prefix + ".")}
        check_arrays(flat, reference, path, meta.get("dtype", "float32"))
        moments[prefix] = unflatten(flat)
    unexpected = sorted(k for k in arrays if not k.startswith(("m.", "v.")))
    if unexpected:
        raise TinyLLMError(f"{path} holds arrays tinyllm does not write ({unexpected[:3]})")
    return {**moments, "step": int(step)}, rng_state
