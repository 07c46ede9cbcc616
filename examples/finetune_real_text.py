"""Fine-tuning on real text, with default flags, from a base made by plain `tinyllm pretrain`.

    python examples/finetune_real_text.py classify --base runs/pretrain --data spam.csv
    python examples/finetune_real_text.py instruct --base runs/pretrain

classify: `tinyllm finetune classify` on a labelled file of yours (CSV/TSV/JSONL with text and
label, e.g. a public collection of spam and ordinary short messages) for --seeds 1 2 3, from the
pretrained base and from the same architecture at random initialisation (`--random-init`), and
prints each test accuracy and the two means: what pretraining is worth on that file, with the
standard error of the per-seed differences (a single run on a small test split moves by a few
points with the seed, so more seeds give a firmer figure). For scale it also prints a multinomial
naive Bayes over lower-cased words (add-one smoothing), trained on the same train and validation
texts and scored on the same test texts of each seed's split. With --runs N, each seed S gets N
runs (`--seed S`, S + 1000, ..., all with `--split-seed S`), and its accuracy is that of their
class probabilities averaged on the split's test texts (`tinyllm classify --split test` with N
checkpoints), next to the first run's alone.

instruct: writes an Alpaca-layout file of 1,000 ordinary instructions made from Python's own
documentation (`labelled_data.python_docs_instructions`: what a function does, the first or last
sentence of a text, which module has a function, a sentence in capitals), instruction-tunes the
base on it, and prints how many records were shortened, the validation loss on the responses
before and after (the base model's is the first evaluation's), and three test responses.

Runs go to a temporary directory unless --out is given.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.classify_run import (ClassifySettings, load_classification_splits,  # noqa: E402
                                  load_classifiers, run_classify, score_run_split)
from tinyllm.instruct_run import InstructSettings, run_instruct  # noqa: E402
from tinyllm.labelled_data import python_docs_instructions  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402


def quiet(message):
    if message.startswith(("note:", "early stop", "best validation")):
        print("   ", message)


def naive_bayes_accuracy(train, test):
    """Test accuracy of multinomial naive Bayes over lower-cased words, add-one smoothing."""
    words = lambda text: re.findall(r"[a-z0-9']+", text.lower())  # noqa: E731
    counts = {label: Counter() for _, label in train}
    for text, label in train:
        counts[label].update(words(text))
    prior = Counter(label for _, label in train)
    vocab = len(set().union(*counts.values()))

    def log_p(text, label):
        total = sum(counts[label].values()) + vocab
        return math.log(prior[label]) + sum(math.log((counts[label][w] + 1) / total)
                                            for w in words(text))

    hits = sum(max(counts, key=lambda label: log_p(text, label)) == y for text, y in test)
    return hits / len(test)


def paired_gap(pretrained, random_init):
    """Mean of the per-seed differences, and its standard error (None for one seed): how far a
    mean over these seeds can be trusted. Example: [0.95, 0.93], [0.93, 0.92] -> (0.015, 0.005)."""
    diffs = [a - b for a, b in zip(pretrained, random_init)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def classify(args, out):
    nb = []
    for seed in args.seeds:
        splits = load_classification_splits(ClassifySettings(data=args.data, seed=seed))
        nb.append(naive_bayes_accuracy(splits.train + splits.val, splits.test))
        print(f" naive Bayes, seed {seed}: test accuracy {nb[-1]:.3f}")
    means, accuracies = {"naive Bayes": sum(nb) / len(nb)}, {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        accs = accuracies[name] = []
        for seed in args.seeds:
            runs = []
            for r in range(args.runs):
                settings = ClassifySettings(checkpoint=args.base, data=args.data,
                                            seed=seed + 1000 * r, split_seed=seed,
                                            random_init=random_init)
                runs.append(os.path.join(out, f"{name.split()[0]}-{seed}-{r}"))
                report = run_classify(runs[-1], settings, force=True, log=quiet)
                print(f"{name:>12}, seed {seed + 1000 * r}: test accuracy"
                      f" {report['accuracy_after']['test']:.3f} (best step"
                      f" {report['best_iter']}, {report['train_seconds']:.0f} s)")
                if r == 0:
                    accs.append(report["accuracy_after"]["test"])
            if args.runs > 1:
                with open(os.devnull, "w") as nowhere:
                    accs[-1] = score_run_split(runs, load_classifiers(runs), "test",
                                               stream=nowhere, log=quiet)["accuracy"]
                print(f"{name:>12}, seed {seed}: {args.runs} runs averaged: test accuracy"
                      f" {accs[-1]:.3f}")
        means[name] = sum(accs) / len(accs)
    averaged = f", {args.runs} runs averaged on each" if args.runs > 1 else ""
    for name, mean in means.items():
        print(f"{name:>12}: mean test accuracy {mean:.3f} over seeds {args.seeds}"
              + (averaged if name != "naive Bayes" else ""))
    gap, error = paired_gap(accuracies["pretrained"], accuracies["random init"])
    spread = "" if error is None else (f" (standard error {100 * error:.1f} over"
                                       f" {len(args.seeds)} seeds)")
    print(f"pretraining is worth {100 * gap:+.1f} points{spread}")


def instruct(args, out):
    data = os.path.join(out, "python_docs_instructions.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump(python_docs_instructions(1000), f, indent=1)
    print(f"1,000 instruction records in {data}")
    report = run_instruct(os.path.join(out, "instruct"),
                          InstructSettings(checkpoint=args.base, data=data, seed=args.seeds[0]),
                          force=True, log=quiet)
    before, best = report["val_loss_before"], report["best_val_loss"]
    print(f"records {report['records']}, shortened {report['shortened_records']}")
    print(f"validation loss on the responses: {before:.3f} (base) -> {best:.3f} (step"
          f" {report['best_iter']}): {100 * (1 - best / before):.0f}% lower")
    print(f"test token F1 {report['test_before']['token_f1']:.3f} ->"
          f" {report['test_after']['token_f1']:.3f}; exact match"
          f" {report['test_before']['exact_match']:.3f} ->"
          f" {report['test_after']['exact_match']:.3f}")
    with open(os.path.join(out, "instruct", "responses.jsonl"), encoding="utf-8") as f:
        for line in list(f)[:3]:
            row = json.loads(line)
            print(f"  {row['instruction']} {row['input'][:60]!r}\n    -> {row['response']!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["classify", "instruct"],
                        help="classify --data, or instruction-tune on a made Alpaca-layout file")
    parser.add_argument("--base", required=True, help="run directory of `tinyllm pretrain`")
    parser.add_argument("--data", help="labelled file for classify")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="classify: one run (or --runs runs) from the base and one from"
                             " random initialisation for each seed (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1,
                        help="classify: runs averaged on each seed's split (default: %(default)s)")
    parser.add_argument("--out", default=None, help="where to keep the runs (default: a temp dir)")
    args = parser.parse_args()
    if args.task == "classify" and not args.data:
        parser.error("classify needs --data FILE")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    tune_malloc()
    out = args.out or tempfile.mkdtemp(prefix="tinyllm-real-")
    os.makedirs(out, exist_ok=True)
    classify(args, out) if args.task == "classify" else instruct(args, out)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
