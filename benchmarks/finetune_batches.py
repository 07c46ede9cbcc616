"""What splitting a fine-tuning batch by length saves: ms per training step of
`tinyllm finetune classify`, its batches split into groups of similar length (as it trains) and
the same batches padded as one (as it trained before 2026-11-30).

    python benchmarks/finetune_batches.py --checkpoint runs/pretrain --data youtube-spam.csv

The model, tokenizer and training texts (with their case copies) are those the command's
defaults give for --checkpoint and --data (default: the embedded set); the same --steps batches
are drawn once and timed both ways, --repeats times each, alternating, with dropout as in
training. Prints the median ms per step both ways, and the real tokens a text and the longest
text of a batch on average. Run it on an otherwise idle machine: the times are the machine's.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.classify_run import (ClassifySettings, batch_groups, build_classifier,  # noqa: E402
                                  classification_loss_and_batches, encode_classification,
                                  load_classification_splits)
from tinyllm.labelled_data import label_ids, with_case_copies  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.train import flat_value_and_grad  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `tinyllm pretrain` run directory")
    parser.add_argument("--data", default=None, help="labelled file (default: the embedded set)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts a step (default 16)")
    parser.add_argument("--steps", type=int, default=30, help="batches timed (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timings each way (default 3)")
    args = parser.parse_args()
    tune_malloc()
    settings = ClassifySettings(checkpoint=args.checkpoint, data=args.data, seed=1).validate()
    train = with_case_copies(load_classification_splits(settings, log=lambda m: None).train)
    labels = list(label_ids([label for _, label in train], args.data or "the embedded data"))
    params, config, tokenizer, _ = build_classifier(settings, labels, log=lambda m: None)
    windows, y, _ = encode_classification(tokenizer, train, labels, config.block_size,
                                          settings.max_windows, "train")
    loss_fn, sample = classification_loss_and_batches({"train": (windows, y)}, config,
                                                      args.batch_size)
    value_and_grad = flat_value_and_grad(loss_fn)
    draws = np.random.default_rng(0)
    texts = [draws.integers(0, len(y), size=args.batch_size) for _ in range(args.steps)]
    lengths = [windows.lengths(t) for t in texts]
    print(f"{len(y)} training texts (with case copies), batches of {args.batch_size}: on average"
          f" {np.mean([l.mean() for l in lengths]):.0f} real tokens a text,"
          f" {np.mean([l.max() for l in lengths]):.0f} in the longest text of a batch")

    def timed(one_group):
        batches = [[(*windows.batch(t), y[t])] if one_group else batch_groups(windows, y, t)
                   for t in texts]
        rng = np.random.default_rng(1)
        start = time.perf_counter()
        for batch in batches:
            value_and_grad(params, batch, rng)
        return (time.perf_counter() - start) / len(batches) * 1000

    times = {"split by length": [], "one padded batch": []}
    for _ in range(args.repeats):
        times["split by length"].append(timed(one_group=False))
        times["one padded batch"].append(timed(one_group=True))
    for name, values in times.items():
        print(f"{name:>17}: {statistics.median(values):7.1f} ms a step (median of"
              f" {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
