"""Fine-tuning runs: the settings and steps `tinyllm finetune classify|instruct` share.

A run is a settings dataclass (`FinetuneSettings`, subclassed by classify_run.ClassifySettings
and instruct_run.InstructSettings: every flag, with its default) plus a straight sequence of
named steps, which classify_run.run_classify and instruct_run.run_instruct each walk:

    1. settings      from the flags, or from the run's config.json when resuming
    2. data          read, check, split (and check that a resumed run's files did not change)
    3. model         the base model turned into the model to fine-tune, or the resumed one
    4. encode        texts to token windows / instruction rows, counting what was cut or windowed
    5. score before  accuracy, or exact match and token F1, of the untrained model
    6. train         train.train_loop on the trainable parameters, evaluating the whole
                     validation split; the best evaluation's weights are kept and the run stops
                     after `patience` evaluations without improvement (early stopping):
                     `train_run` and `train_keeping_best`, here
    7. score after   with the best weights, then the report

This module holds what the two share: the settings both have, the base model, the training
config, the run directory, and training with the best weights kept. The runners hold no Click
code, so tests and scripts can call them; tinyllm/cli_finetune.py only maps flags onto the
settings.

A fine-tuning run directory is a checkpoint (see tinyllm/checkpoint.py) plus:
    metrics.jsonl     the training loop's evaluations (whole-split losses), as in pretraining
    best.npz          while training: the weights of the best evaluation so far (parameter
                      arrays and "_iter", as model.npz); at the end they become the checkpoint's
                      weights and the file is removed
    metrics.json      the final report: {"format": "tinyllm-finetune-metrics", "version": 2,
                      "task": "classify" | "instruct", ...} (see classify_run.classify_report
                      and instruct_run.run_instruct)
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
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as onp

from .checkpoint import check_arrays, check_field_types, load_checkpoint, read_npz
from .config import (DEFAULT_BPE_VOCAB_SIZE, DEFAULT_TOKENIZER, MAX_STEPS, GPTConfig,
                     TrainConfig)
from .data import MAX_TEXT_BYTES
from .distributed import SINGLE_PROCESS
from .errors import TinyLLMError
from .fileio import atomic_save_npz, atomic_write_json, open_regular
from .finetune import merge_params, split_params
from .labelled_data import encode_with_fallback, with_unknown_token
from .lora import merged_gpt
from .models import count_params, init_gpt
from .optim import adamw_init
from .pretrain import SPECIAL_TOKENS
from .rundir import check_resumed_total, check_still_there, start_out_dir
from .system import one_blas_thread
from .train import (Committed, TrainingClock, check_memory, earlier_train_seconds, gpt_param_count,
                    gpt_step_bytes, read_metrics, train_loop, truncate_metrics)
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
    lr: float = 3e-4  # a subclass may default it to None: set by the run from its base
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
        check_flag(self.lora_rank >= 0, "--lora-rank must not be negative", self.lora_rank)
        if self.lora_alpha is not None:
            check_flag(math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                       "--lora-alpha must be a positive number", self.lora_alpha)
        if self.epochs is not None:
            check_flag(math.isfinite(self.epochs) and self.epochs > 0,
                       "--epochs must be a positive number", self.epochs)
        for name in ("batch_size", "max_iters", "eval_interval", "grad_accum"):
            check_flag(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive",
                       getattr(self, name))
        for name in ("warmup_iters", "patience", "seed"):
            value = getattr(self, name)  # warmup_iters None: set by the run, as lr
            check_flag(value is None or value >= 0,
                       f"--{name.replace('_', '-')} must not be negative", value)
        if self.split_seed is not None:
            check_flag(self.split_seed >= 0, "--split-seed must not be negative", self.split_seed)
        if self.lr is not None:  # None: set by the run (classify_run.with_base_defaults)
            check_flag(math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number",
                       self.lr)
        check_flag(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
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


def check_flag(ok, message, value):
    """Raise TinyLLMError "message, got value" unless ok (a flag's check in validate)."""
    if not ok:
        raise TinyLLMError(f"{message}, got {value}")


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
    check_field_types(cls, stored, f"{flag}: the run's config.json \"finetune\"")
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
    a device), at most MAX_TEXT_BYTES, the most any data file may hold, and only the bytes its
    size says (a file like /proc/self/pagemap says 0 and reads hundreds of gigabytes), in 1 MiB
    pieces, so hashing needs no more memory than that."""
    out = {}
    for name in DATA_FLAGS:
        path = getattr(settings, name)
        if path:
            fd, size = open_regular(path, "data file")
            if size > MAX_TEXT_BYTES:
                os.close(fd)
                raise TinyLLMError(f"data file {path!r} is {size / 1e6:,.0f} MB: too large (at"
                                   f" most {MAX_TEXT_BYTES / 1e6:,.0f} MB)")
            digest, left = hashlib.sha256(), size
            with os.fdopen(fd, "rb") as f:
                while left > 0:
                    piece = f.read(min(left, 1 << 20))
                    if not piece:
                        break
                    digest.update(piece)
                    left -= len(piece)
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
        if max_iters > MAX_STEPS:  # a checkpoint holds at most MAX_STEPS: none could load it
            raise TinyLLMError(f"--epochs {settings.epochs:g} of {n_records} records is"
                               f" {max_iters:,} steps, more than the {MAX_STEPS:,} a run may take")
    # The loop evaluates at the last step whatever the interval, so an interval longer than the
    # run is kept as given: a --resume to a larger --max-iters then evaluates as asked.
    return TrainConfig(batch_size=settings.batch_size, max_iters=max_iters, lr=settings.lr,
                       min_lr=settings.lr / 10, warmup_iters=settings.warmup_iters,
                       weight_decay=settings.weight_decay, eval_interval=settings.eval_interval,
                       eval_iters=1, seed=settings.seed, grad_accum=settings.grad_accum).validate()


def note_batch_over_split(batch_size, n_texts, log):
    """Say so when a batch holds more texts than the training split has: each batch draws its
    texts at random, with replacement, so it repeats some in every step. Example: batch 16 of
    10 texts -> "note: --batch-size 16 is more than the 10 training texts: ..."."""
    if batch_size > n_texts:
        log(f"note: --batch-size {batch_size} is more than the {n_texts} training texts: each"
            " batch draws texts at random with replacement, so it repeats some every step")


def resumed_train_config(ckpt, tc, max_iters):
    """A resumed run's own TrainConfig, to the new total --max-iters gives (in `tc`), or else to
    the total the run began with, as its checkpoint holds it: not one worked out again from
    --epochs, which a run begun before an epoch counted only the records read would change.
    A new total takes the run's --eval-interval from `tc` too: a run saved before tinyllm kept
    an interval longer than the run holds the run's length as its interval."""
    if not max_iters:
        return ckpt.train_config
    return replace(ckpt.train_config, max_iters=tc.max_iters, eval_interval=tc.eval_interval)


