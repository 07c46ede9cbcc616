"""The next-token loss of causal pretraining runs over their whole validation split.

`tinyllm pretrain` logs a validation loss over `--eval-iters` random batches (at the defaults 10
batches of 8 windows at random offsets: 80 windows, where the split holds 208), other ones at
every evaluation, so two runs' logged figures differ by a few hundredths by the draw alone. To
compare runs (another number of steps, another learning rate) this script reads every token of
the split once instead: the last 10% of the corpus's tokens, as pretraining splits them, cut into
consecutive windows of the run's context, the loss averaged over all of them.

    python benchmarks/val_loss.py runs/pretrain [RUN ...]

Each run's corpus is the embedded one its config.json names, or the file given by --data for a
run pretrained on a file (a path inside config.json is never opened); either must have the
sha256 recorded there. It prints one line per run.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.data import EMBEDDED_CORPORA, encode_corpus, load_corpus, train_val_split  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.models import gpt_loss  # noqa: E402

GROUP = 16  # windows per forward pass


def validation_windows(ids, block_size):
    """Consecutive (input, target) windows over `ids`: inputs ids[i*T:(i+1)*T], targets the same
    shifted by one. Example: ids 0..6, T 3 -> inputs [[0,1,2],[3,4,5]], targets [[1,2,3],[4,5,6]]."""
    n = (len(ids) - 1) // block_size
    x = onp.stack([ids[i * block_size:(i + 1) * block_size] for i in range(n)])
    y = onp.stack([ids[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])
    return x, y


def run_corpus(run, data):
    """The text the run was pretrained on (`data`, or the embedded corpus its config.json
    names), checked against the sha256 its config.json keeps."""
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if data is None and meta.get("data") not in EMBEDDED_CORPORA:
        sys.exit(f"{run}: pretrained on a file, {meta.get('data')!r}: pass it as --data")
    text = load_corpus(data or meta["data"])
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != meta["data_sha256"]:
        sys.exit(f"{run}: {data or meta['data']!r} is not the text it was trained on"
                 " (its sha256 differs from config.json's)")
    return text


def split_loss(run, data=None):
    """(windows, mean loss over them) for the run's whole validation split."""
    try:
        ckpt = load_checkpoint(run)  # a causal run only: an MLM run is refused
    except TinyLLMError as e:
        sys.exit(f"{run}: {e}")
    _, val = train_val_split(encode_corpus(ckpt.tokenizer, run_corpus(run, data)))
    x, y = validation_windows(val, ckpt.model_config.block_size)
    total = 0.0
    for start in range(0, len(x), GROUP):
        xs, ys = x[start:start + GROUP], y[start:start + GROUP]
        total += float(gpt_loss(ckpt.params, xs, ys, ckpt.model_config)) * len(xs)
    return len(x), total / len(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of causal `tinyllm pretrain`")
    parser.add_argument("--data", help="the text file the runs were pretrained on, if not embedded")
    args = parser.parse_args()
    for run in args.runs:
        windows, loss = split_loss(run, args.data)
        print(f"{run}: validation loss {loss:.4f} over all {windows} windows of the split",
              flush=True)


if __name__ == "__main__":
    main()
