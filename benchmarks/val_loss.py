"""The next-token loss of causal pretraining runs over their whole validation split.

`tinyllm pretrain` logs a validation loss over `--eval-iters` random batches (at the defaults 10
batches of 8 windows at random offsets: 80 windows, where the split holds 208), other ones at
every evaluation, so two runs' logged figures differ by a few hundredths by the draw alone. To
compare runs (another number of steps, another learning rate) this script reads every token of
the split once instead: the last 10% of the corpus's tokens, as pretraining splits them, cut into
consecutive windows of the run's context, the loss averaged over all of them.

    python benchmarks/val_loss.py runs/pretrain [RUN ...]

Each run's corpus is read again as `--resume` reads it (`rundir.run_corpus`): the embedded corpus
or the file its config.json names, or the file given by --data, used only if its sha256 is the
one recorded there. It prints one line per run.
"""

import argparse
import os
import sys

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.data import encode_corpus, train_val_split  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.models import gpt_loss  # noqa: E402
from tinyllm.rundir import run_corpus  # noqa: E402

GROUP = 16  # windows per forward pass


def validation_windows(ids, block_size):
    """Consecutive (input, target) windows over `ids`: inputs ids[i*T:(i+1)*T], targets the same
    shifted by one. Example: ids 0..6, T 3 -> inputs [[0,1,2],[3,4,5]], targets [[1,2,3],[4,5,6]]."""
    n = (len(ids) - 1) // block_size
    x = onp.stack([ids[i * block_size:(i + 1) * block_size] for i in range(n)])
    y = onp.stack([ids[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])
    return x, y


def split_loss(run, data=None):
    """(windows, mean loss over them) for the run's whole validation split."""
    try:
        ckpt = load_checkpoint(run)  # a causal run only: an MLM run is refused
        text = run_corpus(ckpt.meta, run, data)  # checked against the run's sha256
    except TinyLLMError as e:
        sys.exit(f"{run}: {e}")
    _, val = train_val_split(encode_corpus(ckpt.tokenizer, text))
    x, y = validation_windows(val, ckpt.model_config.block_size)
    total = 0.0
    for start in range(0, len(x), GROUP):
        xs, ys = x[start:start + GROUP], y[start:start + GROUP]
        total += float(gpt_loss(ckpt.params, xs, ys, ckpt.model_config)) * len(xs)
    return len(x), total / len(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of causal `tinyllm pretrain`")
    parser.add_argument("--data", help="the text the runs were pretrained on, read from here"
                        " instead of from the place config.json names")
    args = parser.parse_args()
    for run in args.runs:
        windows, loss = split_loss(run, args.data)
        print(f"{run}: validation loss {loss:.4f} over all {windows} windows of the split",
              flush=True)


if __name__ == "__main__":
    main()
