"""nanoGPT's CPU recipe for tiny Shakespeare, tinyllm side by side with the same model in PyTorch.

Recipe (nanoGPT's README, "I only have a macbook"): char tokenizer, 4 layers, 4 heads, 128 dims,
block 64, batch 12, lr 1e-3 cosine to 1e-4, warm-up 100, AdamW betas (0.9, 0.99), weight decay
0.1, gradient clip 1.0, dropout 0, no biases, seed 1337. The PyTorch side is
benchmarks/torch_reference.py (the same model, initial weights, batches and optimizer), run
with the Python of a separate environment that has torch (--torch-python); without one, only
tinyllm is measured.

Speed (the default): each side trains a 50-iteration and a 350-iteration run in a fresh
process, the sides alternating (tinyllm 50, torch 50, tinyllm 350, torch 350, then again for
each --repeats); the time per iteration is (wall of the 350 run - wall of the 50 run) / 300, so
start-up, data loading and the two evaluations cancel. Printed: ms per iteration of each side
(median over the repeats, and each repeat), CPU ms per iteration (steadier on a busy machine),
the ratio tinyllm / torch, the fraction reached of the physical limit (the model's FLOPs per
iteration at numpy's float32 matmul peak, measured in the tinyllm process), and each side's
peak resident memory (of its 350-iteration process).

Quality (--parity): each side trains 2000 iterations for each of the seeds 1337, 1 and 2 and
measures the validation loss at iteration 2000 over 100 batches (the same batches on both
sides); printed: each loss, each side's mean and spread, and the difference of the means.

    python benchmarks/bench_shakespeare.py --data tinyshakespeare.txt \
        --torch-python /path/to/torch-venv/bin/python
    python benchmarks/bench_shakespeare.py --data tinyshakespeare.txt --torch-python ... --parity
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
TORCH_SCRIPT = os.path.join(HERE, "torch_reference.py")
RECIPE = {"block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "batch_size": 12}


# ----------------------------------------------------------------------------- the tinyllm side


def matmul_peak_gflops(n=512, repeats=50):
    """float32 GFLOP/s of an n x n matmul: the machine's practical numpy peak."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a  # warm up the BLAS threads
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def flops_per_iter(n_layer, n_embd, block_size, batch_size, n_params):
    """Training FLOPs per step, as nanoGPT estimates them: 6 N per token for the weights (forward
    2N, backward 4N) plus 12 L T C for attention scores and their use, N without the position
    embedding."""
    n = n_params - block_size * n_embd
    per_token = 6 * n + 12 * n_layer * block_size * n_embd
    return per_token * block_size * batch_size


def tinyllm_worker(args):
    """Train tinyllm once in this process and print one JSON object (what torch_reference.py
    prints, plus the matmul peak and the model's FLOPs per iteration)."""
    sys.path.insert(0, ROOT)
    from tinyllm.config import GPTConfig, TrainConfig
    from tinyllm.models import count_params
    from tinyllm.system import tune_malloc
    from tinyllm.pretrain import pretrain

    tune_malloc()  # as `tinyllm pretrain` does
    peak = matmul_peak_gflops()
    model = GPTConfig(block_size=RECIPE["block_size"], n_layer=RECIPE["n_layer"],
                      n_head=RECIPE["n_head"], n_embd=RECIPE["n_embd"], dropout=0.0, bias=False)
    train = TrainConfig(batch_size=RECIPE["batch_size"], max_iters=args.iters, lr=1e-3,
                        min_lr=1e-4, warmup_iters=100, weight_decay=0.1, beta1=0.9, beta2=0.99,
                        grad_clip=1.0, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                        seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        result = pretrain(model, train, out, data=args.data, tokenizer_kind="char",
                          special_tokens=(), log=lambda s: print(s, file=sys.stderr),
                          fast=not args.no_fast)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_params = count_params(result["params"])
    print(json.dumps({
        "impl": "tinyllm" + (" --no-fast" if args.no_fast else ""), "iters": args.iters,
        "seed": args.seed, "train_seconds": wall, "cpu_seconds": cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": n_params, "train_loss": result["final"]["train_loss"],
        "val_loss": result["final"]["val_loss"], "matmul_peak_gflops": peak,
        "flops_per_iter": flops_per_iter(RECIPE["n_layer"], RECIPE["n_embd"],
                                         RECIPE["block_size"], RECIPE["batch_size"], n_params),
    }))


# ----------------------------------------------------------------------------- running the sides


def run_side(side, args, iters, seed, eval_interval, eval_iters):
    """Run one side in a fresh process; returns its JSON result."""
    common = ["--data", args.data, "--seed", str(seed), "--eval-interval", str(eval_interval),
              "--eval-iters", str(eval_iters)]
    env = dict(os.environ)
    if args.threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    if side == "tinyllm":
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--iters", str(iters), *common]
        cmd += ["--no-fast"] if args.no_fast else []
    else:
        cmd = [args.torch_python, TORCH_SCRIPT, "--max-iters", str(iters), *common]
        cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{side} run failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {side:8s} {iters:5d} iterations, seed {seed}: {result['train_seconds']:.2f} s wall,"
          f" {result['cpu_seconds']:.2f} s CPU, val loss {result['val_loss']:.4f}", flush=True)
    return result


