"""`tinyllm pretrain`: a GPT (or an MLM encoder) trained from scratch on a text corpus, or resumed.

A run walks its steps in order (`_start_pretraining`): read the text (with --resume: the
checkpoint's settings first, then the run's own text, checked against its sha256), learn the
tokenizer, check that a step fits in memory, encode and split the text, and only then create and
lock the run directory and take the starting state (tinyllm/rundir.py). `_pretrain` then hands
next-token prediction (or masked-token prediction, tinyllm/mlm.py) to the generic loop of
tinyllm/train.py, on the hand-written fast path of tinyllm/fast.py where it applies.

Pretraining can be staged (Shortformer, Press, Smith and Lewis, 2021): its first steps read
short windows, more of them a step, and its last steps whole ones (`short_stage`,
`staged_batches`). Besides that: the special tokens every pretrained tokenizer reserves
(fine-tuning ends its responses with one), the checks that a resumed run keeps its own
objective, mask rate and stages, and the progress lines of learning BPE merges and encoding a
large corpus.
"""

import os
import time
from dataclasses import dataclass, replace
from typing import Optional

from . import fast as fast_path
from .checkpoint import load_checkpoint, save_checkpoint
from .config import (DEFAULT_BPE_VOCAB_SIZE, DEFAULT_SHORT_CONTEXT, DEFAULT_SHORT_SHARE,
                     DEFAULT_TOKENIZER, MAX_STEPS)
from .distributed import SINGLE_PROCESS
from .data import (DEFAULT_CORPUS, check_long_enough, encode_corpus, get_batch, load_corpus,
                   train_val_split)
from .errors import TinyLLMError
from .mlm import MASK_RATE, mlm_loss_and_batches
from .models import count_params, gpt_loss, init_gpt
from .rundir import (check_resumed_total, check_same_ranks, prepare_out_dir, run_corpus,
                     start_out_dir, starting_state, stored_data_name, text_fingerprint,
                     unlock_run_dir)
from .tokenizers import MASK_TOKEN, train_tokenizer
from .train import (TrainingClock, check_memory, earlier_train_seconds, final_record,
                    gpt_param_count, gpt_step_bytes, skip, train_loop)

SPECIAL_TOKENS = ("<|endoftext|>",)  # reserved now so fine-tuning can end responses with it
# Pretraining objectives -> the checkpoint kind that records them: next-token prediction makes a
# causal GPT, masked-token prediction a bidirectional encoder with the same parameter tree.
OBJECTIVES = {"clm": "gpt", "mlm": "mlm"}


@dataclass(frozen=True)
class RunRequest:
    """What a call of `pretrain` asks of the run, besides the model and training settings: where
    it lives, what it reads, and whether it starts or resumes (see `pretrain` for each field)."""

    out_dir: str
    data: Optional[str] = None  # a file, an embedded corpus's name, or None: DEFAULT_CORPUS
    tokenizer_kind: str = DEFAULT_TOKENIZER
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE
    resume: bool = False
    force: bool = False
    max_iters: Optional[int] = None  # a resumed run's new total; None keeps its own
    special_tokens: tuple = SPECIAL_TOKENS
    objective: Optional[str] = None  # None: "clm", or a resumed run's own
    mask_rate: Optional[float] = None  # None: mlm.MASK_RATE, or a resumed run's own
    short_context: int = DEFAULT_SHORT_CONTEXT
    short_share: float = DEFAULT_SHORT_SHARE


def pretrain(model_config, tc, out_dir, data=None, tokenizer_kind=DEFAULT_TOKENIZER,
             vocab_size=DEFAULT_BPE_VOCAB_SIZE, resume=False, force=False, max_iters=None,
             log=print, special_tokens=SPECIAL_TOKENS, world=SINGLE_PROCESS, fast=True,
             objective=None, mask_rate=None, short_context=DEFAULT_SHORT_CONTEXT,
             short_share=DEFAULT_SHORT_SHARE):
    """Pretrain a GPT on a corpus (a file or an embedded name) and keep checkpoints in out_dir.

    `objective` is "clm" (next-token prediction, the default) or "mlm" (the same blocks as a
    bidirectional encoder, trained by masked-token prediction: tinyllm/mlm.py); the checkpoint's
    kind records it ("gpt" or "mlm"). With resume=True the model, tokenizer, objective and
    training settings come from the checkpoint; only `max_iters` may be changed (an `objective`
    given must be the run's), and `data` may say where the run's own text is now (its sha256 is
    checked); `mask_rate` is the share of positions an MLM step predicts (None: mlm.MASK_RATE,
    15%; a resumed run keeps its own). The first `short_share` of the steps read windows of
    `short_context` tokens (`short_stage`; 0, the default: whole windows throughout; a resumed
    run keeps its own stages). Returns a summary dict ("seconds": this call's training time,
    "train_seconds": the run's over every part, None if a checkpoint from before tinyllm kept it
    was resumed). The run directory is locked for the whole call. Over MPI (`world`, see
    tinyllm/distributed.py) rank 0 alone reads the data and the run directory and sends the
    others what they need; the whole job trains one model, and only rank 0 writes. `fast` takes
    the hand-written forward and backward of tinyllm/fast.py where it applies (dropout 0, either
    objective); False, or dropout on, differentiates the reference model with autograd. Both
    give the same losses up to float32 rounding.
    """
    log = log if world.is_root else skip
    request = RunRequest(out_dir, data, tokenizer_kind, vocab_size, resume, force, max_iters,
                         special_tokens, objective, mask_rate, short_context, short_share)
    world.from_root(lambda: prepare_out_dir(out_dir, resume, force))
    try:
        return _pretrain(model_config, tc, request, log, world, fast)
    finally:
        if world.is_root:
            unlock_run_dir(out_dir)


