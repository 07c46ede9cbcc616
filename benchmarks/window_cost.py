"""What a pretraining step of the same tokens costs as windows of each length.

Plain `tinyllm pretrain` trains in two stages (`pretrain.staged_batches`): its first steps read
32 windows of 64 tokens, its last ones 8 windows of 256, 2,048 tokens a step either way. Every
linear layer and the output layer do the same arithmetic for both; only attention, which compares
each token with every token before it in its window, costs more in longer windows. This script
times the forward and backward pass of the fast path (`fast.gpt_loss_and_grads_in_halves`, the
default model: 4 layers, 128 channels, vocabulary 2048) on one batch of 2,048 tokens shaped as
windows of 256, 128, 64 and 32, the shapes taken in turn round after round, so that a machine whose
speed drifts (a shared one does) slows each shape alike, and prints the median and the fastest of
each, and each median as a share of the 256-token one's.

    python benchmarks/window_cost.py [--rounds 25]
"""

import argparse
import os
import statistics
import sys
import time

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm import fast  # noqa: E402
from tinyllm.config import GPTConfig  # noqa: E402
from tinyllm.models import init_gpt  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402

TOKENS = 2048  # a step of plain `tinyllm pretrain`: 8 windows of 256 tokens
WINDOWS = (256, 128, 64, 32)
WARM_UP_ROUNDS = 3  # rounds left out of the figures: the first calls allocate and fault memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25,
                        help="timings of each shape, %(default)s, the first three left out")
    args = parser.parse_args()
    tune_malloc()
    config = GPTConfig()
    params = init_gpt(config, onp.random.default_rng(0))
    rng = onp.random.default_rng(1)
    batches = {t: (rng.integers(0, config.vocab_size, (TOKENS // t, t)),
                   rng.integers(0, config.vocab_size, (TOKENS // t, t))) for t in WINDOWS}
    seconds = {t: [] for t in WINDOWS}
    for _ in range(args.rounds):
        for t in WINDOWS:
            ids, targets = batches[t]
            start = time.perf_counter()
            fast.gpt_loss_and_grads_in_halves(params, ids, targets, config)
            seconds[t].append(time.perf_counter() - start)
    whole = statistics.median(seconds[WINDOWS[0]][WARM_UP_ROUNDS:])
    print(f"forward + backward of {TOKENS} tokens, default model, median (fastest) of"
          f" {args.rounds - WARM_UP_ROUNDS} rounds:")
    for t in WINDOWS:
        kept = seconds[t][WARM_UP_ROUNDS:]
        median = statistics.median(kept)
        print(f"  {TOKENS // t:3d} windows of {t:3d} tokens: {1000 * median:6.1f} ms"
              f" ({1000 * min(kept):6.1f}), {median / whole:.2f} of the 256-token step")


if __name__ == "__main__":
    main()
