"""Where the time of one training step goes, on the reference path and on the fast path.

At nanoGPT's CPU recipe size (vocabulary 65, 4 layers, 4 heads, 128 channels, block 64, batch
12, no biases), or with --model default at the size plain `tinyllm pretrain` trains (vocabulary
2048, block 256, batch 8, the rest the same), on one fixed batch, for each path:

- step in the loop: `train.train_loop` itself, per step (batch sampling, the finite check,
  the progress bar and the committed state included; evaluation and saving stubbed out);
- step alone: the step function called in a loop (gradients, clipping, AdamW);
- forward + backward: the loss and its gradients alone;
- matmuls: every matrix product of the forward and backward pass, replayed alone in numpy at
  its shape (the same FLOPs for both paths: they are the model's); for the fast path as it runs
  them, two halves of the batch at once with one BLAS thread each (`ops.run_both`);
- bookkeeping: the forward + backward of the same architecture shrunk until its arithmetic is
  negligible (batch 1, 2 tokens, 8 channels): what is left is the cost per traced op, the tape,
  boxed arrays and gradient trees (for the fast path: its Python glue);
- elementwise: forward + backward - matmuls - bookkeeping (layer norms, GELU, softmax,
  cross-entropy, residual adds, copies);
- optimizer: the gradient norm and AdamW alone (`optim.adamw_step` over the tree; the fast
  path packs the gradients and steps its flat buffers);
- loop overhead: step in the loop - step alone.

Each figure is the median over --repeats blocks of --steps calls, in wall-clock and in CPU time
(CPU time is steadier on a busy machine; with 2 BLAS threads it counts both cores).

    python benchmarks/profile_step.py [--repeats 7] [--steps 10] [--model default]
    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_step.py    # one core
"""

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm import fast  # noqa: E402
from tinyllm.config import GPTConfig, TrainConfig  # noqa: E402
from tinyllm.models import gpt_loss, init_gpt  # noqa: E402
from tinyllm.ops import run_both  # noqa: E402
from tinyllm.optim import adamw_init, adamw_step, global_norm  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.train import Committed, flat_value_and_grad, train_loop, train_step  # noqa: E402

MODELS = {  # --model: (the model, its training batch)
    "recipe": (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                         bias=False), TrainConfig(batch_size=12)),
    "default": (GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128,
                          bias=False), TrainConfig(batch_size=8)),
}
TINY = GPTConfig(vocab_size=65, block_size=2, n_layer=4, n_head=4, n_embd=8, bias=False)


def timed(fn, repeats, steps):
    """Median (wall ms, CPU ms) per call of fn() over `repeats` blocks of `steps` calls."""
    fn()  # warm up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        wall.append(1000 * (time.perf_counter() - w0) / steps)
        cpu.append(1000 * (time.process_time() - c0) / steps)
    return statistics.median(wall), statistics.median(cpu)


def matmul_replay(config, b, blocked):
    """A function running every matmul of one training step of `config` at batch b, alone;
    blocked: causal attention in blocks of query rows, as the fast path takes it (else whole)."""
    rng = onp.random.default_rng(0)
    t, c, h, v = config.block_size, config.n_embd, config.n_head, config.vocab_size
    n, d = b * t, c // h
    rand = lambda *shape: rng.standard_normal(shape).astype("float32")  # noqa: E731
    linears = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] * config.n_layer + [(c, v)]
    operands = [(rand(n, i), rand(i, o), rand(n, o)) for i, o in linears]
    q, k, p = rand(b, h, t, d), rand(b, h, t, d), rand(b, h, t, t)
    blocks = fast.query_blocks(t, causal=True) if blocked else [(slice(0, t), t)]

    def run():
        for x, w, dy in operands:  # forward, then the two gradients
            x @ w
            dy @ w.T
            x.T @ dy
        for _ in range(config.n_layer):
            for rows, keys in blocks:  # scores, weights x values; dP and dq back
                scores = p[..., rows, :keys]
                q[..., rows, :] @ onp.swapaxes(k[..., :keys, :], -1, -2)
                scores @ k[..., :keys, :]
                q[..., rows, :] @ onp.swapaxes(k[..., :keys, :], -1, -2)
                scores @ k[..., :keys, :]
            for cols, _ in blocks:  # dv and dk, from the query rows that see the keys
                seen_by = slice(cols.start, None)
                onp.swapaxes(p[..., seen_by, cols], -1, -2) @ q[..., seen_by, :]
                onp.swapaxes(p[..., seen_by, cols], -1, -2) @ q[..., seen_by, :]

    return run