def _pretrain(model_config, tc, request, log, world, fast):
    if request.objective not in (None, *OBJECTIVES):
        raise TinyLLMError(f"--objective must be one of {', '.join(OBJECTIVES)}, not"
                           f" {request.objective!r}")
    if request.mask_rate is not None and not 0 < request.mask_rate < 1:
        raise TinyLLMError(f"--mask-rate must be between 0 and 1, got {request.mask_rate}")
    model_config, tc, tokenizer, splits, state, extra, objective = world.from_root(
        lambda: _start_pretraining(model_config, tc, request, log, world.size))
    out_dir = request.out_dir

    if objective == "mlm":
        loss_fn, sample = mlm_loss_and_batches(splits, model_config, tc.batch_size, tokenizer,
                                               extra["mask_rate"])
    else:
        loss_fn, sample = next_token_loss_and_batches(splits, model_config, tc.batch_size)
    train_batch = staged_batches(sample, tc.batch_size, model_config.block_size,
                                 extra["short_context"])

    def save(s):
        save_checkpoint(out_dir, s.params, s.opt_state, s.rng_state, model_config, tc, tokenizer,
                        s.iteration, extra={**extra, "train_seconds": clock.total(),
                                            "last_eval_iter": s.last_eval_iter},
                        kind=OBJECTIVES[objective])

    clock = TrainingClock(extra["train_seconds"])
    use_fast = fast and fast_path.supports(model_config)  # else autograd on the reference model
    fast_grads = fast_path.gpt_value_and_grad(model_config, objective) if use_fast else None
    fast_step = fast_path.gpt_train_step(model_config, objective) if use_fast else None
    if use_fast:  # evaluations too: the forward pass alone, on the fast path
        loss_fn = fast_path.gpt_loss_fn(model_config, objective)
    state = train_loop(state, tc, loss_fn, sample, save, out_dir,
                       tc.batch_size * model_config.block_size, world=world,
                       value_and_grad=fast_grads, step_fn=fast_step, train_batch=train_batch)
    clock.stop()
    final = world.from_root(lambda: final_record(out_dir, state.iteration))
    return {"params": state.params, "model_config": model_config, "tokenizer": tokenizer,
            "seconds": clock.part(), "train_seconds": clock.total(), "final": final,
            "objective": objective, "val_ids": splits["val"]}


def next_token_loss_and_batches(splits, model_config, batch_size):
    """(loss_fn, sample) of causal pretraining: the next-token loss of a batch, and random
    windows of a split's tokens with their next tokens (`data.get_batch`): `sample(split, rng,
    rows=batch_size, length=block_size)`. The masked-token objective's pair is
    `mlm.mlm_loss_and_batches`."""

    def loss_fn(params, batch, rng):
        return gpt_loss(params, batch[0], batch[1], model_config, rng)

    def sample(split, rng, rows=batch_size, length=model_config.block_size):
        return get_batch(splits[split], rows, length, rng)

    return loss_fn, sample


# ----------------------------------------------------------------------------- staged training


def short_stage(tokens, share, block_size, max_iters):
    """The short stage of a new run, as config.json keeps it: {"tokens": T_s, "steps": S}, or
    None when every step reads whole windows (tokens 0, or not shorter than the context).

    Steps 0 to S - 1 read windows of T_s tokens, S = round(share * max_iters); the later ones,
    and every evaluation, read whole ones (`staged_batches`). T_s must divide the context, so
    that a short step holds as many tokens as a whole one. Example: tokens 64, share 0.8,
    block_size 256, max_iters 900 -> {"tokens": 64, "steps": 720}.
    """
    if not 0 <= share <= 1:
        raise TinyLLMError(f"--short-share must be between 0 and 1, got {share}")
    if tokens < 0:
        raise TinyLLMError(f"--short-context must not be negative, got {tokens}")
    steps = round(share * max_iters)
    if tokens == 0 or tokens >= block_size or steps == 0:
        return None
    if block_size % tokens:
        raise TinyLLMError(f"--short-context ({tokens}) must divide --block-size ({block_size}),"
                           " so that a short step holds as many tokens as a whole one; 0 turns"
                           " the short stage off")
    return {"tokens": tokens, "steps": steps}


