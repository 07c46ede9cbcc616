"""Linear models over word and character n-grams, on the splits `finetune classify` makes.

A yardstick for fine-tuning on a labelled file of yours: what a linear classifier over TF-IDF
features gets on the same train and test texts as `tinyllm finetune classify --seed S`: the splits
come from the function that command uses (`classify_run.load_classification_splits`: 70/10/20 by
the seed, or --val-data and --test-data as given; --dedupe and --balance first if asked). The
linear models train on the training split only, as the transformer does, and are scored on the
test split. Four models, each a scikit-learn pipeline:

- word-lr: lower-cased words and word pairs, logistic regression (C = 10);
- char-lr: character 2- to 5-grams inside word boundaries, logistic regression (C = 10);
- char-svm: the same features, a linear support-vector machine (C = 1);
- word+char-svm: both feature sets side by side, a linear support-vector machine.

With --tokens RUN, two more read each text as the tokens of RUN's own tokenizer (a pretrained
run directory), the units the transformer fine-tuned from RUN reads:

- token-lr: the tokens, logistic regression (C = 10): a bag of the transformer's own tokens;
- token-pair-lr: the tokens and each pair of neighbouring tokens, logistic regression.

If these beat the transformer fine-tuned on the same split, the tokens are not what it lacks.

A dev-only script: scikit-learn is never a dependency of tinyllm. Run it in a separate virtual
environment that has scikit-learn and tinyllm's own dependencies (numpy, autograd, click):

    python3 -m venv /tmp/sk && /tmp/sk/bin/pip install scikit-learn autograd click
    /tmp/sk/bin/python benchmarks/linear_baseline.py --data youtube-spam.csv --seeds 1 2 3
    /tmp/sk/bin/python benchmarks/linear_baseline.py --data youtube-spam.csv --tokens runs/pretrain

Prints each model's test accuracy per seed and the mean.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.classify_run import ClassifySettings, load_classification_splits  # noqa: E402


def models(tokenizer=None):
    """name -> a function making a fresh, untrained pipeline; with a tinyllm `tokenizer`, the
    token models too."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    def words():
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)

    def chars():
        return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)

    def tokens(pairs):
        def analyzer(text):  # "ab c" -> ["17", "40", "17 40"]: token ids, then neighbour pairs
            ids = [str(i) for i in tokenizer.encode(text)]
            return ids + ([f"{a} {b}" for a, b in zip(ids, ids[1:])] if pairs else [])
        return TfidfVectorizer(analyzer=analyzer, sublinear_tf=True)

    pipelines = {
        "word-lr": lambda: make_pipeline(words(), LogisticRegression(C=10, max_iter=2000)),
        "char-lr": lambda: make_pipeline(chars(), LogisticRegression(C=10, max_iter=2000)),
        "char-svm": lambda: make_pipeline(chars(), LinearSVC(C=1)),
        "word+char-svm": lambda: make_pipeline(make_union(words(), chars()), LinearSVC(C=1)),
    }
    if tokenizer is not None:
        pipelines["token-lr"] = lambda: make_pipeline(
            tokens(pairs=False), LogisticRegression(C=10, max_iter=2000))
        pipelines["token-pair-lr"] = lambda: make_pipeline(
            tokens(pairs=True), LogisticRegression(C=10, max_iter=2000))
    return pipelines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CSV/TSV/JSONL of text and label")
    parser.add_argument("--text-column", default=None, help="as in finetune classify")
    parser.add_argument("--label-column", default=None, help="as in finetune classify")
    parser.add_argument("--val-data", default=None,
                        help="as in finetune classify (with --test-data)")
    parser.add_argument("--test-data", default=None,
                        help="as in finetune classify (with --val-data)")
    parser.add_argument("--balance", action="store_true", help="as in finetune classify")
    parser.add_argument("--dedupe", action="store_true", help="as in finetune classify")
    parser.add_argument("--tokens", default=None, metavar="RUN",
                        help="a pretrained run directory: also fit models over its tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="the --seed of each split to score (default: 1 2 3)")
    args = parser.parse_args()
    splits = {}
    try:
        for seed in args.seeds:
            settings = ClassifySettings(data=args.data, text_column=args.text_column,
                                        label_column=args.label_column, val_data=args.val_data,
                                        test_data=args.test_data, balance=args.balance,
                                        dedupe=args.dedupe, seed=seed)
            splits[seed] = load_classification_splits(settings.validate())
        tokenizer = load_checkpoint(args.tokens, kind=None).tokenizer if args.tokens else None
    except TinyLLMError as error:
        sys.exit(f"Error: {error}")
    try:
        pipelines = models(tokenizer)
    except ImportError:
        sys.exit("linear_baseline.py needs scikit-learn: run it in a separate virtual environment"
                 " that has it (see the top of this file)")
    for name, make in pipelines.items():
        accuracies = []
        for seed in args.seeds:
            train, test = splits[seed].train, splits[seed].test
            model = make().fit([text for text, _ in train], [label for _, label in train])
            predicted = model.predict([text for text, _ in test])
            accuracies.append(float(np.mean(predicted == np.array([label for _, label in test]))))
        per_seed = ", ".join(f"{accuracy:.3f}" for accuracy in accuracies)
        print(f"{name:14s} test accuracy {per_seed} (mean {np.mean(accuracies):.3f})")


if __name__ == "__main__":
    main()
