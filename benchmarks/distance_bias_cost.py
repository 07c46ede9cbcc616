"""What the encoder's distance bias costs a masked-language-model step, and why it has a floor.

A step of `tinyllm pretrain --objective mlm` at the default size (vocabulary 2048, block 256,
batch 8, 4 layers, 4 heads, 128 channels) on the fast path, forward and backward, timed four
ways on one fixed batch of random weights trained for nothing:

- causal: a step of plain `tinyllm pretrain`, for scale;
- bidirectional, no bias: the encoder without `ops.distance_bias` (`--no-distance-bias`);
- bidirectional, the bias: as `--objective mlm` trains, the bias held at DISTANCE_BIAS_FLOOR;
- bidirectional, no floor: the bias as a straight ramp down to -255 (head 0 at T = 256).

Beside each: how many of the attention weights of the first layer are subnormal floats (below
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


def ramp_without_floor(n_head, t, dtype="float32"):
    """The distance bias as it was before its floor: -slope_h * |i - j| all the way down."""
    slopes = 0.5 ** onp.arange(n_head)
    offsets = onp.abs(onp.arange(t)[:, None] - onp.arange(t)[None, :])
    return (-slopes[:, None, None] * offsets).astype(dtype)


def subnormal_share(params, config, ids, bias):
    """The share of the first layer's attention weights that are subnormal floats."""
    b, t = ids.shape
    x = (params["wte"][ids.reshape(-1)] + onp.tile(params["wpe"][:t], (b, 1)))  # (N, C)
    block = params["h"][0]
    a, _ = fast.layer_norm_forward(x, **block["ln_1"])
    qkv = fast.linear_forward(a, block["attn"]["c_attn"]["w"], block["attn"]["c_attn"].get("b"))
    mask = bias if bias is not None else onp.zeros((t, t), dtype=x.dtype)
    _, (_, _, _, weights, _) = fast.attention_forward(qkv, b, t, config.n_head, mask,
                                                      fast.query_blocks(t, causal=False))
    return float(((weights > 0) & (weights < onp.finfo(weights.dtype).tiny)).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per way (median)")
    parser.add_argument("--checkpoint", default=None, help="an MLM run to time (default: random)")
    args = parser.parse_args()
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
    t, h = config.block_size, config.n_head
    ways = [("causal (plain pretrain)", step(True, unbiased), None),
            ("bidirectional, no bias", step(False, unbiased), None),
            ("bidirectional, the bias", step(False, config), ops.distance_bias(h, t)),
            ("bidirectional, no floor", None, ramp_without_floor(h, t))]
    print(f"{'way':<26} {'ms/step':>8} {'subnormal weights':>18}")
    for name, run, bias in ways:
        if run is None:  # the ramp: patched in where the fast path builds its mask
            real = fast.distance_bias
            fast.distance_bias = ramp_without_floor
            run = step(False, config)
        try:
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        finally:
            if name.endswith("no floor"):
                fast.distance_bias = real
        share = "" if name.startswith("causal") else (
            f"{subnormal_share(params, config, ids, bias):.2%}")
        print(f"{name:<26} {1000 * statistics.median(times):>8.0f} {share:>18}")


if __name__ == "__main__":
    main()
