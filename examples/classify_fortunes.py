"""Classification fine-tuning on real short texts: the quotations of the Debian `fortunes` package.

    apt-get install fortunes        # real categorised quotations in /usr/share/games/fortunes
    python examples/classify_fortunes.py --base runs/pretrain [--classes definitions people]

Builds a balanced set of 1,500 short fortunes (<= 160 characters, whitespace collapsed) from two
categories, 750 each, as a TSV in a temporary directory (the text is never copied into this
repository), then runs `tinyllm finetune classify` on it through the library and prints the test
accuracy. Note what the model can use: "definitions" fortunes are mostly written as a dictionary
entry ("Word, n.: ..."), a strong surface cue, while "people" fortunes are quotations.
"""

import argparse
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.classify_run import ClassifySettings, run_classify  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"


def short_fortunes(category, max_chars=160):
    """The fortunes of one category file that are at most max_chars long, whitespace collapsed."""
    path = os.path.join(FORTUNES, category)
    if not os.path.exists(path):
        sys.exit(f"{path} not found: install the Debian package `fortunes` first")
    with open(path, encoding="utf-8", errors="replace") as f:
        entries = f.read().split("\n%\n")
    texts = (" ".join(entry.split()) for entry in entries)
    return sorted({t for t in texts if t and len(t) <= max_chars and "\t" not in t})


def build_tsv(classes, per_class, path, seed):
    """A balanced label<TAB>text file; returns how many examples it has."""
    rng = random.Random(seed)
    rows = []
    for label in classes:
        texts = short_fortunes(label)
        if len(texts) < per_class:
            sys.exit(f"{label}: only {len(texts)} short fortunes, need {per_class}")
        rows += [(label, t) for t in rng.sample(texts, per_class)]
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8") as f:
        f.write("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    return len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="pretrained run directory (tinyllm pretrain)")
    parser.add_argument("--classes", nargs=2, default=["definitions", "people"],
                        help="two fortune files of /usr/share/games/fortunes, one class each "
                             "(default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=750,
                        help="fortunes drawn from each class (at most 160 characters each) "
                             "(default: %(default)s)")
    parser.add_argument("--max-iters", type=int, default=ClassifySettings.max_iters,
                        help="most fine-tuning steps (early stopping may end sooner) (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed of the draw, the split and the fine-tuning run (default: "
                             "%(default)s)")
    args = parser.parse_args()
    tune_malloc()
    work = tempfile.mkdtemp(prefix="tinyllm-fortunes-")
    data = os.path.join(work, "fortunes.tsv")
    n = build_tsv(args.classes, args.per_class, data, args.seed)
    print(f"{n} fortunes ({' vs '.join(args.classes)}) in {data}")
    settings = ClassifySettings(checkpoint=args.base, data=data, max_iters=args.max_iters,
                                seed=args.seed)
    report = run_classify(os.path.join(work, "run"), settings, force=True,
                          log=lambda m: None if m.startswith("iter ") else print("   ", m))
    before, after = report["accuracy_before"], report["accuracy_after"]
    print(f"test accuracy {100 * before['test']:.1f}% before -> {100 * after['test']:.1f}% after"
          f" fine-tuning ({report['train_seconds']:.0f} s); run in {work}/run")


if __name__ == "__main__":
    main()
