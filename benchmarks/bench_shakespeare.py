"""nanoGPT's CPU recipe for tiny Shakespeare, run with tinyllm, beside the PyTorch reference figures.

Recipe (nanoGPT's README, "I only have a macbook"): char tokenizer, 4 layers, 4 heads, 128 dims,
block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, warm-up 100, AdamW betas
(0.9, 0.99), weight decay 0.1, gradient clip 1.0, dropout 0, no biases; evaluation every 250
steps over 20 batches per split. Reference figures: ../shared/data/README.md (PyTorch 2.13, CPU,
this machine class).

    python benchmarks/bench_shakespeare.py [--data PATH] [--max-iters N]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.config import GPTConfig, TrainConfig  # noqa: E402
from tinyllm.models import count_params  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.train import pretrain  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")
REFERENCE = {"wall_s": 95.0, "ms_per_iter": "32-37", "val_loss": 1.886, "train_loss": 1.765,
             "peak_rss_mb": 373, "params": 804_096}


def matmul_peak_gflops(n=512, repeats=50):
    """float32 GFLOP/s of an n x n matmul: the machine's practical numpy peak."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a  # warm up the BLAS threads
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def flops_per_iter(config, n_params, batch_size):
    """Training FLOPs per step, as nanoGPT estimates them: 6 N per token for the weights (forward
    2N, backward 4N) plus 12 L T C for attention scores and their use, N without the position
    embedding."""
    n = n_params - config.block_size * config.n_embd
    per_token = 6 * n + 12 * config.n_layer * config.block_size * config.n_embd
    return per_token * config.block_size * batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--max-iters", type=int, default=2000)
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"no data at {args.data}: this benchmark needs ../shared/data/tinyshakespeare.txt")
    tune_malloc()
    peak = matmul_peak_gflops()
    model = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
    train = TrainConfig(batch_size=12, max_iters=args.max_iters, lr=1e-3, min_lr=1e-4,
                        warmup_iters=100, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                        eval_interval=250, eval_iters=20, seed=1337)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = pretrain(model, train, out, data=args.data, tokenizer_kind="char",
                          special_tokens=(), log=lambda s: print(s, file=sys.stderr))
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [m["ms_per_iter"] for m in metrics if m["ms_per_iter"] > 0]
    ms = sum(steps) / len(steps)
    n_params = count_params(result["params"])
    flops = flops_per_iter(result["model_config"], n_params, train.batch_size)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = result["final"]
    rows = [
        ("parameters", f"{n_params:,}", f"{REFERENCE['params']:,}"),
        ("whole run, evals included (s)", f"{wall:.1f}", f"{REFERENCE['wall_s']:.0f}"),
        ("ms per iteration (evals excluded)", f"{ms:.1f}", REFERENCE["ms_per_iter"]),
        ("tokens per second", f"{768 / ms * 1000:,.0f}", "-"),
        ("model GFLOP per iteration", f"{flops / 1e9:.2f}", "3.97"),
        (f"fraction of matmul peak ({peak:.0f} GFLOP/s)", f"{flops / (ms / 1000) / 1e9 / peak:.1%}", "-"),
        (f"train / val loss at iteration {final['iter']}",
         f"{final['train_loss']:.3f} / {final['val_loss']:.3f}",
         f"{REFERENCE['train_loss']} / {REFERENCE['val_loss']}"),
        ("peak resident memory (MB)", f"{rss_mb:.0f}", f"{REFERENCE['peak_rss_mb']}"),
    ]
    print(f"{'figure':44s} {'tinyllm':>16s} {'nanoGPT (PyTorch)':>18s}")
    for name, ours, theirs in rows:
        print(f"{name:44s} {ours:>16s} {theirs:>18s}")
    targets_met = final["val_loss"] <= 1.90 and wall <= 125 and rss_mb <= 300
    print(f"targets (val <= 1.90, wall <= 125 s, memory <= 300 MB): {'met' if targets_met else 'NOT met'}")


if __name__ == "__main__":
    main()