def speed(args, sides):
    """The difference method, sides alternated; prints the table."""
    short, long = args.short_iters, args.long_iters
    runs = {side: {"short": [], "long": []} for side in sides}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}")
        for length, iters in (("short", short), ("long", long)):
            for side in sides:
                runs[side][length].append(run_side(side, args, iters, 1337, iters, 2))
    table = {}
    for side in sides:
        pairs = list(zip(runs[side]["short"], runs[side]["long"]))
        wall = [1000 * (b["train_seconds"] - a["train_seconds"]) / (long - short) for a, b in pairs]
        cpu = [1000 * (b["cpu_seconds"] - a["cpu_seconds"]) / (long - short) for a, b in pairs]
        table[side] = {"ms": statistics.median(wall), "all": wall, "cpu": statistics.median(cpu),
                       "rss": max(b["peak_rss_mb"] for _, b in pairs)}
    ours = runs["tinyllm"]["long"][0]
    # the matmul peak measured at the start of each tinyllm run: the best is the least disturbed
    peak = max(r["matmul_peak_gflops"] for length in runs["tinyllm"].values() for r in length)
    limit_ms = 1000 * ours["flops_per_iter"] / (peak * 1e9)
    print(f"\nper iteration, (wall of {long} - wall of {short} iterations) / {long - short},"
          f" median of {args.repeats} (each repeat in brackets)")
    for side in sides:
        row = table[side]
        each = ", ".join(f"{ms:.1f}" for ms in row["all"])
        print(f"  {side:8s} {row['ms']:6.1f} ms/iter [{each}]   CPU {row['cpu']:6.1f} ms/iter"
              f"   peak RSS {row['rss']:5.0f} MB")
    print(f"physical limit: {ours['flops_per_iter'] / 1e9:.2f} GFLOP per iteration at the matmul"
          f" peak of {peak:.0f} GFLOP/s (best of the tinyllm runs) = {limit_ms:.1f} ms;"
          f" tinyllm reaches {limit_ms / table['tinyllm']['ms']:.0%} of it")
    if "torch" in table:
        ratio = table["tinyllm"]["ms"] / table["torch"]["ms"]
        cpu_ratio = table["tinyllm"]["cpu"] / table["torch"]["cpu"]
        memory = table["tinyllm"]["rss"] / table["torch"]["rss"]
        print(f"ratio tinyllm / torch: {ratio:.2f} per iteration (target <= 1.0, aim 0.9),"
              f" {cpu_ratio:.2f} in CPU time; peak memory {memory:.2f} (target <= 0.5)")


def parity(args, sides):
    """Validation loss at iteration --parity-iters over 100 batches, three seeds, both sides."""
    losses = {side: [] for side in sides}
    for seed in args.seeds:
        for side in sides:
            result = run_side(side, args, args.parity_iters, seed, args.parity_iters, 100)
            losses[side].append(result["val_loss"])
    print(f"\nvalidation loss at iteration {args.parity_iters} (100 batches), seeds"
          f" {', '.join(map(str, args.seeds))}")
    for side in sides:
        values = losses[side]
        print(f"  {side:8s} {', '.join(f'{v:.4f}' for v in values)}: mean"
              f" {statistics.mean(values):.4f}, spread (max - min) {max(values) - min(values):.4f},"
              f" standard deviation {statistics.pstdev(values):.4f}")
    if "torch" in losses:
        gap = statistics.mean(losses["tinyllm"]) - statistics.mean(losses["torch"])
        print(f"difference of the means, tinyllm - torch: {gap:+.4f} (target within 0.01)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True,
                    help="the tiny Shakespeare text (about 1.1 MB, not shipped with tinyllm)")
    ap.add_argument("--torch-python", default=None,
                    help="Python of an environment with torch, to run the PyTorch side"
                         " (default: none, tinyllm only)")
    ap.add_argument("--parity", action="store_true",
                    help="measure quality (3 seeds x 2000 iterations per side) instead of speed")
    ap.add_argument("--repeats", type=int, default=3,
                    help="speed: how many times each pair of runs is repeated (default 3)")
    ap.add_argument("--short-iters", type=int, default=50, help="speed: the short run (default 50)")
    ap.add_argument("--long-iters", type=int, default=350, help="speed: the long run (default 350)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2],
                    help="parity: the seeds (default 1337 1 2)")
    ap.add_argument("--parity-iters", type=int, default=2000,
                    help="parity: iterations of each run (default 2000)")
    ap.add_argument("--threads", type=int, default=0,
                    help="BLAS threads of the tinyllm side and torch.set_num_threads of the torch"
                         " side (default 0: each library's own choice, all cores)")
    ap.add_argument("--no-fast", action="store_true",
                    help="train tinyllm on the autograd reference path (`tinyllm pretrain"
                         " --no-fast`) instead of the fast path (default: fast)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    ap.add_argument("--eval-interval", type=int, default=250, help=argparse.SUPPRESS)
    ap.add_argument("--eval-iters", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"no data at {args.data}: pass --data PATH to the tiny Shakespeare text")
    if args.worker:
        tinyllm_worker(args)
        return
    sides = ["tinyllm"]
    if args.torch_python is None:
        print("no --torch-python given: measuring tinyllm only (no ratio, no parity difference)")
    elif not os.path.exists(args.torch_python):
        print(f"--torch-python {args.torch_python} not found: measuring tinyllm only")
    else:
        sides.append("torch")
    (parity if args.parity else speed)(args, sides)


if __name__ == "__main__":
    main()
