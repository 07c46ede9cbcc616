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

Then the other loops that run on the cache, with the same weights: batched greedy decoding as
instruction evaluation uses it (32 prompts of 64 tokens, 32 new tokens each), and the
encoder-decoder of `tinyllm seq2seq train` with random weights (greedy decoding of 32 sources,
beam search with beam 4 on 2 of them, up to 63 new tokens each).
Exits with status 1 if any pair of paths gave different tokens or the greedy speed-up of the
first part is under the target of 5x.
"""

import argparse
import os
import sys
import time

import numpy as onp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so `import tinyllm` works from a checkout without installing it

from tinyllm.config import GPTConfig  # noqa: E402  (needs the path set above)
from tinyllm.decoding import beam_search, greedy_decode  # noqa: E402
from tinyllm.generate import generate_ids, greedy_batch  # noqa: E402
from tinyllm.models import init_gpt  # noqa: E402
from tinyllm.seq2seq import Seq2SeqConfig, init_seq2seq  # noqa: E402

TARGET_SPEEDUP = 5.0


def load_model(checkpoint, seed):
    """(params, config): a pretrained run's, or random weights for the default GPTConfig."""
    if checkpoint:
        from tinyllm.instruct_run import load_generator

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


def report(kind, n_tokens, plain, cached):
    """Print one line: tokens per second uncached and cached, the speed-up, and whether the two
    paths gave the same tokens. plain and cached are (result, seconds). Returns (speed-up, same)."""
    (plain_out, plain_s), (cached_out, cached_s) = plain, cached
    same = plain_out == cached_out
    print(f"{kind}: uncached {n_tokens / plain_s:8.1f} tokens/s ({plain_s:.2f} s),"
          f" cached {n_tokens / cached_s:8.1f} tokens/s ({cached_s:.2f} s):"
          f" {plain_s / cached_s:.1f}x, same tokens: {'yes' if same else 'NO'}")
    return plain_s / cached_s, same


def bench_generation(params, config, n, repeats, seed):
    """The target: n new tokens from a one-token prompt, greedy and sampled. Returns True if met."""
    prompt = [0]  # one token: 256 new tokens fill the default context exactly
    print(f"{n} new tokens from a {len(prompt)}-token prompt, best of {repeats}")
    ok = True
    for temperature in (0.0, 0.8):
        def run(use_cache, temperature=temperature):
            return lambda: generate_ids(params, config, prompt, n, onp.random.default_rng(seed),
                                        temperature=temperature, use_cache=use_cache)

        kind = "greedy" if temperature == 0 else f"sampling at temperature {temperature}"
        speedup, same = report(kind, n, *best_times(repeats, [run(False), run(True)]))
        ok = ok and same and (temperature != 0 or speedup >= TARGET_SPEEDUP)
    return ok


def bench_batched_greedy(params, config, repeats, seed, rows=32, prompt_len=64, limit=32):
    """Instruction evaluation's shape: greedy answers to `rows` prompts at once (greedy_batch)."""
    rng = onp.random.default_rng(seed)
    prompts = [rng.integers(0, config.vocab_size, size=prompt_len).tolist() for _ in range(rows)]

    def run(use_cache):
        return lambda: greedy_batch(params, config, prompts, [limit] * rows, stop_id=-1,
                                    use_cache=use_cache)

    return report(f"batched greedy, {rows} prompts of {prompt_len} tokens, {limit} new each",
                  rows * limit, *best_times(repeats, [run(False), run(True)]))[1]


def bench_seq2seq(repeats, seed, rows=32, source_len=20, beam_size=4):
    """The encoder-decoder of `tinyllm seq2seq train` (default Seq2SeqConfig, random weights):
    greedy decoding of `rows` sources at once, and beam search on a few of them."""
    config = Seq2SeqConfig()
    params = init_seq2seq(config, onp.random.default_rng(seed))
    rng = onp.random.default_rng(seed)
    src = rng.integers(3, config.vocab_size, size=(rows, source_len)).astype(onp.int32)
    max_len = config.block_size - 1
    bos, eos = 1, 2
    print(f"encoder-decoder: {config.n_layer} + {config.n_layer} layers, {config.n_embd} channels,"
          f" context {config.block_size}; sources of {source_len} tokens, up to {max_len} new")

    def greedy(use_cache):
        return lambda: greedy_decode(params, config, src, None, bos, eos, max_len, use_cache)

    plain, cached = best_times(repeats, [greedy(False), greedy(True)])
    same = report(f"greedy, {rows} sources", sum(len(r) + 1 for r in plain[0]), plain, cached)[1]
    few = [row.tolist() for row in src[:2]]

    def beams(use_cache):
        return lambda: [beam_search(params, config, s, bos, eos, max_len, beam_size,
                                    use_cache=use_cache) for s in few]

    plain, cached = best_times(repeats, [beams(False), beams(True)])
    return report(f"beam search (beam {beam_size}), {len(few)} sources",
                  sum(len(r) + 1 for r in plain[0]), plain, cached)[1] and same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each path; the best counts (default 3)")
    parser.add_argument("--checkpoint", default=None,
                        help="a pretraining run (default: random weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the weights, prompts and sampling (default 0)")
    args = parser.parse_args()

    params, config = load_model(args.checkpoint, args.seed)
    print(f"model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} channels,"
          f" context {config.block_size}, vocabulary {config.vocab_size},"
          f" {'weights of ' + args.checkpoint if args.checkpoint else 'random weights'};"
          f" OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    ok = bench_generation(params, config, args.new_tokens, args.repeats, args.seed)
    print(f"target: at least {TARGET_SPEEDUP:.0f}x for greedy, same tokens:"
          f" {'met' if ok else 'MISSED'}")
    ok = bench_batched_greedy(params, config, args.repeats, args.seed) and ok
    ok = bench_seq2seq(args.repeats, args.seed) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
