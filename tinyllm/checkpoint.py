"""Versioned checkpoints: a run directory a person can inspect, loaded without pickle.

A checkpoint is four files in the run directory:

    config.json     {"format": "tinyllm-checkpoint", "version": 1, "kind": "gpt", "iter": 500,
                     "model": {GPTConfig fields}, "train": {TrainConfig fields},
                     "tokenizer_file": "tokenizer.json", "data": "pydoc", "dtype": "float32",
                     "last_eval_iter": 500}
    model.npz       one array per parameter, named by its dotted path ("wte", "h.0.attn.c_attn.w")
    optim.npz       AdamW moments "m.<path>" and "v.<path>", "step", and "rng_state": the JSON of
                    the numpy Generator's state as UTF-8 bytes (uint8), so a resumed run draws
                    the same batches it would have drawn
    tokenizer.json  the tokenizer (see tinyllm/tokenizers.py)

Both .npz files also hold "_iter", the step they were saved at. Each file is written atomically
(temporary file, then rename) and config.json last, so config.json always describes complete
files; loading checks that the "_iter" stamps agree, which catches the one case left: a crash
between two renames. Arrays load with `numpy.load(path, allow_pickle=False)`.
"""

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as onp

from .config import GPTConfig, TrainConfig, from_dict, to_dict
from .errors import TinyLLMError
from .fileio import atomic_save_npz, atomic_write_json
from .finetune import ClassifierConfig, init_classifier
from .lora import LoRAGPTConfig, init_lora_gpt
from .models import init_gpt
from .seq2seq import Seq2SeqConfig, init_seq2seq
from .tokenizers import load_tokenizer
from .tree import flatten, unflatten

FORMAT = "tinyllm-checkpoint"
FORMAT_VERSION = 1
FILES = ("config.json", "model.npz", "optim.npz", "tokenizer.json")

