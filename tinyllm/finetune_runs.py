"""Fine-tuning runs: what `tinyllm finetune classify|instruct` and `tinyllm classify` do.

A run is a settings dataclass (`ClassifySettings`, `InstructSettings`: every flag, with its
default) plus a straight sequence of named steps:

    1. settings      from the flags, or from the run's config.json when resuming
    2. data          read, check, split (and check that a resumed run's files did not change)
    3. model         the base model turned into the model to fine-tune, or the resumed one
    4. encode        texts to token windows / instruction rows, counting what was cut or windowed
    5. score before  accuracy, or exact match and token F1, of the untrained model
    6. train         train.train_loop on the trainable parameters, evaluating the whole
                     validation split; the best evaluation's weights are kept and the run stops
                     after `patience` evaluations without improvement (early stopping)
    7. score after   with the best weights, then the report

The runners hold no Click code, so tests and scripts can call them; tinyllm/cli_finetune.py only
maps flags onto the settings.

A fine-tuning run directory is a checkpoint (see tinyllm/checkpoint.py) plus:
    metrics.jsonl     the training loop's evaluations (whole-split losses), as in pretraining
    best.npz          while training: the weights of the best evaluation so far (parameter
                      arrays and "_iter", as model.npz); at the end they become the checkpoint's
                      weights and the file is removed
    metrics.json      the final report: {"format": "tinyllm-finetune-metrics", "version": 2,
                      "task": "classify" | "instruct", ...} (see `classify_report` / `run_instruct`)
    responses.jsonl   (instruct) one line per test record: instruction, input, reference, response
                      (these two are written at the end: a run still training has neither)
Its config.json has kind "classifier" (model fields of ClassifierConfig, "labels": the class
names in id order) or, for instruction tuning, "gpt" (or "gpt-lora" with adapters), plus
"finetune": the settings, "data_files_sha256": the sha256 of each data file, "best_iter" (the
evaluation with the lowest validation loss so far), "weights_iter" (the step whose weights
model.npz holds: the last step while training, best_iter once the run is finished) and
"train_seconds" (the training time over every part of a resumed run: see run_clock).
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import numpy as onp

from .bleu import exact_match
from .checkpoint import check_arrays, load_checkpoint, read_meta, read_npz, save_checkpoint
from .config import DEFAULT_BPE_VOCAB_SIZE, DEFAULT_TOKENIZER, GPTConfig, TrainConfig
from .distributed import SINGLE_PROCESS
from .errors import TinyLLMError
from .fileio import atomic_save_npz, atomic_write_json, atomic_write_text, open_regular
from .finetune import (DEFAULT_POOLING, ClassifierConfig, classifier_from_gpt, classifier_loss,
                       confusion_matrix, fit_prompt, format_prompt, instruction_example,
                       length_groups, make_windows, merge_params, precision_recall,
                       predict_windows, split_params, token_f1, trainable_paths)
from .generate import greedy_batch
from .labelled_data import (SPLIT_CLASSIFY, SPLIT_INSTRUCT, UNK_TOKEN, balance,
                            default_classification_data, default_instruction_data,
                            encode_with_fallback, label_ids, read_classification,
                            read_instructions, split_three, with_case_copies, with_unknown_token,
                            without_repeats)
from .lora import LoRAGPTConfig, apply_lora, init_lora, merge_lora, merged_gpt
from .models import count_params, gpt_loss, init_gpt
from .optim import adamw_init
from .progress import Counting
from .system import one_blas_thread
from .train import (SPECIAL_TOKENS, Committed, TrainingClock, check_memory, check_resumed_total,
                    check_same_ranks, check_still_there, earlier_train_seconds, gpt_param_count,
                    gpt_step_bytes, prepare_out_dir, read_metrics, start_out_dir, train_loop,
                    truncate_metrics)
from .tree import flatten, unflatten

METRICS_FORMAT = "tinyllm-finetune-metrics"
METRICS_VERSION = 2  # 2: "examples" counts records read (1 counted the training split's case
# copies too), "train_case_copies" and "train_seconds_this_part" are new, "train_seconds" spans
# every --resume
EOT = SPECIAL_TOKENS[0]
EVAL_TRAIN_EXAMPLES = 256  # the train loss at an evaluation is measured on this many examples
BEST_FILE = "best.npz"
REPORT_FILES = ("metrics.json", "responses.jsonl")  # written when a run finishes


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FinetuneSettings:
    """The flags both fine-tuning commands share. Each command's subclass sets its defaults."""

    # settings added after runs were made, with the value that gives those runs' behaviour
    # (used by --resume on a run whose config.json lacks them); a class attribute, not a field
    BEFORE_THEY_EXISTED = {}

    checkpoint: Optional[str] = None  # pretrained run; None: the default architecture, random init
    data: Optional[str] = None  # labelled data file; None: the command's embedded set
    val_data: Optional[str] = None  # with test_data: fixed splits instead of a random split
    test_data: Optional[str] = None
    random_init: bool = False  # the checkpoint's architecture and tokenizer, random weights
    lora_rank: int = 0  # 0: train the weights themselves; r > 0: low-rank adapters only
    lora_alpha: Optional[float] = None  # adapter scale numerator; None: 2 * lora_rank
    batch_size: int = 16
    max_iters: int = 300
    epochs: Optional[float] = None  # replaces max_iters: an epoch is as many examples as the
    # training split has records (a classifier draws them from the records and their case
    # copies), whatever --batch-size, --grad-accum and the number of MPI ranks
    lr: float = 3e-4
    warmup_iters: int = 20
    weight_decay: float = 0.01
    eval_interval: int = 25
    patience: int = 4  # stop after this many evaluations without a better val loss; 0: never
    seed: int = 1337
    split_seed: Optional[int] = None  # the random split's seed; None: seed. Runs with one
    # split_seed and different seeds are trained on the same records, so that their
    # predictions can be averaged and scored on the same test split (`tinyllm classify`)
    grad_accum: int = 1  # micro-batches of batch_size per step (see TrainConfig.grad_accum)

    def validate(self):
        """Raise TinyLLMError (naming the flag) for settings that cannot train; return self."""
        _check(self.lora_rank >= 0, "--lora-rank must not be negative", self.lora_rank)
        if self.lora_alpha is not None:
            _check(math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                   "--lora-alpha must be a positive number", self.lora_alpha)
        if self.epochs is not None:
            _check(math.isfinite(self.epochs) and self.epochs > 0,
                   "--epochs must be a positive number", self.epochs)
        for name in ("batch_size", "max_iters", "eval_interval", "grad_accum"):
            _check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive",
                   getattr(self, name))
        for name in ("warmup_iters", "patience", "seed"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must not be negative",
                   getattr(self, name))
        if self.split_seed is not None:
            _check(self.split_seed >= 0, "--split-seed must not be negative", self.split_seed)
        _check(math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number", self.lr)
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "--weight-decay must be a number >= 0", self.weight_decay)
        if bool(self.val_data) != bool(self.test_data):
            raise TinyLLMError("give both --val-data and --test-data, or neither (random split)")
        return self

    @property
    def data_seed(self):
        """The seed of the random split (and of --balance): split_seed, or else seed."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def adapter_alpha(self):
        """lora_alpha, or its default 2 * rank."""
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)


def _check(ok, message, value):
    if not ok:
        raise TinyLLMError(f"{message}, got {value}")


@dataclass(frozen=True)
class ClassifySettings(FinetuneSettings):
    """`tinyllm finetune classify`: defaults chosen on real short texts (docs/experiments.md)."""

    BEFORE_THEY_EXISTED = {"case_copies": False, "dedupe": False}

    text_column: Optional[str] = None  # CSV/TSV column of the text; None: "text" or column 0
    label_column: Optional[str] = None  # None: "label" or column 1
    balance: bool = False  # downsample the larger classes to the smallest
    dedupe: bool = False  # keep only the first record of each text (labelled_data.without_repeats)
    case_copies: bool = True  # train on every training text also in upper and in lower case
    # (`labelled_data.with_case_copies`): real short messages mix cases freely, and a tokenizer
    # trained on edited prose reads capitals as rare fragments (see the README)
    arch: Optional[str] = None  # "decoder" (causal) or "encoder" (the same weights run
    # bidirectionally); None: "encoder" from an MLM checkpoint, "decoder" from any other
    pooling: Optional[str] = None  # None: finetune.DEFAULT_POOLING of the arch
    freeze: str = "none"  # none | all | all-but-N
    max_windows: int = 8  # most context windows read per text; the rest of a text is cut
    dropout: float = 0.1  # dropout in the body while fine-tuning, as BERT fine-tunes: a few
    # hundred examples are learned by heart in 100 steps without it
    max_iters: int = 300
    lr: float = 5e-4  # on real short messages (docs/experiments.md): 1e-3 sometimes overshot,
    # and early stopping then kept a model 25 steps old (0.736 test accuracy on one of six
    # seeds); 5e-4 did not, and tied or beat 1e-3 on the other five; 3e-4 learned too slowly
    warmup_iters: int = 20
    eval_interval: int = 25

    def validate(self):
        super().validate()
        _check(self.max_windows > 0, "--max-windows must be positive", self.max_windows)
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)", self.dropout)
        _check(re.fullmatch(r"none|all|all-but-[0-9]+", self.freeze),  # N is checked with the model
               "--freeze must be none, all or all-but-N", repr(self.freeze))
        return self


@dataclass(frozen=True)
class InstructSettings(FinetuneSettings):
    """`tinyllm finetune instruct`."""

    include_prompt: bool = False  # count the prompt tokens in the loss too
    max_new_tokens: int = 64  # most tokens of a generated test response
    max_iters: int = 1500
    lr: float = 1e-3
    warmup_iters: int = 50
    eval_interval: int = 100

    def validate(self):
        super().validate()
        _check(self.max_new_tokens > 0, "--max-new-tokens must be positive", self.max_new_tokens)
        return self


def settings_from_run(ckpt, cls, max_iters, out_dir):
    """The settings a run was started with (config.json "finetune"), --max-iters replaced."""
    check_resumed_total(max_iters, ckpt.iter, out_dir)
    settings = run_settings(ckpt.meta, cls, "--resume")
    # a new total in steps replaces the run's --epochs, which would otherwise set it again
    return replace(settings, max_iters=max_iters, epochs=None) if max_iters else settings


def run_settings(meta, cls, flag):
    """The settings a run was started with, from its config.json `meta`; an error starts with
    `flag`, the option that read them."""
    stored = meta.get("finetune")
    names = {f.name for f in fields(cls)}
    if not isinstance(stored, dict) or not set(stored) <= names | {"task"}:
        raise TinyLLMError(f"{flag}: the run's config.json has no valid {cls.__name__} settings")
    stored = {**cls.BEFORE_THEY_EXISTED, **stored}  # a run made before a setting did without it
    settings = cls(**{k: v for k, v in stored.items() if k in names})
    try:
        settings.validate()  # a hand-edited value of the wrong type is named, not a traceback
    except TypeError:
        raise TinyLLMError(f"{flag}: the run's config.json has a \"finetune\" setting of the"
                           " wrong type") from None
    return settings


DATA_FLAGS = ("data", "val_data", "test_data")  # the settings that name a run's data files


def stored_settings(settings):
    """Settings as config.json keeps them: data paths made absolute, so that --resume does not
    depend on the directory it is run from."""
    paths = {k: os.path.abspath(v) for k in (*DATA_FLAGS, "checkpoint")
             if (v := getattr(settings, k))}
    return dataclasses.asdict(replace(settings, **paths))


# ----------------------------------------------------------------------------- shared steps


def data_fingerprints(settings):
    """{flag: sha256 of the file} for the data files of a run (the embedded sets have none).

    A path stored in a run directory is untrusted: only a regular file is read (never a FIFO or
    a device), in 1 MiB pieces, so hashing needs no more memory than that."""
    out = {}
    for name in DATA_FLAGS:
        path = getattr(settings, name)
        if path:
            fd, _ = open_regular(path, "data file")
            digest = hashlib.sha256()
            with os.fdopen(fd, "rb") as f:
                for piece in iter(lambda: f.read(1 << 20), b""):
                    digest.update(piece)
            out[name] = digest.hexdigest()
    return out


def with_moved_data(stored, given):
    """The run's own settings, with each data file the command names again (`--resume --data
    FILE`, likewise --val-data, --test-data) read from there: a file moved since the run began.
    check_data_unchanged then holds it to the run's sha256, and the next checkpoint stores it."""
    moved = {name: getattr(given, name) for name in DATA_FLAGS if given and getattr(given, name)}
    return replace(stored, **moved)


def check_data_unchanged(ckpt, settings, out_dir):
    """--resume trains on the data the run began with, or not at all."""
    for name in DATA_FLAGS:
        if getattr(settings, name):
            check_still_there(getattr(settings, name), out_dir, "--" + name.replace("_", "-"))
    if ckpt.meta.get("data_files_sha256", {}) != data_fingerprints(settings):
        raise TinyLLMError(f"--resume: the data file(s) of this run changed since it began"
                           f" ({settings.data}); start a new run instead")


def load_base(settings, log, kinds=("gpt", "gpt-lora")):
    """(GPT params, GPTConfig, tokenizer) to fine-tune: the pretrained checkpoint (random
    weights with random_init), or without a checkpoint the default pretraining architecture and
    tokenizer at random initialisation (the from-scratch baseline of a default base model).
    `kinds`: the checkpoint kinds the command can start from."""
    rng = onp.random.default_rng(settings.seed)
    if settings.checkpoint is None:
        from .data import load_corpus
        from .tokenizers import train_tokenizer

        # The tokenizer and architecture `tinyllm pretrain` uses by default, so that a run
        # without --checkpoint is the from-scratch baseline for a default pretrained model.
        tokenizer = train_tokenizer(DEFAULT_TOKENIZER, load_corpus(None), DEFAULT_BPE_VOCAB_SIZE,
                                    special_tokens=SPECIAL_TOKENS)
        config = replace(GPTConfig(), vocab_size=tokenizer.vocab_size)
        log("base model: none (random initialisation, the default pretraining architecture)")
        return init_gpt(config, rng), config, tokenizer
    try:
        ckpt = load_checkpoint(settings.checkpoint, kind=kinds)
    except TinyLLMError as err:
        raise TinyLLMError(f"--checkpoint: {err} (expected a run of `tinyllm pretrain`)") from None
    params, config = merged_gpt(ckpt.params, ckpt.model_config)  # a LoRA run: adapters merged
    if settings.random_init:
        params = init_gpt(config, rng)
    what = "random init, same architecture" if settings.random_init else "pretrained"
    log(f"base model: {settings.checkpoint} ({what})")
    return params, config, ckpt.tokenizer


def add_unknown_token(params, config, tokenizer):
    """Give a char tokenizer its fallback token, and the model an embedding row for it,
    initialised to the mean of the other rows (a neutral "some character" vector)."""
    new_tok = with_unknown_token(tokenizer)
    extra = new_tok.vocab_size - config.vocab_size
    if extra == 0:
        return params, config, new_tok
    wte = params["wte"]
    mean_row = wte.mean(axis=0, keepdims=True).astype(wte.dtype)  # (1, C)
    params = {**params, "wte": onp.concatenate([wte] + [mean_row] * extra)}  # (V + 1, C)
    if "lm_head" in params:
        head = params["lm_head"]["w"]
        params["lm_head"] = {"w": onp.concatenate([head, head.mean(axis=1, keepdims=True)], axis=1)}
    return params, replace(config, vocab_size=new_tok.vocab_size), new_tok


def encode_all(tokenizer, texts):
    """Token lists for texts, and how many characters fell back to the unknown token."""
    out, fallback = [], 0
    for text in texts:
        ids, missing = encode_with_fallback(tokenizer, text)
        out.append(ids)
        fallback += missing
    return out, fallback


def make_train_config(settings, n_records, ranks=1):
    """The TrainConfig of a run. --epochs turns into steps: an epoch is as many examples as the
    training split has records (`n_records`; case copies are drawn from, not counted), and a
    step takes batch_size examples for each of grad_accum micro-batches on each of `ranks`
    processes. Example: 1 epoch of 42 records, batch 4, grad_accum 2, one rank -> 6 steps."""
    max_iters = settings.max_iters
    if settings.epochs is not None:
        per_step = settings.batch_size * settings.grad_accum * ranks
        max_iters = max(1, math.ceil(settings.epochs * n_records / per_step))
    return TrainConfig(batch_size=settings.batch_size, max_iters=max_iters, lr=settings.lr,
                       min_lr=settings.lr / 10, warmup_iters=settings.warmup_iters,
                       weight_decay=settings.weight_decay,
                       eval_interval=min(settings.eval_interval, max_iters), eval_iters=1,
                       seed=settings.seed, grad_accum=settings.grad_accum).validate()


def resumed_train_config(ckpt, tc, max_iters):
    """A resumed run's own TrainConfig, to the new total --max-iters gives (in `tc`), or else to
    the total the run began with, as its checkpoint holds it: not one worked out again from
    --epochs, which a run begun before an epoch counted only the records read would change."""
    return replace(ckpt.train_config, max_iters=tc.max_iters) if max_iters else ckpt.train_config


def check_step_memory(config, tc, windows_per_text):
    """Refuse a --batch-size whose steps cannot fit in memory, before any work is done (a text
    may bring up to `windows_per_text` windows into a batch)."""
    batch = replace(tc, batch_size=tc.batch_size * windows_per_text)
    check_memory(gpt_step_bytes(config, batch, gpt_param_count(config)),
                 f"a fine-tuning step with --batch-size {tc.batch_size} (context"
                 f" {config.block_size}, up to {windows_per_text} window(s) a text)")


def start_finetune_dir(out_dir, resume, force):
    """train.start_out_dir, and the report of an earlier run in out_dir removed (--force, or
    --resume of a finished run): a run that stops before its end must not show another's."""
    start_out_dir(out_dir, resume, force)
    for name in REPORT_FILES:
        if os.path.lexists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def write_report(out_dir, report):
    """metrics.json: versioned, indented, written atomically."""
    atomic_write_json(os.path.join(out_dir, "metrics.json"),
                      {"format": METRICS_FORMAT, "version": METRICS_VERSION, **report})


def _check_splits(data, *splits):
    if not all(splits):
        sizes = "/".join(str(len(s)) for s in splits)
        raise TinyLLMError(f"{data or 'the data'}: too few examples to split into train, validation"
                           f" and test ({sizes}); give more, or --val-data and --test-data")


# ----------------------------------------------------------------------------- training with the best weights kept


@dataclass
class BestWeights:
    """The best evaluation so far: its step, its validation loss, its (trainable) weights, and
    how many evaluations since have not beaten it."""

    iteration: int = -1
    val_loss: float = math.inf
    params: dict = None
    evals_since: int = 0


def run_clock(resumed=None):
    """The TrainingClock of a fine-tuning run: from 0 for a new run; for a resumed one, from what
    its checkpoint says the earlier parts took (config.json "train_seconds"), or unknown (None)
    for a checkpoint from before tinyllm kept it, which stays unknown in the checkpoints the run
    saves; this part's time is known either way."""
    return TrainingClock(0.0 if resumed is None else earlier_train_seconds(resumed.meta))


def padded_opt_state(opt_state, frozen):
    """AdamW state for the whole tree: zero moments for frozen arrays, so the checkpoint's optimizer
    file has every parameter (as checkpoint.load_checkpoint expects)."""
    zeros = {k: onp.zeros_like(v) for k, v in frozen.items()}
    return {"m": merge_params(opt_state["m"], zeros), "v": merge_params(opt_state["v"], zeros),
            "step": opt_state["step"]}


def trim_opt_state(opt_state, paths):
    """The inverse of padded_opt_state: only the moments of the trainable paths."""
    return {"m": split_params(opt_state["m"], paths)[0], "v": split_params(opt_state["v"], paths)[0],
            "step": opt_state["step"]}


def resumed_best(out_dir, ckpt, trainable):
    """BestWeights of a resumed run, from its metrics.jsonl (already cut at the checkpoint) and
    best.npz. The checkpoint itself is the best when its evaluation was the best one."""
    records = [r for r in read_metrics(out_dir) if _is_finite(r.get("val_loss"))]
    if not records:
        return BestWeights()
    top = min(records, key=lambda r: r["val_loss"])
    since = sum(1 for r in records if r["iter"] > top["iter"])
    if top["iter"] == ckpt.meta.get("weights_iter", ckpt.iter):  # the checkpoint holds the best
        return BestWeights(top["iter"], top["val_loss"], trainable, since)
    path = os.path.join(out_dir, BEST_FILE)
    best = read_npz(out_dir, BEST_FILE) if os.path.exists(path) else {}
    stamp = best.pop("_iter", None)
    if stamp is None or stamp.shape != () or stamp.dtype.kind not in "iu" or stamp != top["iter"]:
        raise TinyLLMError(f"--resume: {path} does not hold the weights of the best evaluation"
                           f" (iteration {top['iter']}); start a new run instead")
    check_arrays(best, trainable, path, ckpt.meta.get("dtype", "float32"))  # names and shapes
    return BestWeights(top["iter"], top["val_loss"], unflatten(best), since)


def _is_finite(value):
    """A finite number, as metrics.jsonl and config.json hold a loss or a time (a file from
    elsewhere may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def train_keeping_best(out_dir, params, paths, tc, loss_fn, sample, evaluate, save_full,
                       resume_ckpt, tokens_per_iter, patience, log, world=SINGLE_PROCESS):
    """Train only `paths` of `params` with train.train_loop, evaluating with `evaluate`; keep the
    weights of the evaluation with the lowest validation loss, and stop after `patience`
    evaluations without a better one (0: never stop early).

    Returns (the whole tree with the best weights, BestWeights, the final Committed state)."""
    trainable, frozen = split_params(params, paths)
    if resume_ckpt is not None:
        opt_state = trim_opt_state(resume_ckpt.opt_state, paths)
        state = Committed(trainable, opt_state, resume_ckpt.rng_state, resume_ckpt.iter,
                          resume_ckpt.meta.get("last_eval_iter", -1))
        truncate_metrics(out_dir, resume_ckpt.iter)
        best = resumed_best(out_dir, resume_ckpt, trainable)
        log(f"resuming {out_dir} at iteration {resume_ckpt.iter} of {tc.max_iters}")
    else:
        rng = onp.random.default_rng([tc.seed, 1])
        state = Committed(trainable, adamw_init(trainable), rng.bit_generator.state, 0, -1)
        best = BestWeights()

    def step_loss(trainable_params, batch, rng):
        return loss_fn(merge_params(trainable_params, frozen), batch, rng)

    def save(s):
        save_full(merge_params(s.params, frozen), padded_opt_state(s.opt_state, frozen), s,
                  best.iteration, s.iteration)

    def on_eval(record, s):
        if record["val_loss"] < best.val_loss:
            best.iteration, best.val_loss, best.params, best.evals_since = (
                s.iteration, record["val_loss"], s.params, 0)
            atomic_save_npz(os.path.join(out_dir, BEST_FILE),
                            {**flatten(s.params), "_iter": onp.array(s.iteration, onp.int64)})
        else:
            best.evals_since += 1
        if patience and best.evals_since >= patience and s.iteration < tc.max_iters:
            log(f"early stop at iteration {s.iteration}: no better validation loss in {patience}"
                f" evaluations; keeping iteration {best.iteration}")
            return True
        return False

    if resume_ckpt is not None and best.evals_since >= patience > 0:
        log(f"the run stopped early at iteration {resume_ckpt.iter} (no better validation loss"
            f" in {patience} evaluations): nothing more to train")
    else:
        # One BLAS thread, so that the float rounding, and after hundreds of steps the result,
        # is the same on any machine's thread count (the README gives runs that ended elsewhere
        # on two). It costs classification nothing and instruction steps about 15%.
        with one_blas_thread():
            state = train_loop(state, tc, step_loss, sample, save, out_dir, tokens_per_iter,
                               evaluate=lambda p: evaluate(merge_params(p, frozen)),
                               on_eval=on_eval, world=world)
    return merge_params(best.params or state.params, frozen), best, state


def finish_with_best(out_dir, whole_best, state, paths, save_full, best):
    """Make the best weights the run's checkpoint (with the final optimizer state, so --resume
    with a larger --max-iters continues from them) and remove best.npz."""
    frozen = split_params(whole_best, paths)[1]
    save_full(whole_best, padded_opt_state(state.opt_state, frozen), state, best.iteration,
              best.iteration if best.params is not None else state.iteration)
    path = os.path.join(out_dir, BEST_FILE)
    if os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------- classification


class ClassificationSplits(NamedTuple):
    train: list  # of (text, label)
    val: list
    test: list
    repeats_dropped: int  # records --dedupe dropped (0 without it)
    balance_dropped: int = 0  # records --balance dropped from the larger classes


def load_classification_splits(s, log=print):
    """Train, val and test lists of (text, label), from files or the embedded default; `log`
    is told of a header found by its labels (labelled_data.first_row_is_header).

    With --dedupe, repeats go before the split: a text is kept once in --data, and a text of
    --val-data or --test-data already in an earlier file is dropped from it."""
    examples = (read_classification(s.data, s.text_column, s.label_column, log=log) if s.data
                else default_classification_data())
    dropped = 0
    if s.dedupe:
        examples, dropped = without_repeats(examples)
    before_balance = len(examples)
    if s.balance:
        examples = balance(examples, s.data_seed)
    if s.val_data:
        train, classes = examples, {label for _, label in examples}
        val, test = (read_classification(path, s.text_column, s.label_column, classes, log)
                     for path in (s.val_data, s.test_data))
        if s.dedupe:
            (val, in_val), (test, in_test) = (without_repeats(val, train),
                                              without_repeats(test, train + val))
            dropped += in_val + in_test
            for path, kept, gone in ((s.val_data, val, in_val), (s.test_data, test, in_test)):
                if not kept:
                    raise TinyLLMError(f"{path}: --dedupe dropped all {gone} record(s): each"
                                       " text is also in an earlier file")
    else:
        train, val, test = split_three(examples, SPLIT_CLASSIFY, s.data_seed)
        _check_every_class_trains(s.data, train, val + test)
    _check_splits(s.data, train, val, test)
    return ClassificationSplits(train, val, test, dropped, before_balance - len(examples))


def _check_every_class_trains(data, train, held_out):
    """A random split can leave a rare class out of training: name it, rather than call the
    data single-class or the class unknown to the model."""
    missing = sorted({label for _, label in held_out} - {label for _, label in train})
    if missing:
        n = sum(label == missing[0] for _, label in held_out)
        raise TinyLLMError(f"{data or 'the data'}: the {n} record(s) of class"
                           f" {shown_label(missing[0])} all fell in the validation or test split,"
                           " so none is trained on: give more of them, or --val-data and"
                           " --test-data")


def encode_classification(tokenizer, examples, labels, block_size, max_windows, where,
                          counted=None):
    """(Windows, y (N,), counts) for (text, label) examples; counts has how many texts were
    read as several windows ("windowed"), cut after max_windows ("cut") and how many characters
    fell back to the unknown token ("fallback_characters"), among the first `counted` examples
    (default: all). A training split's case copies come after its records: they are trained
    on, but the counts are of the records read."""
    unknown = sorted({label for _, label in examples} - set(labels))
    if unknown:
        raise TinyLLMError(f"{where}: label {shown_label(unknown[0])} is not one the model was"
                           f" trained on ({shown_labels(labels)})")
    counted = len(examples) if counted is None else counted
    texts = [text for text, _ in examples]
    seqs, fallback = encode_all(tokenizer, texts[:counted])
    seqs += encode_all(tokenizer, texts[counted:])[0]
    empty = [i for i, s in enumerate(seqs[:counted]) if not s]  # (an empty text's copies are too)
    if empty:
        raise TinyLLMError(f"{where}: {len(empty)} example(s) have empty text (the first is"
                           f" example {empty[0] + 1})")
    windows, windowed, cut = make_windows(seqs, block_size, max_windows)
    if cut == len(seqs):
        raise TinyLLMError(f"{where}: every text is longer than {max_windows} windows of"
                           f" {block_size} tokens; raise --max-windows")
    if counted < len(seqs):  # windowing is cheap next to encoding: redo it for the counts
        windowed, cut = make_windows(seqs[:counted], block_size, max_windows)[1:]
    y = onp.asarray([labels.index(label) for _, label in examples], dtype=onp.int32)
    return windows, y, {"windowed": windowed, "cut": cut, "fallback_characters": fallback}


def shown_label(label, width=40):
    """A class name quoted for a message, cut to about `width` characters."""
    return repr(label if len(label) <= width else label[:width - 3] + "...")


def shown_labels(labels, most=10):
    """Class names for a message, at most `most` of them: a --label-column that names the text
    column by mistake makes hundreds of long "classes", and a message should stay one line.

    Example: ["a", "b", "c"], most=2 -> "'a', 'b', ... (3 classes)".
    """
    shown = ", ".join(shown_label(label) for label in labels[:most])
    return shown if len(labels) <= most else f"{shown}, ... ({len(labels)} classes)"


def accuracy(params, config, windows, y, on_batch=None):
    """Fraction of texts whose most likely class is the true one, and the predictions."""
    pred = predict_windows(params, windows, config, on_batch=on_batch).argmax(axis=1)
    return float((pred == y).mean()) if len(y) else 0.0, pred


def classify_report(params, config, labels, sets, on_batch=None):
    """Accuracy per split, and the test split's confusion matrix and per-class precision/recall;
    on_batch(texts scored so far, over all splits), if given, as the scoring goes."""
    accs, pred, scored = {}, None, 0
    for name, (windows, y) in sets.items():
        counted = (lambda done, before=scored: on_batch(before + done)) if on_batch else None
        accs[name], p = accuracy(params, config, windows, y, on_batch=counted)
        scored += len(y)
        if name == "test":
            pred = p
    matrix = confusion_matrix(sets["test"][1], pred, len(labels))
    return accs, matrix, per_class_stats(matrix, labels)


def scored_with_progress(params, config, labels, sets, n_read):
    """classify_report on the records read (a training split's case copies are trained on, not
    scored), with a line on stderr of how many texts are scored: minutes for a large file."""
    train_windows, train_y = sets["train"]
    sets = {**sets, "train": (train_windows.head(n_read), train_y[:n_read])}
    progress = Counting(sum(len(y) for _, y in sets.values()), "texts scored")
    report = classify_report(params, config, labels, sets, on_batch=progress.update)
    progress.close()
    return report


def per_class_stats(matrix, labels):
    """{label: {"precision", "recall", "support"}} from a confusion matrix."""
    precision, recall = precision_recall(matrix)
    return {label: {"precision": round(precision[i], 4), "recall": round(recall[i], 4),
                    "support": int(matrix[i].sum())} for i, label in enumerate(labels)}


def build_classifier(s, labels, log):
    """(params, ClassifierConfig, tokenizer): the base model with a fresh classification head."""
    gpt_params, gpt_config, tokenizer = load_base(s, log, kinds=("gpt", "gpt-lora", "mlm"))
    gpt_params, gpt_config, tokenizer = add_unknown_token(gpt_params, gpt_config, tokenizer)
    arch = s.arch or ("encoder" if s.checkpoint and read_meta(s.checkpoint)["kind"] == "mlm"
                      else "decoder")  # an MLM encoder was pretrained bidirectionally
    config = ClassifierConfig(**{**gpt_config.__dict__, "dropout": s.dropout},
                              n_classes=len(labels),
                              pooling=s.pooling or DEFAULT_POOLING[arch],
                              arch=arch, lora_rank=s.lora_rank,
                              lora_alpha=s.adapter_alpha).validate()
    params = classifier_from_gpt(gpt_params, config, onp.random.default_rng([s.seed, 2]))
    return params, config, tokenizer


def classification_loss_and_batches(sets, config, batch_size):
    """The loss of a batch, and sample(split, rng) drawing batch_size random texts of a split.

    A batch is a list of groups (ids, valid, assign, y), its texts split by length
    (`finetune.length_groups`), each group padded only to its own longest window; the loss is
    the mean over all the batch's texts."""

    def loss_fn(p, batch, rng):
        n = sum(len(y) for *_, y in batch)
        return sum(classifier_loss(p, ids, valid, y, config, rng, assign) * (len(y) / n)
                   for ids, valid, assign, y in batch)

    def sample(split, rng):
        windows, y = sets[split]
        texts = rng.integers(0, len(y), size=batch_size)  # (B,)
        return batch_groups(windows, y, texts)

    return loss_fn, sample


def real_tokens_per_batch(windows, batch_size):
    """The tokens a batch of `batch_size` texts holds on average, padding not counted (the
    progress line's tok/s is of these)."""
    return round(batch_size * float(windows.valid.sum()) / windows.n_texts)


def batch_groups(windows, y, texts):
    """The texts at indices `texts` as a batch for `classification_loss_and_batches`' loss: a
    list of (ids, valid, assign, y) groups of similar length."""
    return [(*windows.batch(texts[group]), y[texts[group]])
            for group in length_groups(windows.lengths(texts))]


def classification_evaluator(sets, config, loss_fn, world=SINGLE_PROCESS):
    """evaluate(params) -> {"train", "val"}: the mean loss over the whole validation split and
    over the first EVAL_TRAIN_EXAMPLES training texts, in batches of 64 (longest texts first),
    without dropout. Over MPI each rank takes every world.size-th batch and the sums are added
    across ranks."""

    def mean_loss(params, split, limit):
        windows, y = sets[split]
        n = min(len(y), limit)
        by_length = windows.head(n).longest_first()
        total = 0.0
        for start in range(world.rank * 64, n, world.size * 64):
            texts = by_length[start:start + 64]  # a batch of similar lengths pads little
            total += float(loss_fn(params, batch_groups(windows, y, texts), None)) * len(texts)
        return world.sum_floats(total)[0] / n

    return lambda params: {"train": mean_loss(params, "train", EVAL_TRAIN_EXAMPLES),
                           "val": mean_loss(params, "val", len(sets["val"][1]))}


def run_classify(out, settings=None, resume=False, force=False, max_iters=None, log=print,
                 world=SINGLE_PROCESS):
    """Fine-tune a classifier end to end; writes the run directory and returns the report dict.

    `settings` (ClassifySettings) is ignored with resume=True, where the run's own settings are
    read back, except for data files it names (see with_moved_data); `max_iters` then sets a new
    total."""
    # 1. settings
    prepare_out_dir(out, resume, force)
    ckpt = load_checkpoint(out, with_optimizer=True, kind="classifier") if resume else None
    if resume:
        check_same_ranks(ckpt.meta, world.size, out)
    s = (settings_from_run(ckpt, ClassifySettings, max_iters, out) if resume
         else (settings or ClassifySettings())).validate()
    # 2. data (a resumed run's files are checked against their sha256 before they are parsed)
    if resume:
        s = with_moved_data(s, settings)
        check_data_unchanged(ckpt, s, out)
    train, val, test, dropped, balanced = load_classification_splits(s, log)
    n_read = len(train)
    if s.case_copies:
        train = with_case_copies(train)
    labels = (ckpt.meta["labels"] if resume
              else list(label_ids([label for _, label in train], s.data or "the embedded data")))
    # 3. model
    if resume:
        params, config, tokenizer = ckpt.params, ckpt.model_config, ckpt.tokenizer
    else:
        params, config, tokenizer = build_classifier(s, labels, log)
    paths = trainable_paths(params, s.freeze, config.n_layer)
    # 4. encode
    sets, counts = encode_classify_splits(s, tokenizer, labels, config.block_size,
                                          {"train": train, "val": val, "test": test}, n_read)
    copies = f" (+ {len(train) - n_read} case copies)" if s.case_copies else ""
    log(f"data: {s.data or 'embedded docstring sentences by subject'}: {n_read} train{copies},"
        f" {len(val)} val, {len(test)} test; classes {shown_labels(labels)}")
    report_counts(counts, config.block_size, s.max_windows, log)
    repeats = {name: texts_also_in(train, split) for name, split in (("val", val),
                                                                      ("test", test))}
    if dropped:
        log(f"--dedupe: dropped {dropped} record(s) whose text an earlier record has")
    if balanced:
        log(f"--balance: dropped {balanced} record(s) of the larger classes, to keep as many of"
            " each class as the smallest has")
    note_repeats(repeats, {name: texts_also_in(train[:n_read], split) for name, split
                           in (("val", val), ("test", test))}, log)
    # 5. score before
    before = (ckpt.meta["before"] if resume
              else scored_with_progress(params, config, labels, sets, n_read)[0])
    log("accuracy before fine-tuning: " + format_accuracies(before))
    # 6. train
    start_finetune_dir(out, resume, force)
    tc = make_train_config(s, n_read, world.size)  # an epoch: the records read, not the copies
    if resume:
        tc = resumed_train_config(ckpt, tc, max_iters)
    check_step_memory(config, tc, int(sets["train"][0].count.max()))  # the most windows a text has
    log_trainable(params, paths, f"LoRA rank {config.lora_rank}: adapters and head"
                  if config.lora_rank else f"--freeze {s.freeze}", log)
    extra = {"labels": labels, "finetune": {"task": "classify", **stored_settings(s)},
             "data_files_sha256": data_fingerprints(s), "before": before, "ranks": world.size}

    def save_full(full, opt_state, st, best_iter, weights_iter):
        save_checkpoint(out, full, opt_state, st.rng_state, config, tc, tokenizer, st.iteration,
                        extra={**extra, "best_iter": best_iter, "weights_iter": weights_iter,
                               "last_eval_iter": st.last_eval_iter,
                               "train_seconds": clock.total()}, kind="classifier")

    loss_fn, sample = classification_loss_and_batches(sets, config, tc.batch_size)
    clock = run_clock(ckpt)
    params, best, state = train_keeping_best(
        out, params, paths, tc, loss_fn, sample, classification_evaluator(sets, config, loss_fn, world),
        save_full, ckpt, real_tokens_per_batch(sets["train"][0], tc.batch_size), s.patience, log,
        world)
    clock.stop()
    finish_with_best(out, params, state, paths, save_full, best)
    # 7. score after and report
    after, matrix, per_class = scored_with_progress(params, config, labels, sets, n_read)
    report = {"task": "classify", "labels": labels, "arch": config.arch, "pooling": config.pooling,
              "freeze": s.freeze, "lora_rank": config.lora_rank,
              "base": s.checkpoint, "random_init": bool(s.random_init or s.checkpoint is None),
              "examples": {"train": n_read, "val": len(val), "test": len(test)},
              "train_case_copies": len(train) - n_read,
              "accuracy_before": before, "accuracy_after": after,
              "test_confusion_matrix": matrix.tolist(), "test_per_class": per_class,
              "windowed_texts": counts["windowed"], "cut_texts": counts["cut"],
              "fallback_characters": counts["fallback_characters"],
              "texts_also_in_train": repeats, "repeats_dropped": dropped,
              "balance_dropped": balanced,
              "iterations": state.iteration, "best_iter": best.iteration,
              "best_val_loss": best.val_loss, "train_seconds": clock.total(),
              "train_seconds_this_part": clock.part()}
    write_report(out, report)
    log(f"best validation loss {best.val_loss:.4f} at iteration {best.iteration}: those weights"
        " are the run's result")
    return report


def encode_classify_splits(s, tokenizer, labels, block_size, splits, n_read):
    """(sets, counts) of a classification run: each split of `splits` ({"train": [(text,
    label)], "val": ..., "test": ...}) as context windows and label ids (`encode_classification`),
    and the texts windowed and cut and the characters read as the unknown token, summed over the
    splits. Of the training split only the first n_read records, the file's own, are counted:
    the case copies after them are trained on, not counted."""
    sets, counts = {}, {"windowed": 0, "cut": 0, "fallback_characters": 0}
    files = {"train": s.data, "val": s.val_data or s.data, "test": s.test_data or s.data}
    for name, split in splits.items():
        where = f"{files[name] or 'the embedded data'} ({name})"
        windows, y, n = encode_classification(tokenizer, split, labels, block_size, s.max_windows,
                                              where, counted=n_read if name == "train" else None)
        sets[name] = (windows, y)
        counts = {k: counts[k] + n[k] for k in counts}
    return sets, counts


def texts_also_in(train, split):
    """How many texts of `split` occur word for word in `train`, both lists of (text, label).

    A file that repeats a record can put its copies on both sides of a split, and a training
    text's case copy can be a validation or test text. Example: [("hi", "a"), ("yo", "b")],
    [("hi", "a"), ("hey", "a")] -> 1.
    """
    seen = {text for text, _ in train}
    return sum(text in seen for text, _ in split)


def note_repeats(trained, in_records, log):
    """Say how many val and test texts were trained on word for word: `trained` counts them
    among all the training texts, case copies included, `in_records` among the file's records."""
    if not (trained["val"] or trained["test"]):
        return
    copies = sum(trained.values()) - sum(in_records.values())
    log(f"note: {trained['test']} test and {trained['val']} val text(s) also occur word for word"
        " among the training texts" + (f" ({copies} only as the upper- or lower-case copy of a"
                                       " training text)" if copies else "")
        + "; a text trained on flatters the accuracy measured on it (--dedupe drops repeated"
        " records" + ("; --no-case-copies the copies)" if copies else ")"))


def report_counts(counts, block_size, max_windows, log):
    """Say how many texts were windowed or cut, and how many characters fell back."""
    if counts["windowed"]:
        log(f"note: {counts['windowed']} text(s) longer than the context ({block_size} tokens)"
            " were read as overlapping windows")
    if counts["cut"]:
        log(f"note: {counts['cut']} text(s) longer than {max_windows} windows were cut"
            " (--max-windows)")
    if counts["fallback_characters"]:
        log(f"note: {counts['fallback_characters']} character(s) unknown to the tokenizer were"
            f" mapped to {UNK_TOKEN}")


def log_trainable(params, paths, what, log):
    """One line: parameters in all, and how many train."""
    flat = flatten(params)
    n_trainable = sum(onp.size(flat[p]) for p in paths)
    log(f"model: {count_params(params):,} parameters, {n_trainable:,} trainable ({what})")


def format_accuracies(accs):
    """{"train": 0.9, "val": 0.8} -> "train 90.0%, val 80.0%"."""
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())


def format_confusion(matrix, labels):
    """The confusion matrix as aligned text, rows = true class, columns = predicted."""
    width = max(6, max(len(label) for label in labels) + 1)
    lines = [" " * width + "".join(f"{label[:width - 1]:>{width}}" for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"{label[:width - 1]:<{width}}" + "".join(f"{int(n):>{width}}" for n in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- classify (use)


class Classifier(NamedTuple):
    """A fine-tuned classifier, as `load_classifier` reads it from its run directory."""
    params: dict
    config: ClassifierConfig
    tokenizer: object
    labels: list  # class names in id order
    max_windows: int  # the --max-windows it was trained with


def load_classifier(checkpoint):
    """The `Classifier` of a fine-tuned run directory; its max_windows is the --max-windows it
    was trained with (the default for runs made before the flag)."""
    ckpt = load_checkpoint(checkpoint, kind="classifier")
    labels = ckpt.meta.get("labels")
    if not isinstance(labels, list) or len(labels) != ckpt.model_config.n_classes:
        raise TinyLLMError(f"{checkpoint}/config.json: its \"labels\" do not match the model")
    max_windows = (ckpt.meta.get("finetune") or {}).get("max_windows")
    if not (isinstance(max_windows, int) and max_windows > 0):
        max_windows = ClassifySettings.max_windows
    return Classifier(ckpt.params, ckpt.model_config, ckpt.tokenizer, labels, max_windows)


def load_classifiers(checkpoints):
    """[Classifier] of one or more run directories. Runs whose class probabilities are averaged
    must have the same classes in the same order; their tokenizers and sizes may differ."""
    members = [load_classifier(c) for c in checkpoints]
    for checkpoint, member in zip(checkpoints[1:], members[1:]):
        if member.labels != members[0].labels:
            raise TinyLLMError(f"{checkpoint}: its classes ({shown_labels(member.labels)}) are not"
                               f" those of {checkpoints[0]} ({shown_labels(members[0].labels)}) in"
                               " the same order, so their probabilities cannot be averaged")
    return members


def classify_texts(params, config, tokenizer, texts, max_windows=ClassifySettings.max_windows,
                   log=print):
    """Class probabilities (N, K) for texts; longer ones are read as windows, as in training.
    `log` is told of characters read as the unknown token and of texts cut after max_windows."""
    seqs, fallback = encode_all(tokenizer, texts)
    if any(not s for s in seqs):
        raise TinyLLMError("cannot classify an empty text")
    windows, _, cut = make_windows(seqs, config.block_size, max_windows)
    if fallback:
        log(f"note: {fallback} character(s) the model never saw were read as {UNK_TOKEN}")
    if cut:
        log(f"note: {cut} text(s) longer than {max_windows} windows of {config.block_size} tokens"
            " (the run's --max-windows) were read up to there only")
    return predict_windows(params, windows, config)


def averaged_probs(members, texts, log=print):
    """Class probabilities (N, K) of texts: the mean of the members' (`classify_texts`); a note
    that several members make (the same characters unknown to each) goes to `log` once."""
    notes = []
    probs = sum(classify_texts(m.params, m.config, m.tokenizer, texts, m.max_windows,
                               notes.append) for m in members) / len(members)
    for note in dict.fromkeys(notes):
        log(note)
    return probs


def score_examples(members, examples, where, stream=None):
    """Accuracy, confusion matrix and counts of (text, label) examples, each predicted as the
    class of highest mean probability over the members (one run: its own prediction). The
    counts ("windowed", "cut", "fallback_characters") are the most of any one member, whose
    tokenizer and context may differ from the others'. How many texts are scored so far goes to
    `stream` (default stderr)."""
    labels = members[0].labels
    progress = Counting(len(examples) * len(members), "texts scored", stream)
    total, counts = 0.0, {}
    for i, m in enumerate(members):
        windows, y, n = encode_classification(m.tokenizer, examples, labels, m.config.block_size,
                                              m.max_windows, where)
        done_before = i * len(examples)
        total = total + predict_windows(
            m.params, windows, m.config,
            on_batch=lambda done, before=done_before: progress.update(before + done))
        counts = {k: max(counts.get(k, 0), n[k]) for k in n}
    progress.close()
    pred = total.argmax(axis=1)
    return {"examples": len(y), "accuracy": float((pred == y).mean()),
            "confusion_matrix": confusion_matrix(y, pred, len(labels)), **counts}


def score_file(members, data, text_column, label_column, stream=None, log=print):
    """`tinyllm classify --data FILE`: `score_examples` on a labelled file; a note on the
    file's header goes to `log`."""
    examples = read_classification(data, text_column, label_column, set(members[0].labels), log)
    return score_examples(members, examples, data, stream)


def run_split(checkpoint, which, log=print):
    """(records, where): the (text, label) records of the validation or test split (`which`) a
    fine-tuned classifier was trained with, made again from its data as `finetune classify` made
    them (its settings: files, columns, --split-seed, --dedupe, --balance). A file the run names
    is hashed (if it is a regular file) and parsed only if its sha256 is the run's (config.json
    "data_files_sha256"), so a run directory cannot make this show another file's text."""
    meta = read_meta(checkpoint)
    s = run_settings(meta, ClassifySettings, "--split")
    for name in DATA_FLAGS:
        path = getattr(s, name)
        if path and not os.path.isfile(path):  # never opened: a FIFO would block a read
            what = ("is not a regular file" if os.path.exists(path)
                    else "is gone (moved or renamed?)")
            raise TinyLLMError(f"--split: the --{name.replace('_', '-')} file {path!r} that the run"
                               f" in {checkpoint} was fine-tuned on {what}")
    if meta.get("data_files_sha256", {}) != data_fingerprints(s):
        raise TinyLLMError(f"--split: the data file(s) of the run in {checkpoint} changed since it"
                           f" was fine-tuned ({s.data}), so its split cannot be made again")
    splits = load_classification_splits(s, log)
    file = s.test_data if which == "test" else s.val_data
    where = f"{file or s.data or 'the embedded data'} ({which})"
    return getattr(splits, which), where


def score_run_split(checkpoints, members, which, stream=None, log=print):
    """`tinyllm classify --split val|test`: `score_examples` on the runs' own split, which must
    be the same records for every run (fine-tuned on the same data with the same --split-seed)."""
    records, where = run_split(checkpoints[0], which, log)
    for checkpoint in checkpoints[1:]:
        if run_split(checkpoint, which, lambda note: None)[0] != records:
            raise TinyLLMError(f"--split {which}: the run in {checkpoint} was fine-tuned on another"
                               f" {which} split than the run in {checkpoints[0]}; runs scored"
                               " together need the same data and --split-seed")
    return {**score_examples(members, records, where, stream), "where": where}


# ----------------------------------------------------------------------------- instruction


def encode_instructions(tokenizer, records, block_size, include_prompt, where):
    """Rows (x, y, m) stacked into arrays, the number of records whose prompt lost its start
    to fit the context, and the characters that fell back to the unknown token.

    A record whose response alone (with the end-of-text token) does not fit is an error naming
    its line in `where` (the file), or its place in `records` for a record read from no file."""
    eot = tokenizer.special_tokens[EOT]
    rows, shortened, fallback = [], 0, 0
    for number, record in enumerate(records, 1):
        prompt, n1 = encode_with_fallback(tokenizer, format_prompt(record))
        response, n2 = encode_with_fallback(tokenizer, record["output"])
        fallback += n1 + n2
        kept = fit_prompt(prompt, response, block_size)
        if kept is None:  # a split is shuffled: only the file's line finds the record
            place = f":{record['line']}" if "line" in record else f": record {number}"
            raise TinyLLMError(f"{where}{place}: its response alone has"
                               f" {len(response)} tokens, more than the context"
                               f" ({block_size} tokens, with one for the prompt and one to end)")
        shortened += len(kept) < len(prompt)
        rows.append(instruction_example(kept, response, eot, block_size, include_prompt))
    longest = max(int(m.nonzero()[0].max()) + 1 for _, _, m in rows)  # trim shared padding
    x, y, m = (onp.stack([r[i][:longest] for r in rows]) for i in range(3))
    return (x, y, m), shortened, fallback


def generation_prompts(tokenizer, records, max_new_tokens, block_size):
    """(prompts, limits, shortened, fallback) for greedy responses to records. A response may
    take `max_new_tokens`, at most the reference's length plus a margin (a longer one is wrong
    anyway) and the context less one token; a prompt keeps its last tokens so that it and the
    response fit the context. `shortened` counts the prompts so cut, `fallback` their characters
    read as the unknown token."""
    prompts, limits, shortened, fallback = [], [], 0, 0
    for record in records:
        ids, missing = encode_with_fallback(tokenizer, format_prompt(record))
        reference = encode_with_fallback(tokenizer, record["output"])[0]
        limits.append(min(max_new_tokens, len(reference) + 8, block_size - 1))
        prompts.append(ids[-(block_size - limits[-1]):])
        shortened += len(prompts[-1]) < len(ids)
        fallback += missing
    return prompts, limits, shortened, fallback


def references_cut(tokenizer, records, limits):
    """How many records' references have more tokens than their response may (`limits`, from
    `generation_prompts`): --max-new-tokens or the context cuts such a response before it could
    match. Example: references of 3 and 70 tokens, limits 11 and 64 -> 1."""
    return sum(len(encode_with_fallback(tokenizer, r["output"])[0]) > limit
               for r, limit in zip(records, limits))


def score_responses(params, config, tokenizer, records, max_new_tokens, use_cache=True):
    """Greedy responses to records (decoded as one batch), with mean exact match and token F1.

    Prompts as `generation_prompts` makes them. `use_cache=False` decodes without the key/value
    cache (same responses, slower)."""
    eot = tokenizer.special_tokens[EOT]
    prompts, limits = generation_prompts(tokenizer, records, max_new_tokens, config.block_size)[:2]
    responses = greedy_batch(params, config, prompts, limits, eot, use_cache=use_cache)
    rows = [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
             "response": tokenizer.decode(new)} for r, new in zip(records, responses)]
    em = exact_match([r["response"] for r in rows], [r["reference"] for r in rows])
    f1 = sum(token_f1(r["response"], r["reference"]) for r in rows) / max(1, len(rows))
    return rows, {"exact_match": round(em, 4), "token_f1": round(f1, 4)}


def prompts_also_in(train, split):
    """How many records of `split` have the instruction and input of a record of `train`, word
    for word (the response trained on may differ). Example: train [{"instruction": "add",
    "input": "3 4", ...}], split [the same prompt, {"instruction": "add", "input": "4 3", ...}]
    -> 1."""
    seen = {(r["instruction"], r["input"]) for r in train}
    return sum((r["instruction"], r["input"]) in seen for r in split)


def instruct_splits(s):
    """(train, val, test) instruction records, from files or the embedded tasks."""
    records = read_instructions(s.data) if s.data else default_instruction_data()
    if s.val_data:
        splits = records, read_instructions(s.val_data), read_instructions(s.test_data)
    else:
        splits = split_three(records, SPLIT_INSTRUCT, s.data_seed)
    _check_splits(s.data, *splits)
    return splits


def build_instruct_model(s, log):
    """(params, config, tokenizer): the base GPT, with fresh LoRA adapters if asked for."""
    params, gpt_config, tokenizer = load_base(s, log)
    if EOT not in tokenizer.special_tokens:
        raise TinyLLMError(f"--checkpoint: its tokenizer has no {EOT} token to end responses;"
                           " pretrain with this version of tinyllm")
    params, config, tokenizer = add_unknown_token(params, gpt_config, tokenizer)
    if s.lora_rank:
        config = LoRAGPTConfig(**config.__dict__, lora_rank=s.lora_rank, lora_alpha=s.adapter_alpha)
        params = {**params, "lora": init_lora(params, s.lora_rank,
                                              onp.random.default_rng([s.seed, 3]))}
    return params, config, tokenizer


def instruct_loss_and_batches(arrays, config, batch_size):
    """The masked next-token loss of a batch (adapters applied at alpha / rank), and
    sample(split, rng) drawing batch_size random rows of a split.

    A batch is a list of groups (x, y, m), its rows split by length (`finetune.length_groups`),
    each group cut to its own longest row; the loss is the mean over all the batch's counted
    tokens, as one padded batch would give."""
    gpt_config = config.gpt() if hasattr(config, "gpt") else config
    scale = config.lora_alpha / config.lora_rank if hasattr(config, "lora_rank") else 0.0

    def loss_fn(p, batch, rng):
        if "lora" in p:
            p = apply_lora(p, scale)
        counts = [float(m.sum()) for _, _, m in batch]  # counted targets of each group
        total = sum(counts)
        return sum(gpt_loss(p, x, y, gpt_config, rng, mask=m) * (count / total)
                   for (x, y, m), count in zip(batch, counts))

    def sample(split, rng):
        rows = rng.integers(0, len(arrays[split][0]), size=batch_size)  # (B,)
        return row_groups(arrays[split], rows)

    return loss_fn, sample


def row_lengths(mask):
    """The length of each instruction row, from its loss mask (B, T) -> (B,): up to its last
    counted target (the end-of-text token), past which there is only padding.

    Example: mask [[0, 1, 1, 0], [1, 0, 0, 0]] -> [3, 1]."""
    return mask.shape[1] - onp.argmax(mask[:, ::-1] > 0, axis=1)


def row_groups(split_arrays, rows):
    """Rows `rows` of a split's (x, y, m) as a batch for `instruct_loss_and_batches`' loss: a
    list of (x, y, m) groups of similar length, each cut to its longest row."""
    lengths = row_lengths(split_arrays[2][rows])
    return [tuple(a[rows[group], :lengths[group].max()] for a in split_arrays)
            for group in length_groups(lengths)]


def instruct_evaluator(arrays, loss_fn, world=SINGLE_PROCESS):
    """evaluate(params) -> {"train", "val"}: the masked loss over the whole validation split and
    the first EVAL_TRAIN_EXAMPLES training rows, per response token, in batches of 64 (longest
    rows first). Over MPI each rank takes every world.size-th batch and the sums are added
    across ranks."""

    def mean_loss(params, split, limit):
        head = tuple(a[:limit] for a in arrays[split])
        by_length = onp.argsort(-row_lengths(head[2]), kind="stable")  # longest first
        total, weight = 0.0, 0.0
        for start in range(world.rank * 64, len(by_length), world.size * 64):
            rows = by_length[start:start + 64]  # a batch of similar lengths pads little
            w = float(head[2][rows].sum())
            total += float(loss_fn(params, row_groups(head, rows), None)) * w
            weight += w
        total, weight = world.sum_floats(total, weight)
        return total / max(weight, 1.0)

    return lambda params: {"train": mean_loss(params, "train", EVAL_TRAIN_EXAMPLES),
                           "val": mean_loss(params, "val", len(arrays["val"][0]))}


def inference_params(params, config):
    """The weights to generate with: adapters merged when there are any."""
    return merge_lora(params, config.lora_alpha, config.lora_rank) if "lora" in params else params


def run_instruct(out, settings=None, resume=False, force=False, max_iters=None, log=print,
                 use_cache=True, world=SINGLE_PROCESS):
    """Instruction-tune a GPT; writes the run directory, responses.jsonl and metrics.json.
    (`use_cache=False` generates the test responses without the key/value cache.) With
    resume=True `settings` is read as run_classify reads it."""
    # 1. settings
    prepare_out_dir(out, resume, force)
    ckpt = load_checkpoint(out, with_optimizer=True, kind=("gpt", "gpt-lora")) if resume else None
    if resume:
        check_same_ranks(ckpt.meta, world.size, out)
    if resume and (ckpt.meta.get("finetune") or {}).get("task") != "instruct":
        raise TinyLLMError(f"--resume: {out} is not an instruction fine-tuning run")
    s = (settings_from_run(ckpt, InstructSettings, max_iters, out) if resume
         else (settings or InstructSettings())).validate()
    # 2. data (a resumed run's files are checked against their sha256 before they are parsed)
    if resume:
        s = with_moved_data(s, settings)
        check_data_unchanged(ckpt, s, out)
    train, val, test = instruct_splits(s)
    # 3. model
    if resume:
        params, config, tokenizer = ckpt.params, ckpt.model_config, ckpt.tokenizer
    else:
        params, config, tokenizer = build_instruct_model(s, log)
    gpt_config = config.gpt() if hasattr(config, "gpt") else config
    # 4. encode
    arrays, shortened, fallback, cut = encode_instruct_splits(s, tokenizer, config.block_size,
                                                              train, val, test, log)
    log(f"data: {s.data or 'embedded tasks (reverse the words, uppercase, sort the words, add)'}:"
        f" {len(train)} train, {len(val)} val, {len(test)} test records")
    repeats = {name: prompts_also_in(train, split) for name, split in (("val", val),
                                                                        ("test", test))}
    if repeats["val"] or repeats["test"]:
        log(f"note: {repeats['test']} test and {repeats['val']} val record(s) have the instruction"
            " and input of a training record, word for word; a prompt trained on flatters the"
            " exact match and token F1 measured on it")
    # 5. score before
    if resume:
        before = ckpt.meta["before"]
    else:
        log(f"scoring the base model on {len(test)} test records ...")
        before = score_responses(inference_params(params, config), gpt_config, tokenizer, test,
                                 s.max_new_tokens, use_cache)[1]
    log(f"base model: exact match {100 * before['exact_match']:.1f}%, token F1"
        f" {100 * before['token_f1']:.1f}%")
    # 6. train
    start_finetune_dir(out, resume, force)
    tc = make_train_config(s, len(arrays["train"][0]), world.size)
    if resume:
        tc = resumed_train_config(ckpt, tc, max_iters)
    check_step_memory(config, tc, 1)
    flat = flatten(params)
    paths = [p for p in flat if p.startswith("lora.")] if "lora" in params else list(flat)
    log_trainable(params, paths, "LoRA adapters" if "lora" in params else "all weights", log)
    kind = "gpt-lora" if "lora" in params else "gpt"
    extra = {"finetune": {"task": "instruct", **stored_settings(s)},
             "data_files_sha256": data_fingerprints(s), "before": before, "ranks": world.size,
             "template": "Instruction: {instruction}\\nInput: {input}\\nResponse: "}

    def save_full(full, opt_state, st, best_iter, weights_iter):
        save_checkpoint(out, full, opt_state, st.rng_state, config, tc, tokenizer, st.iteration,
                        extra={**extra, "best_iter": best_iter, "weights_iter": weights_iter,
                               "last_eval_iter": st.last_eval_iter,
                               "train_seconds": clock.total()}, kind=kind)

    loss_fn, sample = instruct_loss_and_batches(arrays, config, tc.batch_size)
    clock = run_clock(ckpt)
    params, best, state = train_keeping_best(
        out, params, paths, tc, loss_fn, sample, instruct_evaluator(arrays, loss_fn, world), save_full,
        ckpt, round(tc.batch_size * row_lengths(arrays["train"][2]).mean()), s.patience, log,
        world)
    clock.stop()
    finish_with_best(out, params, state, paths, save_full, best)
    # 7. score after and report
    log(f"generating responses for {len(test)} test records ...")
    rows, after = score_responses(inference_params(params, config), gpt_config, tokenizer, test,
                                  s.max_new_tokens, use_cache)
    atomic_write_text(os.path.join(out, "responses.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = read_metrics(out)
    report = {"task": "instruct", "base": s.checkpoint, "lora_rank": s.lora_rank,
              "include_prompt": s.include_prompt,
              "records": {"train": len(train), "val": len(val), "test": len(test)},
              "shortened_records": shortened, "fallback_characters": fallback,
              "test_references_cut": cut,
              "prompts_also_in_train": repeats,
              "test_before": before, "test_after": after,
              "val_loss_before": metrics[0]["val_loss"] if metrics else None,
              "best_val_loss": best.val_loss, "best_iter": best.iteration,
              "iterations": state.iteration, "train_seconds": clock.total(),
              "train_seconds_this_part": clock.part()}
    write_report(out, report)
    return report


def encode_instruct_splits(s, tokenizer, block_size, train, val, test, log):
    """(arrays, shortened, fallback, cut) of an instruction run's splits: the training and
    validation records as batches (`encode_instructions`), the records of each split shortened
    to fit the context and the characters read as the unknown token (by split), and how many
    test references are longer than a response may be; each count is said in a note."""
    arrays, shortened, fallback = {}, {}, {}
    for name, split in (("train", train), ("val", val)):
        source = (s.val_data if name == "val" else None) or s.data
        arrays[name], shortened[name], fallback[name] = encode_instructions(
            tokenizer, split, block_size, s.include_prompt,
            source or f"the embedded tasks ({name})")
        if shortened[name]:
            log(f"note: {shortened[name]} {name} record(s) longer than the context"
                f" ({block_size} tokens) kept the end of their prompt and all of their"
                " response")
        if fallback[name]:
            log(f"note: {fallback[name]} character(s) in {name} fell back to {UNK_TOKEN}")
    _, limits, shortened["test"], fallback["test"] = generation_prompts(
        tokenizer, test, s.max_new_tokens, block_size)
    if shortened["test"]:
        log(f"note: {shortened['test']} test record(s) kept the end of their prompt, to leave"
            f" room for the response in the context ({block_size} tokens)")
    cut = references_cut(tokenizer, test, limits)
    if cut:
        log(f"note: {cut} test record(s) have a reference longer than a response may be"
            f" (--max-new-tokens {s.max_new_tokens}, context {block_size} tokens): their"
            " responses are cut there, and cannot match exactly")
    if fallback["test"]:
        log(f"note: {fallback['test']} character(s) in test prompts fell back to {UNK_TOKEN}")
    return arrays, shortened, fallback, cut


def load_generator(checkpoint):
    """(params, GPTConfig, tokenizer) of a pretrained or instruction-tuned run, adapters merged."""
    ckpt = load_checkpoint(checkpoint, kind=("gpt", "gpt-lora"))
    return (*merged_gpt(ckpt.params, ckpt.model_config), ckpt.tokenizer)


def generate_instruction(checkpoint, instruction, input_text="", max_new_tokens=200,
                         temperature=0.0, top_k=None, top_p=None, seed=None, use_cache=True,
                         log=print, on_text=None):
    """The fine-tuning prompt for an instruction (and input) plus the model's response, which
    ends at the end-of-text token (`tinyllm generate --instruction`). `on_text(piece)`, if
    given, gets the prompt and then the response as it is made, each piece final (see
    generate.TextStream): the pieces add up to the text returned. Characters a char model
    never saw are read as its unknown token, and `log` is told how many; it is told too when
    the response fills the context before it ends."""
    from .generate import check_sampling_args, complete_ids

    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not instruction.strip():
        raise TinyLLMError("--instruction is empty")
    params, config, tokenizer = load_generator(checkpoint)
    eot = tokenizer.special_tokens.get(EOT)
    prompt = format_prompt({"instruction": instruction, "input": input_text})
    ids, missing = encode_with_fallback(tokenizer, prompt)
    if missing:  # the prompt is echoed as typed: say what the model read instead
        log(f"note: {missing} character(s) the model never saw were read as {UNK_TOKEN}")
    if len(ids) >= config.block_size:
        raise TinyLLMError(f"--instruction/--input: the prompt has {len(ids)} tokens, the model's"
                           f" context is {config.block_size}")
    room = config.block_size - len(ids)  # the template must stay in view: no sliding
    emit = on_text or (lambda piece: None)
    emit(prompt)
    response, new = complete_ids(params, config, tokenizer, ids, min(max_new_tokens, room),
                                 onp.random.default_rng(seed), temperature, top_k, top_p,
                                 use_cache=use_cache, on_text=emit)
    if room < max_new_tokens and len(new) == room and new[-1] != eot:
        log(f"note: the response filled the model's context ({config.block_size} tokens) after"
            f" {room} tokens, before {EOT}: it is cut there")
    return prompt + response