def loop_per_step(step_fn, params, batch, steps, tc_batch):
    """Wall and CPU ms per step of train_loop running `steps` steps (no evaluation or saving)."""
    state = Committed(params, adamw_init(params), onp.random.default_rng(0).bit_generator.state,
                      0, -1)
    tc = TrainConfig(batch_size=tc_batch.batch_size, max_iters=steps, eval_interval=steps,
                     eval_iters=1)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
        w0, c0 = time.perf_counter(), time.process_time()
        train_loop(state, tc, None, lambda split, rng: batch, lambda s: None, out, 768,
                   log=lambda s: None, evaluate=lambda p: {"train": 0.0, "val": 0.0},
                   step_fn=step_fn)
        return (1000 * (time.perf_counter() - w0) / steps,
                1000 * (time.process_time() - c0) / steps)


def profile(path, args):
    """The table rows of one path: [(what, (wall ms, CPU ms))]."""
    model, tc_batch = MODELS[args.model]
    rng = onp.random.default_rng(0)
    params, tiny_params = init_gpt(model, rng), init_gpt(TINY, rng)
    batch = tuple(rng.integers(0, model.vocab_size, (tc_batch.batch_size, model.block_size))
                  .astype(onp.int32) for _ in range(2))
    tiny_batch = tuple(rng.integers(0, 65, (1, 2)).astype(onp.int32) for _ in range(2))
    if path == "fast":
        vg, tiny_vg = fast.gpt_value_and_grad(model), fast.gpt_value_and_grad(TINY)
        step_fn = fast.gpt_train_step(model)
    else:
        vg = flat_value_and_grad(lambda p, b, r: gpt_loss(p, b[0], b[1], model, r))
        tiny_vg = flat_value_and_grad(lambda p, b, r: gpt_loss(p, b[0], b[1], TINY, r))
        step_fn = lambda *a: train_step(vg, *a)  # noqa: E731
    opt_state = adamw_init(params)
    _, grads = vg(params, batch, None)
    if path == "fast":
        layout = fast.FlatLayout(params)
        flat_p, flat_m = layout.pack(params), layout.pack(opt_state["m"])

        def optimizer():
            g = layout.pack(grads)
            math.sqrt(float(onp.vdot(g, g)))
            fast.adamw_flat(flat_p, g, flat_m, flat_m, 1e-3, 1, 0.9, 0.99, 0.1, 1.0,
                            layout.n_decay)
    else:
        def optimizer():
            global_norm(grads)
            adamw_step(params, grads, opt_state, 1e-3)
    state = [params, opt_state]

    def one_step():
        state[0], state[1], _, _ = step_fn(state[0], state[1], batch, 1e-3, tc_batch, None)

    r, s = args.repeats, args.steps
    in_loop = loop_per_step(step_fn, params, batch, r * s, tc_batch)
    alone = timed(one_step, r, s)
    fwd_bwd = timed(lambda: vg(params, batch, None), r, s)
    if path == "fast":  # as the fast path runs them: two halves of the batch at once
        half = tc_batch.batch_size // 2
        replays = (matmul_replay(model, half, True),
                   matmul_replay(model, tc_batch.batch_size - half, True))
        matmuls = timed(lambda: run_both(*replays), r, s)
    else:
        matmuls = timed(matmul_replay(model, tc_batch.batch_size, False), r, s)
    bookkeeping = timed(lambda: tiny_vg(tiny_params, tiny_batch, None), r, s)
    elementwise = tuple(f - m - k for f, m, k in zip(fwd_bwd, matmuls, bookkeeping))
    opt = timed(optimizer, r, s)
    overhead = tuple(a - b for a, b in zip(in_loop, alone))
    return [("step in the loop", in_loop), ("step alone", alone), ("forward + backward", fwd_bwd),
            ("  matmuls", matmuls), ("  elementwise", elementwise),
            ("  bookkeeping", bookkeeping), ("optimizer (norm + AdamW)", opt),
            ("loop overhead", overhead)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="blocks per figure (default 7)")
    ap.add_argument("--steps", type=int, default=10, help="calls per block (default 10)")
    ap.add_argument("--path", choices=("both", "reference", "fast"), default="both",
                    help="which path to profile (default both)")
    ap.add_argument("--model", choices=sorted(MODELS), default="recipe",
                    help="nanoGPT's CPU recipe, or the model plain `tinyllm pretrain` trains "
                         "(default recipe)")
    args = ap.parse_args()
    tune_malloc()  # as `tinyllm pretrain` does
    paths = ["reference", "fast"] if args.path == "both" else [args.path]
    results = {path: profile(path, args) for path in paths}
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"ms per step, median, model {args.model}, OPENBLAS_NUM_THREADS={threads}: wall / CPU")
    print(f"{'':28s}" + "".join(f"{path:>20s}" for path in paths))
    for i, (what, _) in enumerate(results[paths[0]]):
        cells = "".join(f"{results[p][i][1][0]:10.1f} /{results[p][i][1][1]:6.1f}  " for p in paths)
        print(f"{what:28s}{cells}")


if __name__ == "__main__":
    main()