def short_rows(batch_size, block_size, stage):
    """Windows a step of the short stage draws: as many tokens as a whole batch holds.
    Example: batch 8, block 256, 64-token windows -> 32."""
    return batch_size * block_size // stage["tokens"]


def staged_batches(sample, batch_size, block_size, stage):
    """train_batch(rng, it) for train.train_loop: the training batch of step `it`.

    In the short stage (it < stage["steps"]) a batch is block_size / T_s times as many windows of
    T_s tokens as a whole batch has rows, so every step trains on batch_size x block_size
    tokens: the same tokens a step, each predicted from at most T_s - 1 tokens before it. The
    later steps read whole windows and so train the positions past T_s; a model whose windows
    were short throughout would meet those positions untrained. None for no stage: every batch
    is `sample("train", rng)`. Example: batch 8, block 256, {"tokens": 64, "steps": 720} ->
    steps 0-719 draw (32, 64) batches, steps 720 on (8, 256).
    """
    if stage is None:
        return None
    tokens, steps = stage["tokens"], stage["steps"]
    rows = short_rows(batch_size, block_size, stage)

    def train_batch(rng, it):
        if it < steps:
            return sample("train", rng, rows, tokens)
        return sample("train", rng)

    return train_batch


def _start_pretraining(model_config, tc, request, log, ranks=1):
    """Load (or resume) the data, tokenizer, settings and starting state of a pretraining run
    (`request`, a RunRequest), with every check made before the run directory is touched.
    Returns (model_config, tc, tokenizer, splits, state, extra, objective): `extra` is what each
    checkpoint adds to config.json (with "short_context", and an MLM run's "mask_rate"),
    `objective` the run's ("clm" or "mlm")."""
    out_dir, data, objective = request.out_dir, request.data, request.objective
    if request.resume:
        ckpt = load_checkpoint(out_dir, with_optimizer=True, kind=tuple(OBJECTIVES.values()))
        objective = resumed_objective(ckpt.meta["kind"], objective, out_dir)
        mask_rate = stored_mask_rate(ckpt.meta, out_dir)
        stage = stored_short_stage(ckpt.meta, out_dir, ckpt.model_config.block_size)
        check_same_ranks(ckpt.meta, ranks, out_dir)
        model_config, tokenizer = ckpt.model_config, ckpt.tokenizer
        check_resumed_total(request.max_iters, ckpt.iter, out_dir)
        tc = replace(ckpt.train_config, max_iters=request.max_iters or ckpt.train_config.max_iters)
        tc.validate()
        text = run_corpus(ckpt.meta, out_dir, data)  # checked against its sha256 before any use
        data = data or ckpt.meta.get("data")
    else:
        tc.validate()
        objective, mask_rate = objective or "clm", request.mask_rate
        stage = short_stage(request.short_context, request.short_share, model_config.block_size,
                            tc.max_iters)
        text = load_corpus(data)
        special_tokens = ((*request.special_tokens, MASK_TOKEN) if objective == "mlm"
                          else request.special_tokens)
        if request.tokenizer_kind == "bpe":
            log(f"tokenizer: learning BPE merges from {len(text):,} characters ...")
        tokenizer = train_tokenizer(request.tokenizer_kind, text, request.vocab_size,
                                    special_tokens=special_tokens, progress=merges_progress(log))
        if tokenizer.kind == "bpe" and tokenizer.vocab_size < request.vocab_size:
            log(f"tokenizer: the text has no pair of tokens left to merge after"
                f" {len(tokenizer.merges):,} merges: its vocabulary is {tokenizer.vocab_size:,},"
                f" not the {request.vocab_size:,} of --vocab-size")
        model_config = replace(model_config, vocab_size=tokenizer.vocab_size)
    model_config.validate()
    check_memory(gpt_step_bytes(model_config, tc, gpt_param_count(model_config)),
                 f"a step of this model (--n-layer {model_config.n_layer}, --n-embd"
                 f" {model_config.n_embd}, vocabulary {model_config.vocab_size}) with --batch-size"
                 f" {tc.batch_size} and --block-size {model_config.block_size}")
    ids = encode_corpus(tokenizer, text, encoding_progress(log))
    splits = dict(zip(("train", "val"), train_val_split(ids)))
    for name, split_ids in splits.items():
        check_long_enough(split_ids, model_config.block_size,
                          f"the {name} split of {data or DEFAULT_CORPUS}", tokenizer.kind,
                          next_token=objective == "clm")
    start_out_dir(out_dir, request.resume, request.force)

    state = starting_state(out_dir, tc, lambda rng: init_gpt(model_config, rng),
                           ckpt if request.resume else None, log)
    log(f"data: {data or DEFAULT_CORPUS + ' (embedded default)'}, {len(text):,} characters ->"
        f" {len(ids):,} {tokenizer.kind} tokens (vocab {tokenizer.vocab_size});"
        f" model: {count_params(state.params):,} parameters"
        + (f"; {ranks} MPI ranks" if ranks > 1 else ""))
    if stage is not None:
        log(f"stages: steps 0 to {stage['steps'] - 1} read windows of {stage['tokens']} tokens"
            f" ({short_rows(tc.batch_size, model_config.block_size, stage)} a step), the later"
            f" ones whole windows of {model_config.block_size} ({tc.batch_size} a step)")
    extra = {"data": stored_data_name(data), "data_sha256": text_fingerprint(text),
             "data_characters": len(text), "ranks": ranks, "short_context": stage,
             # and the time of the parts before this one (each save adds its own)
             "train_seconds": earlier_train_seconds(ckpt.meta) if request.resume else 0.0}
    if objective == "mlm":
        extra["mask_rate"] = MASK_RATE if mask_rate is None else mask_rate
    return model_config, tc, tokenizer, splits, state, extra, objective


