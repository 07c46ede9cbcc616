"""What the encoder's distance bias costs a masked-language-model step, and why it has a floor.

A step of `tinyllm pretrain --objective mlm` at the default size (vocabulary 2048, block 256,
batch 8, 4 layers, 4 heads, 128 channels) on the fast path, forward and backward, timed four
ways on one fixed batch of random weights trained for nothing:

- causal: a step of plain `tinyllm pretrain`, for scale;
- bidirectional, no bias: the encoder without `ops.distance_bias` (`--no-distance-bias`);
- bidirectional, the bias: as `--objective mlm` trains, the bias held at DISTANCE_BIAS_FLOOR;
- bidirectional, no floor: the bias as a straight ramp down to -255 (head 0 at T = 256).

Beside each: how many of the step's attention weights are subnormal floats (below
1.2e-38 in float32). exp() of a score far below its row's top makes them, and Intel processors
compute with them dozens of times slower than with normal floats, so on an Intel machine the ramp
without a floor makes the masked step the slowest of the four (on the AMD EPYC the project was
first measured on, a masked step without the floor took no longer than a causal one). The
weights at the floor are so small that the step's loss and gradients come out the same.

    python benchmarks/distance_bias_cost.py [--repeats 5] [--checkpoint RUN]

With --checkpoint (a run of `tinyllm pretrain --objective mlm`), its trained weights are timed
instead of random ones: trained scores spread further, which makes more subnormals.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm import fast, ops  # noqa: E402
from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.config import GPTConfig  # noqa: E402
from tinyllm.mlm import choose_positions  # noqa: E402
from tinyllm.models import init_gpt  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402


def ramp_without_floor(n_head, t, dtype="float32"):
    """The distance bias as it was before its floor: -slope_h * |i - j| all the way down."""
    slopes = 0.5 ** onp.arange(n_head)
    offsets = onp.abs(onp.arange(t)[:, None] - onp.arange(t)[None, :])
    return (-slopes[:, None, None] * offsets).astype(dtype)


@contextlib.contextmanager
def patched(module, name, value):
    """module.name = value inside the block, put back after it."""
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def subnormal_share(step):
    """The share of the attention weights of one call of `step` that are subnormal floats,
    over every layer, as the fast path writes them (`fast.softmax_rows`, in place)."""
    counts = []  # (subnormal, all) per call; list.append is safe from the two halves' threads
    real = fast.softmax_rows
    tiny = onp.finfo("float32").tiny

    def counting(scores, mask):
        real(scores, mask)
        counts.append((int(((scores > 0) & (scores < tiny)).sum()), scores.size))

    with patched(fast, "softmax_rows", counting):
        step()
    return sum(c for c, _ in counts) / sum(n for _, n in counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per way (median)")
    parser.add_argument("--checkpoint", default=None, help="an MLM run to time (default: random)")
    args = parser.parse_args()
    tune_malloc()  # as `tinyllm pretrain` runs its steps
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, kind=("mlm",))
        config, params = ckpt.model_config, ckpt.params
    else:
        config = GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128,
                           distance_bias=True)
        params = init_gpt(config, onp.random.default_rng(0))
    rng = onp.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, size=(8, config.block_size))
    counted = choose_positions(onp.ones(ids.shape), rng)  # 15% of the positions, as pretraining

    def step(causal, cfg):
        return lambda: fast.gpt_loss_and_grads_in_halves(params, ids, ids, cfg, causal=causal,
                                                         counted=None if causal else counted)

    unbiased = replace(config, distance_bias=False)
    ways = [("causal (plain pretrain)", step(True, unbiased), ops.distance_bias),
            ("bidirectional, no bias", step(False, unbiased), ops.distance_bias),
            ("bidirectional, the bias", step(False, config), ops.distance_bias),
            ("bidirectional, no floor", step(False, config), ramp_without_floor)]
    print(f"{'way':<26} {'ms/step':>8} {'subnormal weights':>18}")
    for name, run, bias in ways:
        with patched(fast, "distance_bias", bias):  # where the fast path builds its mask
            share = subnormal_share(run)  # also the warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        print(f"{name:<26} {1000 * statistics.median(times):>8.0f} {share:>18.2%}")


if __name__ == "__main__":
    main()
