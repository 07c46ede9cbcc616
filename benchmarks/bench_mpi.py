"""Data-parallel pretraining over MPI on one machine: tokens per second for N = 1 and N = 2 ranks.

Runs nanoGPT's char-level Shakespeare recipe (4 layers, 4 heads, 128 channels, block 64, batch
12 per rank; on the embedded pydoc text unless --data names another) three ways, one after
the other, each as its own `tinyllm pretrain` process tree:

    N = 1, one BLAS thread          OPENBLAS_NUM_THREADS=1 tinyllm pretrain ...
    N = 2, one BLAS thread a rank   OPENBLAS_NUM_THREADS=1 mpirun -n 2 tinyllm pretrain ...
    N = 1, two BLAS threads         OPENBLAS_NUM_THREADS=2 tinyllm pretrain ...  (the default)

and prints tokens per second (all ranks together; evaluations excluded; the best of --repeats
rounds, the three ways taken in turn each round, so a burst of other work hits them alike), the
speed-ups, the bytes each step's all-reduce moves, and the measured time of that all-reduce.
Needs the `mpi` extra (pip install ".[mpi]"). Measure on an idle machine: other work on the
cores changes every figure.

    python benchmarks/bench_mpi.py [--data PATH] [--max-iters 100] [--repeats 2]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = ["--tokenizer", "char", "--block-size", "64", "--n-layer", "4", "--n-head", "4",
          "--n-embd", "128", "--dropout", "0", "--batch-size", "12", "--lr", "1e-3",
          "--min-lr", "1e-4", "--warmup-iters", "100", "--eval-iters", "2", "--sample-tokens", "0"]
PROBE = """
import sys, time
import numpy as np
from mpi4py import MPI
comm, n = MPI.COMM_WORLD, int(sys.argv[1])
buffer = np.ones(n, np.float32)
for _ in range(3):
    comm.Allreduce(MPI.IN_PLACE, buffer)
comm.Barrier()
t0 = time.perf_counter()
for _ in range(20):
    comm.Allreduce(MPI.IN_PLACE, buffer)
if comm.rank == 0:
    print((time.perf_counter() - t0) / 20)
"""


def mpirun():
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpirun")


def run(ranks, blas_threads, data, max_iters):
    """One pretraining run; returns (tokens per second over its steps, wall seconds, params)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(blas_threads)}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(ROOT, "cli.py"), "pretrain", "--data", data,
                   *RECIPE, "--max-iters", str(max_iters), "--eval-interval", str(max_iters),
                   "--out", os.path.join(out, "run")]
        if ranks > 1:
            command = [mpirun(), "-n", str(ranks)] + command
        t0 = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "run", "metrics.jsonl"), encoding="utf-8") as f:
            last = [json.loads(line) for line in f][-1]
        from tinyllm.checkpoint import load_checkpoint
        from tinyllm.models import count_params
        params = count_params(load_checkpoint(os.path.join(out, "run")).params)
    return last["tokens_per_s"], wall, params


def allreduce_seconds(n_floats, ranks=2):
    """The measured time of one Allreduce of n_floats float32 over `ranks` local processes."""
    result = subprocess.run([mpirun(), "-n", str(ranks), sys.executable, "-c", PROBE,
                             str(n_floats)], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, check=True, timeout=600)
    return float(result.stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="pydoc",
                        help="text file, or an embedded corpus's name (default: pydoc)")
    parser.add_argument("--max-iters", type=int, default=100, help="steps per run (default 100)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best is kept (default 2)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if mpirun() is None:
        sys.exit('no mpirun: pip install ".[mpi]" (mpi4py and mpich)')
    data = args.data
    print(f"data: {data}; {args.max_iters} steps of batch 12 x block 64 per rank;"
          f" load average before: {os.getloadavg()[0]:.2f}")
    rows = {}
    for round_number in range(1, args.repeats + 1):
        for name, ranks, threads in (("N = 1, 1 BLAS thread", 1, 1),
                                     ("N = 2, 1 BLAS thread per rank", 2, 1),
                                     ("N = 1, 2 BLAS threads", 1, 2)):
            tokens, wall, params = run(ranks, threads, data, args.max_iters)
            print(f"round {round_number}: {name:32s} {tokens:10,.0f} tokens/s   ({wall:.1f} s"
                  " wall, set-up included)")
            rows[name] = max(rows.get(name, (0, 0, 0)), (tokens, wall, params))
    for name, (tokens, _, _) in rows.items():
        print(f"best: {name:32s} {tokens:10,.0f} tokens/s")
    one, two, one_2t = (rows[k][0] for k in rows)
    print(f"speed-up of N = 2 over N = 1 with 1 BLAS thread:  {two / one:.2f}x")
    print(f"speed-up of N = 2 over N = 1 with 2 BLAS threads: {two / one_2t:.2f}x")
    params = rows["N = 1, 1 BLAS thread"][2]
    buffer = 4 * (params + 1)  # float32 gradients and the loss
    print(f"parameters: {params:,}; all-reduce buffer per step: {buffer:,} bytes")
    for n in (2, 4, 8):
        print(f"  ring all-reduce, N = {n}: each rank sends {2 * (n - 1) / n * buffer:,.0f} bytes"
              f" and receives as many per step (2 (N-1)/N x buffer; 2 x buffer for large N)")
    seconds = allreduce_seconds(params + 1)
    print(f"measured Allreduce of that buffer, 2 local ranks: {1000 * seconds:.2f} ms per step")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