# Every model family a checkpoint can hold ("kind" in config.json): kind -> (config dataclass,
# init function(config, rng)). Loading builds a fresh model of the saved config to check every
# array's name and shape. A new family is added here, in this one table.
MODEL_KINDS = {
    "gpt": (GPTConfig, init_gpt),  # pretraining and instruction fine-tuning
    "gpt-lora": (LoRAGPTConfig, init_lora_gpt),  # instruction fine-tuning with LoRA adapters
    "classifier": (ClassifierConfig, init_classifier),  # classification fine-tuning
    "seq2seq": (Seq2SeqConfig, init_seq2seq),  # the encoder-decoder
}


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
    """Write a checkpoint into out_dir (created if needed); see the module docstring.

    `kind` names the model family (see MODEL_KINDS); `extra` adds fields to config.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    stamp = {"_iter": onp.array(iteration, dtype=onp.int64)}
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    atomic_save_npz(os.path.join(out_dir, "model.npz"), {**flatten(params), **stamp})
    optim = {f"m.{k}": a for k, a in flatten(opt_state["m"]).items()}
    optim.update({f"v.{k}": a for k, a in flatten(opt_state["v"]).items()})
    optim["step"] = onp.array(opt_state["step"], dtype=onp.int64)
    optim["rng_state"] = onp.frombuffer(json.dumps(rng_state).encode("utf-8"), dtype=onp.uint8)
    atomic_save_npz(os.path.join(out_dir, "optim.npz"), {**optim, **stamp})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "iter": int(iteration),
        "model": to_dict(model_config),
        "train": to_dict(train_config),
        "tokenizer_file": "tokenizer.json",
        "dtype": str(next(iter(flatten(params).values())).dtype),
        **(extra or {}),
    }
    atomic_write_json(os.path.join(out_dir, "config.json"), meta)  # last: it commits the others
    return meta


# ----------------------------------------------------------------------------- load


def read_meta(ckpt_dir):
    """Read and check config.json of a checkpoint directory."""
    if not os.path.isdir(ckpt_dir):
        raise TinyLLMError(f"checkpoint directory {ckpt_dir!r} not found")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        raise TinyLLMError(f"{ckpt_dir!r} is not a tinyllm checkpoint (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TinyLLMError(f"{path} is corrupted or truncated ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint config")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TinyLLMError(
            f"{path} has format version {version}; this tinyllm reads version"
            f" {FORMAT_VERSION} or older: upgrade tinyllm"
        )
    for key in ("iter", "model", "kind"):
        if key not in meta:
            raise TinyLLMError(f"{path} lacks the field {key!r}")
    return meta


def read_npz(path):
    """Load every array of an .npz into a dict, without pickle, with one-line errors."""
    if not os.path.exists(path):
        raise TinyLLMError(f"checkpoint file {path} is missing")
    try:
        with onp.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise TinyLLMError(f"checkpoint file {path} is truncated or corrupted ({err})") from None


def _check_stamp(arrays, path, iteration):
    stamp = arrays.pop("_iter", None)
    if stamp is None or int(stamp) != iteration:
        raise TinyLLMError(
            f"{path} is from step {None if stamp is None else int(stamp)} but config.json says"
            f" {iteration}: the checkpoint was interrupted while being saved"
        )
    return arrays


def _check_params(params, reference, path):
    """The loaded tree must have exactly the names and shapes a fresh model of this config has."""
    got = {k: a.shape for k, a in flatten(params).items()}
    want = {k: a.shape for k, a in flatten(reference).items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise TinyLLMError(
            f"{path} does not match its config.json (missing {missing[:3]}, wrong shapes {wrong[:3]})"
        )


def load_checkpoint(ckpt_dir, with_optimizer=False, kind="gpt"):
    """Load a run directory: params, configs, tokenizer and (optionally) optimizer state.

    `kind` is the model family the caller expects (a tuple allows several; None allows any).
    """
    meta = read_meta(ckpt_dir)
    allowed = (kind,) if isinstance(kind, str) else kind
    if allowed is not None and meta["kind"] not in allowed:
        want = " or ".join(repr(k) for k in allowed)
        raise TinyLLMError(f"{ckpt_dir!r} holds a {meta['kind']!r} model, not a {want} model")
    if meta["kind"] not in MODEL_KINDS:
        raise TinyLLMError(f"{ckpt_dir!r} holds a model of unknown kind {meta['kind']!r}")
    config_cls, init_fn = MODEL_KINDS[meta["kind"]]
    model_config = from_dict(config_cls, meta["model"], where=f"{ckpt_dir}/config.json").validate()
    model_path = os.path.join(ckpt_dir, "model.npz")
    params = unflatten(_check_stamp(read_npz(model_path), model_path, meta["iter"]))
    reference = init_fn(model_config, onp.random.default_rng(0))  # names and shapes to expect
    _check_params(params, reference, model_path)
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, meta.get("tokenizer_file", "tokenizer.json")))
    if getattr(model_config, "vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise TinyLLMError(f"{ckpt_dir}: tokenizer and model disagree on the vocabulary size")
    ckpt = Checkpoint(params=params, model_config=model_config, tokenizer=tokenizer, meta=meta)
    if "train" in meta:
        ckpt.train_config = from_dict(TrainConfig, meta["train"], where=f"{ckpt_dir}/config.json")
    if with_optimizer:
        ckpt.opt_state, ckpt.rng_state = _load_optimizer(ckpt_dir, meta["iter"], params)
    return ckpt


def _load_optimizer(ckpt_dir, iteration, params):
    path = os.path.join(ckpt_dir, "optim.npz")
    arrays = _check_stamp(read_npz(path), path, iteration)
    try:
        rng_state = json.loads(arrays.pop("rng_state").tobytes().decode("utf-8"))
        step = int(arrays.pop("step"))
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise TinyLLMError(f"{path} is corrupted ({err})") from None
    m = unflatten({k[2:]: a for k, a in arrays.items() if k.startswith("m.")})
    v = unflatten({k[2:]: a for k, a in arrays.items() if k.startswith("v.")})
    _check_params(m, params, path)
    _check_params(v, params, path)
    return {"m": m, "v": v, "step": step}, rng_state
