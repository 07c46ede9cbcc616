"""Measure the fine-tuning targets on the embedded data sets, through the library API.

    python examples/finetune_targets.py --base runs/pretrain [--task classify|instruct|both]

--base is a run of `tinyllm pretrain` (its defaults). Without it, a base model is pretrained
first with the defaults (--pretrain-iters steps).

classify: fine-tunes the pretrained model on the embedded sentences by subject, then the
same architecture from random initialisation with the same settings, and prints both test
accuracies. instruct: instruction-tunes the pretrained model on the embedded tasks and prints
test exact match before and after. Runs go to a temporary directory unless --out is given.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.classify_run import ClassifySettings, run_classify  # noqa: E402
from tinyllm.instruct_run import InstructSettings, run_instruct  # noqa: E402
from tinyllm.config import GPTConfig, TrainConfig  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.pretrain import pretrain  # noqa: E402


def quiet(message):
    if not message.startswith("iter "):
        print("   ", message)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None,
                        help="pretrained run directory (default: pretrain one first)")
    parser.add_argument("--pretrain-iters", type=int, default=TrainConfig().max_iters,
                        help="steps of the base pretrained when --base is not given (default: "
                             "%(default)s)")
    parser.add_argument("--task", choices=["classify", "instruct", "both"], default="both",
                        help="which embedded set to fine-tune on (default: %(default)s)")
    parser.add_argument("--classify-iters", type=int, default=ClassifySettings.max_iters,
                        help="most classification fine-tuning steps (default: %(default)s)")
    parser.add_argument("--instruct-iters", type=int, default=InstructSettings.max_iters,
                        help="most instruction fine-tuning steps (default: %(default)s)")
    parser.add_argument("--out", default=None, help="where to keep the runs (default: a temp dir)")
    args = parser.parse_args()
    tune_malloc()
    out = args.out or tempfile.mkdtemp(prefix="tinyllm-finetune-")
    base = args.base
    if base is None:
        base = os.path.join(out, "base")
        print(f"pretraining a base model for {args.pretrain_iters} steps in {base} ...")
        pretrain(GPTConfig(), TrainConfig(max_iters=args.pretrain_iters), base,
                 log=quiet)

    if args.task in ("classify", "both"):
        results = {}
        for name, random_init in (("pretrained", False), ("random init", True)):
            print(f"classify, {name}:")
            t0 = time.perf_counter()
            settings = ClassifySettings(checkpoint=base, random_init=random_init,
                                        max_iters=args.classify_iters)
            report = run_classify(os.path.join(out, f"classify-{'random' if random_init else 'pre'}"),
                                  settings, force=True, log=quiet)
            results[name] = (report["accuracy_after"]["test"], time.perf_counter() - t0,
                             report["train_seconds"])
        for name, (acc, total, train) in results.items():
            print(f"classify {name:>12}: test accuracy {100 * acc:.1f}%"
                  f" (fine-tuning {train:.0f} s, whole command {total:.0f} s)")

    if args.task in ("instruct", "both"):
        print("instruct, pretrained:")
        t0 = time.perf_counter()
        report = run_instruct(os.path.join(out, "instruct"),
                              InstructSettings(checkpoint=base, max_iters=args.instruct_iters),
                              force=True, log=quiet)
        before, after = report["test_before"], report["test_after"]
        print(f"instruct: test exact match {100 * before['exact_match']:.1f}% (base) ->"
              f" {100 * after['exact_match']:.1f}% (fine-tuned), token F1"
              f" {100 * after['token_f1']:.1f}%; fine-tuning {report['train_seconds']:.0f} s,"
              f" whole command {time.perf_counter() - t0:.0f} s")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
