"""The training loop: steps, evaluation, progress, metrics, checkpoints, resume and Ctrl-C.

The loop is generic: it trains any `loss_fn(params, batch, rng) -> scalar` on batches drawn by
`sample(split, rng)`, so every run shares it: tinyllm/pretrain.py wires it up for next-token (or
masked-token) prediction on a text corpus, and the fine-tuning and seq2seq runs for theirs.

Reproducibility: everything random comes from one numpy Generator seeded by `--seed` (the
initial weights, then each step's batch and dropout). Evaluation batches come from a separate
Generator seeded by (seed, iteration), so evaluating never shifts the training stream. The
Generator's state is saved with every checkpoint, so a resumed run continues bit for bit.

Crash safety: the loop keeps a "committed" state, replaced as a whole only after a step has
finished and its weights were checked finite. Ctrl-C or SIGTERM saves that state (never a
half-applied step) and then stops; a second signal during a save waits until the save is
whole. A save is atomic as a whole (tinyllm/checkpoint.py), so even kill -9 leaves the last
complete checkpoint. A step that makes the loss or the weights NaN or infinite stops the run
before anything is saved: the last good checkpoint stays.

Metrics: each evaluation appends one line to metrics.jsonl *before* its checkpoint is committed
(signals held across both). If the process dies in between, the line refers to a step the
checkpoint does not have yet, and `--resume` drops it (`truncate_metrics`) and evaluates that
step again; so a resumed run never lacks a line and never has one twice. A non-finite figure is
written as null (strict JSON).

Around the loop: the state it runs on (`Committed`), the metrics file it writes, how a run's
training time adds up over its resumed parts (`TrainingClock`), and the memory a step of a GPT
needs (`check_memory`, refused before a run begins). What a run does before its loop, its run
directory and the data it keeps, is tinyllm/rundir.py.
"""

import contextlib
import errno
import functools
import json
import math
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, replace

import autograd
import numpy as onp