# ----------------------------------------------------------------------------- resuming


def resumed_objective(kind, objective, out_dir):
    """The objective of the run being resumed; one given on the command line must match it."""
    stored = {k: o for o, k in OBJECTIVES.items()}[kind]
    if objective is not None and objective != stored:
        raise TinyLLMError(f"--resume: the run in {out_dir} was pretrained with --objective"
                           f" {stored}, not {objective}")
    return stored


def stored_mask_rate(meta, out_dir):
    """An MLM run's "mask_rate" (MLM runs made before the flag have none: 15%), read from an
    untrusted config.json, so it must be a number strictly between 0 and 1."""
    rate = meta.get("mask_rate", MASK_RATE)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise TinyLLMError(f"{os.path.join(out_dir, 'config.json')}: \"mask_rate\" must be a"
                           " number between 0 and 1")
    return float(rate)


def stored_short_stage(meta, out_dir, block_size):
    """A run's "short_context" (`short_stage`), read from an untrusted config.json: null, or
    {"tokens": T_s, "steps": S} with T_s a divisor of the context below it and S a step count.
    Runs made before the stages have none: whole windows throughout."""
    stage = meta.get("short_context")
    if stage is None:
        return None
    ok = (isinstance(stage, dict) and set(stage) == {"tokens", "steps"}
          and all(type(stage[key]) is int for key in stage)
          and 0 < stage["tokens"] < block_size and block_size % stage["tokens"] == 0
          and 0 < stage["steps"] <= MAX_STEPS)
    if not ok:
        raise TinyLLMError(f"{os.path.join(out_dir, 'config.json')}: \"short_context\" must be"
                           " null or {\"tokens\": a divisor of the context below it, \"steps\":"
                           " a positive step count}")
    return dict(stage)


# ----------------------------------------------------------------------------- tokenizer progress


def merges_progress(log, every_seconds=5.0):
    """A progress(done, total) callback for BPE training that logs a line every few seconds.

    The embedded corpus (1.8 MB) learns its 1,791 merges in about 2 s; a 1 MB run of letters
    without a space (DNA, say: one chunk) in about 13 s.
    """
    return tokenizer_progress(log, "merges learned", every_seconds)


def encoding_progress(log, every_seconds=5.0):
    """A progress(done, total) callback for encoding the corpus (`data.encode_corpus`) that logs
    a line every few seconds. The embedded corpus (1.8 MB) encodes in about 0.7 s with BPE and
    0.15 s with the char tokenizer, so 100 MB of text takes about a minute, or 10 s."""
    return tokenizer_progress(log, "characters encoded", every_seconds)


def tokenizer_progress(log, what, every_seconds):
    """progress(done, total) that logs "tokenizer: {done} of {total} {what}" once `every_seconds`
    have passed since it was made or last logged: nothing for a job quicker than that."""
    last = time.perf_counter()

    def progress(done, total):
        nonlocal last
        if time.perf_counter() - last >= every_seconds:
            last = time.perf_counter()
            log(f"tokenizer: {done:,} of {total:,} {what}")

    return progress
