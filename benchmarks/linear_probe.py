"""What a pretrained base knows of a labelled task before any fine-tuning: a linear probe.

Each text of a labelled file (read as `tinyllm finetune classify --data` reads it) becomes one
vector as `tinyllm embed` makes it: the mean of the base's final hidden states over its tokens,
bidirectional for an MLM encoder, causal for a GPT. That is done twice: with the pretrained
weights, and with the same architecture at the random weights it would start from
(`finetune classify --random-init`). A softmax regression (NumPy, full-batch gradient descent
with L2, on standardised vectors) is fitted on 70% of the texts and scored on the other 30%,
over --splits random splits. The difference between the two rows is what pretraining put in
the vectors that a linear classifier can read; fine-tuning then moves every weight, so a small
difference here need not mean a small one after fine-tuning, nor a large one a large one.

    python benchmarks/linear_probe.py --checkpoint runs/pretrain --data youtube-spam.csv
    python benchmarks/linear_probe.py --checkpoint runs/mlm      # the embedded set by subject
"""

import argparse
import os
import sys

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.embed import embed_texts, load_embedder  # noqa: E402
from tinyllm.labelled_data import (default_classification_data,  # noqa: E402
                                   read_classification)
from tinyllm.models import init_gpt  # noqa: E402

TRAIN_SHARE = 0.7
STEPS, LR, L2 = 500, 0.1, 1e-2  # enough for the loss to settle on a few hundred texts


def fit_softmax_regression(x, y, n_classes):
    """Weights (C, K) and biases (K,) of a softmax regression on x (N, C), y (N,) in 0..K-1."""
    w, b = onp.zeros((x.shape[1], n_classes)), onp.zeros(n_classes)
    one_hot = onp.eye(n_classes)[y]  # (N, K)
    for _ in range(STEPS):
        logits = x @ w + b  # (N, K)
        p = onp.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - one_hot) / len(y)  # (N, K): the gradient of the mean cross-entropy
        w -= LR * (x.T @ g + L2 * w)
        b -= LR * g.sum(axis=0)
    return w, b


def probe_accuracy(vectors, y, n_classes, splits):
    """Mean test accuracy of the probe over `splits` random 70/30 splits (seeds 0, 1, ...)."""
    accuracies = []
    for seed in range(splits):
        order = onp.random.default_rng(seed).permutation(len(y))
        cut = int(TRAIN_SHARE * len(y))
        train, test = order[:cut], order[cut:]
        mean, std = vectors[train].mean(axis=0), vectors[train].std(axis=0) + 1e-6
        x = (vectors - mean) / std  # standardised by the training texts alone
        w, b = fit_softmax_regression(x[train], y[train], n_classes)
        accuracies.append(float(((x[test] @ w + b).argmax(axis=1) == y[test]).mean()))
    return float(onp.mean(accuracies))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/pretrain",
                        help="a run of `tinyllm pretrain` (either objective)")
    parser.add_argument("--data", default=None, help="a labelled file (.csv, .tsv, .jsonl, .json);"
                        " default: the embedded set of sentences by subject")
    parser.add_argument("--splits", type=int, default=10, help="random 70/30 splits averaged")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    examples = read_classification(args.data) if args.data else default_classification_data()
    classes = sorted({label for _, label in examples})
    y = onp.array([classes.index(label) for _, label in examples])
    texts = [text for text, _ in examples]
    params, config, tokenizer, bidirectional = load_embedder(args.checkpoint)
    random_params = init_gpt(config, onp.random.default_rng(args.seed))
    print(f"{len(texts)} texts, {len(classes)} classes; always the most frequent class:"
          f" {onp.bincount(y).max() / len(y):.3f}")
    for name, weights in (("pretrained", params), ("random weights", random_params)):
        vectors, _ = embed_texts(weights, config, tokenizer, texts, bidirectional)
        accuracy = probe_accuracy(vectors.astype(onp.float64), y, len(classes), args.splits)
        print(f"{name:<15} probe test accuracy {accuracy:.3f} (mean of {args.splits} splits)")


if __name__ == "__main__":
    main()