def check_step_memory(config, tc, windows_per_text):
    """Refuse a --batch-size whose steps cannot fit in memory, before any work is done (a text
    may bring up to `windows_per_text` windows into a batch)."""
    batch = replace(tc, batch_size=tc.batch_size * windows_per_text)
    check_memory(gpt_step_bytes(config, batch, gpt_param_count(config)),
                 f"a fine-tuning step with --batch-size {tc.batch_size} (context"
                 f" {config.block_size}, up to {windows_per_text} window(s) a text)")


def start_finetune_dir(out_dir, resume, force):
    """rundir.start_out_dir, and the report of an earlier run in out_dir removed (--force, or
    --resume of a finished run): a run that stops before its end must not show another's."""
    start_out_dir(out_dir, resume, force)
    for name in REPORT_FILES:
        if os.path.lexists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def write_report(out_dir, report):
    """metrics.json: versioned, indented, written atomically."""
    atomic_write_json(os.path.join(out_dir, "metrics.json"),
                      {"format": METRICS_FORMAT, "version": METRICS_VERSION, **report})


def check_splits(data, *splits):
    """Refuse a split into train, validation and test that leaves one of them empty."""
    if not all(splits):
        sizes = "/".join(str(len(s)) for s in splits)
        raise TinyLLMError(f"{data or 'the data'}: too few examples to split into train, validation"
                           f" and test ({sizes}); give more, or --val-data and --test-data")


def log_trainable(params, paths, what, log):
    """One line: parameters in all, and how many train."""
    flat = flatten(params)
    n_trainable = sum(onp.size(flat[p]) for p in paths)
    log(f"model: {count_params(params):,} parameters, {n_trainable:,} trainable ({what})")


# ------------------------------------------------------------- training with the best weights kept


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
    return {"m": split_params(opt_state["m"], paths)[0],
            "v": split_params(opt_state["v"], paths)[0], "step": opt_state["step"]}


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
        truncate_metrics(out_dir, resume_ckpt.iter, log)
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


def train_run(out_dir, ckpt, params, paths, tc, loss_fn, sample, evaluate, tokens_per_iter,
              patience, log, world, save):
    """Step 6 of a run: train with the best weights kept (`train_keeping_best`), timed over
    every --resume (`run_clock`), then make the best weights the run's checkpoint.

    save(params, opt_state, state, fields) writes a checkpoint whose config.json adds `fields`:
    "best_iter", "weights_iter", "last_eval_iter" and "train_seconds".
    Returns (the whole tree with the best weights, BestWeights, final Committed state, clock)."""
    clock = run_clock(ckpt)

    def save_full(full, opt_state, st, best_iter, weights_iter):
        save(full, opt_state, st, {"best_iter": best_iter, "weights_iter": weights_iter,
                                   "last_eval_iter": st.last_eval_iter,
                                   "train_seconds": clock.total()})

    params, best, state = train_keeping_best(out_dir, params, paths, tc, loss_fn, sample,
                                             evaluate, save_full, ckpt, tokens_per_iter, patience,
                                             log, world)
    clock.stop()
    finish_with_best(out_dir, params, state, paths, save_full, best)
    return params, best, state, clock


def finish_with_best(out_dir, whole_best, state, paths, save_full, best):
    """Make the best weights the run's checkpoint (with the final optimizer state, so --resume
    with a larger --max-iters continues from them) and remove best.npz."""
    frozen = split_params(whole_best, paths)[1]
    save_full(whole_best, padded_opt_state(state.opt_state, frozen), state, best.iteration,
              best.iteration if best.params is not None else state.iteration)
    path = os.path.join(out_dir, BEST_FILE)
    if os.path.exists(path):
        os.remove(path)