from .checkpoint import first_non_finite
from .distributed import SINGLE_PROCESS, micro_batch_rng, pack, rank_micro_batches, unpack
from .errors import TinyLLMError
from .fileio import atomic_write_text, available_memory, open_regular, read_fd
from .optim import adamw_step, clip_scale, global_norm, lr_at
from .progress import Counting, Progress
from .tree import flatten, unflatten


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (or SIGTERM) once the checkpoint is safely on disk."""

    def __init__(self, iteration, out_dir, signum=signal.SIGINT):
        super().__init__(f"interrupted at iteration {iteration}; checkpoint saved in {out_dir}")
        self.iteration, self.out_dir, self.signum = iteration, out_dir, signum


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `kill`, `timeout`, container stops, batch schedulers), handled as Ctrl-C."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Committed:
    """The state after a whole number of finished steps: what a checkpoint saves."""

    params: dict
    opt_state: dict
    rng_state: dict
    iteration: int
    last_eval_iter: int  # -1 if none yet
    on_disk: bool = False  # the checkpoint in the run directory already holds exactly this state


# ----------------------------------------------------------------------------- pure pieces


# An evaluation or a step that takes longer than this shows a count of its own batches as it
# goes. Both are usually short, but --eval-iters or --grad-accum (or a run's settings) can ask
# for thousands of batches, minutes or hours with no line.
QUIET_SECONDS = 5.0


def estimate_loss(loss_fn, params, sample, eval_iters, rng, group=4, world=SINGLE_PROCESS,
                  on_batches=None):
    """Mean loss over `eval_iters` batches of each split, without dropout: {"train": .., "val": ..}.

    Batches are evaluated `group` at a time, stacked into one larger batch: the same numbers
    from fewer, larger matmuls. Each group's loss is weighted by its number of batches. Over
    MPI every rank draws all the batches (the same ones), evaluates every world.size-th group
    from its rank on, and the sums are added across ranks. `on_batches(done)`, if given, is told
    how many of the 2 * eval_iters batches are done after each group.
    """
    totals = onp.zeros(2)  # (train, val) sums of loss x batches
    for i, split in enumerate(("train", "val")):
        batches = [sample(split, rng) for _ in range(eval_iters)]
        for number, start in enumerate(range(0, eval_iters, group)):
            if number % world.size == world.rank:
                chunk = batches[start:start + group]
                totals[i] += float(loss_fn(params, stack_batches(chunk), None)) * len(chunk)
            if on_batches is not None:
                on_batches(i * eval_iters + min(start + group, eval_iters))
    totals = world.allreduce_sum(totals)
    return {"train": float(totals[0]) / eval_iters, "val": float(totals[1]) / eval_iters}


def stack_batches(batches):
    """[(x1, y1), (x2, y2)] -> (x1 ++ x2, y1 ++ y2), joined along the batch axis."""
    if len(batches) == 1:
        return batches[0]
    return tuple(onp.concatenate(parts) for parts in zip(*batches))


def clipped_adamw_step(params, grads, opt_state, lr, tc):
    """Clipping and AdamW with tc's settings. Returns (params, opt_state, norm before clipping).

    Clipping scales all gradients by one factor; AdamW applies that factor as it reads them.
    """
    norm = global_norm(grads)
    params, opt_state = adamw_step(params, grads, opt_state, lr, tc.beta1, tc.beta2,
                                   tc.weight_decay, grad_scale=clip_scale(norm, tc.grad_clip))
    return params, opt_state, norm


def train_step(value_and_grad, params, opt_state, batch, lr, tc, rng):
    """One optimizer step: gradients, clipping, AdamW. Returns (params, opt_state, loss, norm)."""
    loss, grads = value_and_grad(params, batch, rng)
    params, opt_state, norm = clipped_adamw_step(params, grads, opt_state, lr, tc)
    return params, opt_state, float(loss), norm


def accumulated_step(value_and_grad, params, opt_state, micro_batches, lr, tc, world):
    """One optimizer step over several micro-batches, on one rank or many: gradients summed
    into one flat buffer (`distributed.pack`), summed across ranks by one all-reduce, divided
    by the number of micro-batches; then clipping and AdamW as in train_step.

    `micro_batches` yields this rank's (sample, rng) pairs, drawn lazily so that only one
    micro-batch's activations are alive at a time. Returns (params, opt_state, loss, norm); the
    loss is the mean over all micro-batches of all ranks.
    """
    buffer, count = None, 0
    for batch, rng in micro_batches:
        loss, grads = value_and_grad(params, batch, rng)
        part = pack(grads, float(loss), params)  # (P + 1,) float32
        buffer = part if buffer is None else onp.add(buffer, part, out=buffer)
        count += 1
    buffer = world.allreduce_sum(buffer)
    buffer *= 1.0 / (count * world.size)
    flat_grads, loss = unpack(buffer, params)
    params, opt_state, norm = clipped_adamw_step(params, unflatten(flat_grads), opt_state, lr, tc)
    return params, opt_state, loss, norm


def flat_value_and_grad(loss_fn):
    """autograd.value_and_grad of loss_fn(params, batch, rng) in its params tree, taken through a
    flat {path: array} dict.

    Why: autograd differentiates a dict lookup by adding the looked-up gradient into a
    zero-filled copy of the whole dict. A nested tree pays that at every level for every leaf;
    a flat dict pays it once. The gradients are the same; the step is ~2 ms faster.
    """
    flat_vg = autograd.value_and_grad(lambda flat, batch, rng: loss_fn(unflatten(flat), batch, rng))

    def value_and_grad(params, batch, rng):
        loss, flat_grads = flat_vg(flatten(params), batch, rng)
        return loss, unflatten(flat_grads)

    return value_and_grad


def eval_rng(seed, iteration):
    """A Generator for the evaluation at `iteration`: the same batches whenever it is re-run."""
    return onp.random.default_rng([seed, iteration])


# ----------------------------------------------------------------------------- metrics file

METRICS_MAX_BYTES = 256 << 20  # a million evaluations; more is not a metrics file


def finite_or_none(record):
    """A record for strict JSON: NaN and infinities become None (null)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def append_metrics(out_dir, record):
    """Append one JSON object as a line to out_dir/metrics.jsonl, flushed to disk.

    The file is opened without following a symbolic link and must be a regular file, so a
    crafted run directory cannot make us append to a file elsewhere.
    """
    path = os.path.join(out_dir, "metrics.jsonl")
    line = (json.dumps(finite_or_none(record), allow_nan=False) + "\n").encode("utf-8")
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TinyLLMError(f"{path} is a symbolic link; a run directory's files must be"
                               " plain files inside it") from None
        raise TinyLLMError(f"cannot write {path}: {err.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TinyLLMError(f"{path} is not a regular file")
        os.write(fd, line)
        os.fsync(fd)
    except OSError as err:
        raise TinyLLMError(f"cannot write {path}: {err.strerror}") from None
    finally:
        os.close(fd)


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl (a torn line from a crash is skipped)."""
    return read_metrics_counted(out_dir)[0]


def read_metrics_counted(out_dir):
    """(records, lines skipped) of out_dir/metrics.jsonl. A record is a JSON object whose "iter"
    is a whole number; any other line but a blank one is skipped and counted: a torn last line
    from a crash, or a line edited by hand. Example: a file whose last line is cut mid-number
    ('{"iter": 40, "train_lo') -> (the records before it, 1)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.lexists(path):
        return [], 0
    fd, size = open_regular(path, "metrics file", follow_symlinks=False)
    if size > METRICS_MAX_BYTES:
        os.close(fd)
        raise TinyLLMError(f"metrics file {path} is {size:,} bytes, more than a metrics file can be")
    text = read_fd(fd, size, "metrics file", path).decode("utf-8", "replace")
    records, skipped = [], 0
    for line in filter(str.strip, text.splitlines()):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        iteration = record.get("iter") if isinstance(record, dict) else None
        if isinstance(iteration, int) and not isinstance(iteration, bool):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def truncate_metrics(out_dir, iteration, log=None):
    """Keep only records up to `iteration`, so a resumed run does not log a step twice.
    Returns the records kept. Lines that are no record (a last line torn by a crash) go too,
    and `log`, if given, is told how many."""
    records, skipped = read_metrics_counted(out_dir)
    kept = [r for r in records if r["iter"] <= iteration]
    if skipped and log:
        log(f"note: {skipped} line(s) of metrics.jsonl were no record of an evaluation (a line"
            " torn by a crash, or edited by hand) and were dropped")
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        atomic_write_text(path, "".join(json.dumps(finite_or_none(r)) + "\n" for r in kept))
    except OSError as err:
        raise TinyLLMError(f"cannot write {path}: {err.strerror}") from None
    return kept


def logged_eval_iter(meta, records):
    """The step of a checkpoint's last evaluation if `records` (metrics.jsonl) still hold its
    line, with both losses; else -1, so that the loop evaluates and logs that step again if it
    is one to evaluate. A run resumed at its end thus always has its final line, even if the
    file lost it (deleted, or cut by hand)."""
    last = meta.get("last_eval_iter", -1)
    for r in records:
        if r["iter"] == last and all(isinstance(r.get(k), (int, float, type(None)))
                                     and k in r for k in ("train_loss", "val_loss")):
            return last
    return -1


def final_record(out_dir, iteration):
    """The metrics line of the evaluation at `iteration`, a run's last step."""
    return [r for r in read_metrics(out_dir) if r["iter"] == iteration][-1]


# ----------------------------------------------------------------------------- signals


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM stops training the way Ctrl-C does (a checkpoint, then exit)."""
    if not _in_main_thread():  # signal handlers can only be set in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held(received):
    """Hold Ctrl-C and SIGTERM while inside (a save runs to its end); their numbers go to
    `received`, for the caller to act on once the block is done. A signal this process ignores
    (as MPI ranks other than 0 do) stays ignored."""
    if not _in_main_thread():
        yield
        return
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            handlers[signum] = signal.signal(signum, lambda n, frame: received.append(n))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _interrupt_for(received):
    """The exception a held signal stands for."""
    return KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated(received[0])


# ----------------------------------------------------------------------------- the loop


def train_loop(state, tc, loss_fn, sample, save, out_dir, tokens_per_iter, log=None, lr_fn=None,
               evaluate=None, on_eval=None, world=SINGLE_PROCESS, value_and_grad=None,
               step_fn=None, train_batch=None):
    """Train from `state` (Committed) to tc.max_iters; evaluate, log and `save(state)` as we go.

    `sample(split, rng)` returns a batch for `loss_fn(params, batch, rng)`: a tuple of arrays
    whose first axis is the batch (split is "train" or "val"). `lr_fn(it)` gives the learning
    rate of step `it`; the default is warm-up plus cosine decay from tc (`optim.lr_at`).
    `evaluate(params)` gives {"train": loss, "val": loss} for an evaluation; the default
    estimates both from tc.eval_iters random batches (`estimate_loss`). `on_eval(record, state)`
    is called after each evaluation is saved and logged; if it returns True, training stops
    there (early stopping). `value_and_grad(params, batch, rng) -> (loss, grads)` replaces
    autograd's gradient of loss_fn when given (pretraining passes the hand-written fast path),
    and `step_fn(params, opt_state, batch, lr, tc, rng)` replaces `train_step` for a step of
    one batch on one process (the fast path's AdamW over flat buffers). `train_batch(rng, it)`
    gives the training batch of step `it` where it depends on the step (pretraining's short
    stage, `pretrain.staged_batches`); the default is `sample("train", rng)`.

    `tokens_per_iter` is the tokens of one micro-batch. With tc.grad_accum = K > 1 or over MPI
    (`world`, see tinyllm/distributed.py) a step averages the gradients of K micro-batches on
    each of world.size ranks, drawn by the seed layout of `distributed.micro_batch_rng`; only
    rank 0 saves and logs, and every evaluation checks that all ranks hold the same weights.

    Returns the final Committed state. On Ctrl-C or SIGTERM, saves the last committed state and
    raises TrainingInterrupted. If a step makes the loss or the weights non-finite, raises
    TinyLLMError without saving (the last good checkpoint stays).
    """
    if value_and_grad is None:
        value_and_grad = flat_value_and_grad(loss_fn)
    if step_fn is None:
        step_fn = functools.partial(train_step, value_and_grad)
    if train_batch is None:
        train_batch = functools.partial(_batch_of_any_step, sample)
    default_schedule = lr_fn is None
    if lr_fn is None:
        lr_fn = functools.partial(lr_at, lr=tc.lr, min_lr=tc.min_lr, warmup_iters=tc.warmup_iters,
                                  decay_iters=tc.max_iters)
    rng = onp.random.default_rng()
    rng.bit_generator.state = state.rng_state
    accumulate = tc.grad_accum > 1 or world.size > 1
    tokens_per_iter *= tc.grad_accum * world.size
    append = append_metrics
    if not world.is_root:
        save, log, append = skip, skip, skip
    progress = Progress(tc.max_iters, start=state.iteration)
    log = log or progress.message
    if default_schedule and state.iteration < tc.max_iters:
        note_unfinished_warmup(tc, log)
    step_seconds, steps_timed = 0.0, 0
    with sigterm_as_interrupt() if world.is_root else contextlib.nullcontext():
        try:
            while True:
                it = state.iteration
                if (it % tc.eval_interval == 0 or it == tc.max_iters) and state.last_eval_iter != it:
                    ms = 1000 * step_seconds / max(1, steps_timed)
                    world.check_same_weights(state.params, it)
                    record = _evaluate(state, tc, loss_fn, sample, ms, tokens_per_iter, lr_fn(it),
                                       evaluate, world)
                    state, received = _log_and_save(state, record, save, out_dir, log, append)
                    if received:  # a signal held during the save: stop now, the state is on disk
                        raise _interrupt_for(received)
                    step_seconds, steps_timed = 0.0, 0
                    if on_eval is not None and on_eval(record, state):
                        break
                if it >= tc.max_iters:
                    break
                t0 = time.perf_counter()
                if accumulate:
                    micro = _micro_batches(train_batch, rng, tc, it, world.rank)
                    params, opt_state, loss, _ = accumulated_step(
                        value_and_grad, state.params, state.opt_state, micro, lr_fn(it), tc, world)
                else:  # one batch on one process: the step as it has always been
                    params, opt_state, loss, _ = step_fn(
                        state.params, state.opt_state, train_batch(rng, it), lr_fn(it), tc, rng)
                _check_finite_step(loss, params, it, out_dir)
                state = Committed(params, opt_state, rng.bit_generator.state, it + 1,
                                  state.last_eval_iter)
                dt = time.perf_counter() - t0
                step_seconds, steps_timed = step_seconds + dt, steps_timed + 1
                progress.update(it + 1, loss, 1000 * dt, tokens_per_iter / dt)
        except KeyboardInterrupt as stop:
            progress.close()
            if not state.on_disk and world.is_root:
                with signals_held([]):  # a second Ctrl-C must not cut this save short
                    save(state)
            raise TrainingInterrupted(state.iteration, out_dir,
                                      getattr(stop, "signum", signal.SIGINT)) from None
    progress.close()
    return state


def note_unfinished_warmup(tc, log):
    """Say so when the warm-up is longer than the run: the learning rate of the default schedule
    (optim.lr_at) then only rises, and never reaches --lr, in pretraining as in fine-tuning.
    Example: 20 warm-up steps, 7 steps -> 7/20 of --lr."""
    if tc.warmup_iters > tc.max_iters:
        log(f"note: --warmup-iters {tc.warmup_iters} is more than the run's {tc.max_iters} steps:"
            f" the learning rate only rises, to {tc.max_iters}/{tc.warmup_iters} of --lr"
            f" ({tc.lr * tc.max_iters / tc.warmup_iters:.3g}), and never decays")


def skip(*args):
    """What a rank other than 0 does instead of saving or printing."""


def _batch_of_any_step(sample, rng, it):
    """The training batch of step `it` where it does not depend on the step: `sample("train",
    rng)` (train_loop's default)."""
    return sample("train", rng)


def _micro_batches(train_batch, rng, tc, it, rank):
    """This rank's (batch, Generator) pairs of step `it`, drawn by distributed.micro_batch_rng.
    A step longer than QUIET_SECONDS shows a count of them on rank 0."""
    counting = _quiet_counting(tc.grad_accum, f"iteration {it + 1}, micro-batches", rank == 0)
    for done, j in enumerate(rank_micro_batches(rank, tc.grad_accum), start=1):
        micro_rng = micro_batch_rng(rng, tc.seed, it, j)
        yield train_batch(micro_rng, it), micro_rng
        counting.update(done)
    counting.close()


def _quiet_counting(total, what, shown):
    """A Counting that says nothing unless its job outlasts QUIET_SECONDS (and `shown`: on rank 0
    only, as only rank 0 logs)."""
    return Counting(total, what, after_seconds=QUIET_SECONDS if shown else math.inf)


def _check_finite_step(loss, params, it, out_dir):
    """Stop before a step with a non-finite loss or weights becomes the committed state."""
    bad = None if onp.isfinite(loss) else "the loss"
    bad = bad or first_non_finite(flatten(params))
    if bad is not None:
        raise TinyLLMError(
            f"training diverged at iteration {it}: {bad} became NaN or infinite; nothing was"
            f" saved from this step (the last good checkpoint in {out_dir} is kept): try a lower"
            " --lr")


def _evaluate(state, tc, loss_fn, sample, ms_per_iter, tokens_per_iter, lr, evaluate=None,
              world=SINGLE_PROCESS):
    """The metrics record of an evaluation at state.iteration."""
    if evaluate is not None:
        losses = evaluate(state.params)
    else:
        counting = _quiet_counting(2 * tc.eval_iters, f"evaluation at iteration"
                                   f" {state.iteration}, batches", world.is_root)
        losses = estimate_loss(loss_fn, state.params, sample, tc.eval_iters,
                               eval_rng(tc.seed, state.iteration), world=world,
                               on_batches=counting.update)
        counting.close()
    return {
        "iter": state.iteration,
        "train_loss": round(losses["train"], 6),
        "val_loss": round(losses["val"], 6),
        "lr": lr,
        "ms_per_iter": round(ms_per_iter, 2),
        "tokens_per_s": round(tokens_per_iter / ms_per_iter * 1000, 1) if ms_per_iter else 0.0,
    }


def _log_and_save(state, record, save, out_dir, log, append=append_metrics):
    """Append the metrics line, then commit the checkpoint, with signals held across both.
    Returns the saved state and the signals that arrived meanwhile."""
    received = []
    with signals_held(received):
        append(out_dir, record)  # first: see the module docstring
        state = replace(state, last_eval_iter=record["iter"])
        save(state)
        state = replace(state, on_disk=True)
    log(f"iter {record['iter']}: train loss {record['train_loss']:.4f}, val loss"
        f" {record['val_loss']:.4f} (checkpoint saved)")
    return state, received


# ----------------------------------------------------------------------------- memory


def gpt_param_count(config):
    """Parameters of a GPT of this config, from its shape alone (an upper bound: biases counted)."""
    c = config.n_embd
    per_block = 12 * c * c + 13 * c  # attention 4 C^2, MLP 8 C^2, their biases, two layer norms
    head = 0 if config.tie_weights else c * config.vocab_size
    return config.vocab_size * c + config.block_size * c + config.n_layer * per_block + 2 * c + head


def gpt_step_bytes(model_config, tc, n_params):
    """A rough upper estimate of the memory one training step and one evaluation need.

    Per token and layer the backward pass keeps about 20 C activations (layer norms, q, k, v,
    the MLP's 4 C twice, residuals) and 3 H T attention weights (scores, softmax, gradient);
    the logits cost 3 V per token. Weights, gradients and the two AdamW moments cost 4 copies
    of the parameters. An evaluation stacks 4 batches (forward only) and draws all its batches
    first. Float32: 4 bytes a number.
    """
    c, t, h, v = model_config.n_embd, model_config.block_size, model_config.n_head, model_config.vocab_size
    per_token = model_config.n_layer * (20 * c + 3 * h * t) + 3 * v
    train = tc.batch_size * t * per_token * 4
    evaluate = 4 * tc.batch_size * t * per_token * 4 // 2 + 2 * tc.eval_iters * tc.batch_size * t * 8
    return 4 * n_params * 4 + max(train, evaluate)


def check_memory(needed, what):
    """Refuse work that cannot fit in the memory this machine has free, naming what to change."""
    free = available_memory()
    if needed > free:
        raise TinyLLMError(f"{what} needs about {needed / 1e9:,.1f} GB of memory and this machine"
                           f" has {free / 1e9:,.1f} GB free")


# ----------------------------------------------------------------------------- training time


class TrainingClock:
    """Seconds of training over every part of a run (a run resumed after Ctrl-C or with a larger
    --max-iters has several): `earlier`, what the parts before this one took (0 for a new run,
    None if unknown), plus this part's, from when the clock is made until stop()."""

    def __init__(self, earlier):
        self.earlier = earlier
        self.start, self.end = time.perf_counter(), None

    def stop(self):
        self.end = time.perf_counter()

    def part(self):
        """Seconds of this part, rounded to 0.1."""
        return round((self.end or time.perf_counter()) - self.start, 1)

    def total(self):
        """Seconds of every part, rounded to 0.1; None if the earlier parts' are unknown."""
        return None if self.earlier is None else round(self.earlier + self.part(), 1)


def earlier_train_seconds(meta):
    """What a resumed run's parts so far took: its config.json "train_seconds"; None if that is
    missing (a checkpoint from before tinyllm kept it) or is no time (the file is untrusted)."""
    seconds = meta.get("train_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    try:
        seconds = float(seconds)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
