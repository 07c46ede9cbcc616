"""An encoder pretrained by masked tokens (MLM) against a decoder pretrained by next tokens (CLM).

Make the two bases with the default flags, then compare them:

    tinyllm pretrain --out runs/pretrain                    # causal (clm)
    tinyllm pretrain --objective mlm --out runs/mlm         # masked (mlm)
    python examples/mlm_vs_clm.py --mlm runs/mlm --clm runs/pretrain [--data youtube-spam.csv]

It prints, for each figure, what it measured:
1. pretraining: steps and mean ms per step of each base (from their metrics.jsonl);
2. masked-token accuracy of the MLM base on its validation split (positions replaced by the mask
   token), beside the unigram baseline: always guessing the most frequent token;
3. classification, test accuracy for each seed and the mean: the MLM encoder, the causal decoder,
   and the causal weights run as an encoder (`--arch encoder`), on the embedded set of
   sentences by subject and on --data if given (default fine-tuning flags, seeds 1, 2, 3);
4. `tinyllm embed` on the embedded classification set (and --data): how often the nearest
   other text (cosine) has the same label, for each base, against chance.
"""

import argparse
import json
import os
import sys

import numpy as onp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.data import train_val_split  # noqa: E402
from tinyllm.embed import embed_texts, load_embedder, nearest_neighbour_agreement  # noqa: E402
from tinyllm.classify_run import ClassifySettings, run_classify  # noqa: E402
from tinyllm.labelled_data import default_classification_data, read_classification  # noqa: E402
from tinyllm.mlm import masked_accuracy  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.rundir import run_corpus  # noqa: E402
from tinyllm.train import read_metrics  # noqa: E402


def pretraining(run):
    """(steps, mean ms per step over the evaluations after the first) of a pretraining run."""
    records = read_metrics(run)
    ms = [r["ms_per_iter"] for r in records if r["iter"] > 0]
    return records[-1]["iter"], sum(ms) / len(ms), records[-1]["val_loss"]


def mlm_accuracy(run):
    ckpt = load_checkpoint(run, kind="mlm")
    ids = onp.asarray(ckpt.tokenizer.encode(run_corpus(ckpt.meta, run)), dtype=onp.int32)
    return masked_accuracy(ckpt.params, ckpt.model_config, ckpt.tokenizer,
                           train_val_split(ids)[1], n_batches=50)


def classify(base, data, seeds, out, **flags):
    """Test accuracy after fine-tuning for each seed."""
    accs = []
    for seed in seeds:
        settings = ClassifySettings(checkpoint=base, data=data, seed=seed, **flags)
        report = run_classify(os.path.join(out, f"seed{seed}"), settings, force=True,
                              log=lambda *a: None)
        accs.append(report["accuracy_after"]["test"])
    return accs


def neighbours(run, data=None):
    examples = read_classification(data, None, None) if data else default_classification_data()
    params, config, tokenizer, bidirectional = load_embedder(run)
    vectors, _ = embed_texts(params, config, tokenizer, [t for t, _ in examples], bidirectional)
    return nearest_neighbour_agreement(vectors, [label for _, label in examples])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlm", default="runs/mlm",
                        help="MLM run (pretrain --objective mlm) (default: %(default)s)")
    parser.add_argument("--clm", default="runs/pretrain",
                        help="causal run (pretrain) (default: %(default)s)")
    parser.add_argument("--data", default=None, help="a labelled file to classify as well")
    parser.add_argument("--seeds", default="1,2,3",
                        help="fine-tuning seeds, separated by commas (default: %(default)s)")
    parser.add_argument("--out", default="runs/mlm_vs_clm",
                        help="where the fine-tuning runs go (default: %(default)s)")
    parser.add_argument("--parts", default="pretrain,accuracy,classify,embed",
                        help="the figures to measure (the docstring's four), separated by commas "
                             "(default: %(default)s)")
    args = parser.parse_args()
    tune_malloc()
    seeds, parts = [int(s) for s in args.seeds.split(",")], args.parts.split(",")
    if "pretrain" in parts:
        for name, run in (("mlm", args.mlm), ("clm", args.clm)):
            steps, ms, val = pretraining(run)
            print(f"pretraining {name}: {steps} steps, {ms:.0f} ms per step, val loss {val:.3f}")
    if "accuracy" in parts:
        acc = mlm_accuracy(args.mlm)
        print(f"masked-token accuracy {acc['accuracy']:.3f} over {acc['positions']} masked"
              f" positions; most frequent token {acc['baseline_token']!r}: {acc['baseline']:.3f}")
    if "classify" in parts:
        variants = (("mlm encoder", args.mlm, {}), ("clm decoder", args.clm, {}),
                    ("clm --arch encoder", args.clm, {"arch": "encoder"}))
        for data in [None] + ([args.data] if args.data else []):
            for name, base, flags in variants:
                out = os.path.join(args.out, os.path.basename(data or "embedded"),
                                   name.replace(" ", "_").replace("--", ""))
                accs = classify(base, data, seeds, out, **flags)
                print(f"classify {os.path.basename(data or 'embedded set')}, {name}: test"
                      f" {json.dumps([round(a, 3) for a in accs])}, mean {sum(accs) / len(accs):.3f}",
                      flush=True)
    if "embed" in parts:
        for data in [None] + ([args.data] if args.data else []):
            for name, run in (("mlm", args.mlm), ("clm", args.clm)):
                same, chance = neighbours(run, data)
                print(f"embed {name}, {os.path.basename(data or 'embedded set')}: the nearest"
                      f" neighbour has the same label {same:.3f} (chance {chance:.3f})")


if __name__ == "__main__":
    main()
