"""Benchmark the key/value cache: 256 new tokens from the default GPT, cached against uncached.

Run from a checkout:  OPENBLAS_NUM_THREADS=1 python benchmarks/bench_kv_cache.py
                      [--new-tokens 256] [--repeats 3] [--checkpoint runs/pretrain] [--seed 0]

The model is the default GPTConfig of tinyllm/config.py (4 layers, 4 heads, 128 channels, a
256-token context, 2048-token vocabulary) with random weights, or a pretrained run's weights
with --checkpoint. From a one-token prompt, 256 new tokens fill the context exactly, so every
step of the uncached loop reads a longer window (1 to 256 tokens) while the cached one reads
one token. Each path generates greedily (temperature 0) and by seeded sampling (temperature
0.8), --repeats times in turns (uncached, cached, uncached, ...); the best time of each counts.
Prints tokens per second for both, the speed-up, and whether the two gave the same tokens.
Exits with status 1 if the tokens differ or the greedy speed-up is under the target of 5x.
"""

import argparse
import os
import sys
import time

import numpy as onp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so `import tinyllm` works from a checkout without installing it

from tinyllm.config import GPTConfig  # noqa: E402  (needs the path set above)
from tinyllm.generate import generate_ids  # noqa: E402
from tinyllm.models import init_gpt  # noqa: E402

TARGET_SPEEDUP = 5.0


def load_model(checkpoint, seed):
    """(params, config): a pretrained run's, or random weights for the default GPTConfig."""
    if checkpoint:
        from tinyllm.finetune_runs import load_generator

        params, config, _ = load_generator(checkpoint)
        return params, config
    config = GPTConfig()
    return init_gpt(config, onp.random.default_rng(seed)), config


def timed(fn):
    """(result, wall time in seconds) of one call."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def best_times(repeats, fns):
    """[(result, shortest wall time of `repeats` calls)] for each function, called in turns
    (a, b, a, b, ...) so that a change in the machine's load falls on both alike."""
    results, times = [None] * len(fns), [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            results[i], seconds = timed(fn)
            times[i].append(seconds)
    return [(result, min(t)) for result, t in zip(results, times)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path; the best counts (default 3)")
    parser.add_argument("--checkpoint", default=None, help="a pretraining run (default: random weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and sampling (default 0)")
    args = parser.parse_args()

    params, config = load_model(args.checkpoint, args.seed)
    prompt = [0]  # one token: the new tokens fill the context up to block_size
    n = args.new_tokens
    print(f"model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} channels,"
          f" context {config.block_size}, vocabulary {config.vocab_size},"
          f" {'weights of ' + args.checkpoint if args.checkpoint else 'random weights'};"
          f" OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"{n} new tokens from a {len(prompt)}-token prompt, best of {args.repeats}")
    ok = True
    for temperature in (0.0, 0.8):
        def run(use_cache, temperature=temperature):
            return lambda: generate_ids(params, config, prompt, n,
                                        onp.random.default_rng(args.seed),
                                        temperature=temperature, use_cache=use_cache)

        (plain, plain_s), (cached, cached_s) = best_times(args.repeats, [run(False), run(True)])
        same = plain == cached
        speedup = plain_s / cached_s
        kind = "greedy" if temperature == 0 else f"sampling at temperature {temperature}"
        print(f"{kind}: uncached {n / plain_s:8.1f} tokens/s ({plain_s:.2f} s),"
              f" cached {n / cached_s:8.1f} tokens/s ({cached_s:.2f} s):"
              f" {speedup:.1f}x, same tokens: {'yes' if same else 'NO'}")
        ok = ok and same and (temperature != 0 or speedup >= TARGET_SPEEDUP)
    print(f"target: at least {TARGET_SPEEDUP:.0f}x for greedy, same tokens: {'met' if ok else 'MISSED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
