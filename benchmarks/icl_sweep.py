"""What in-context learning depends on: pretrain on the `icl` corpus with one setting, score unseen tasks.

    OPENBLAS_NUM_THREADS=1 python benchmarks/icl_sweep.py --no-bias --seed 1 --results icl.jsonl
    python benchmarks/icl_sweep.py --checkpoint runs/icl    # score a run `tinyllm pretrain` made

One run per call (runs are minutes long on a CPU: a grid is a shell loop over this script). The
model and schedule default to examples/in_context_learning.py's (2 layers, 4 heads, 64 channels,
context 96, batch 32, lr 4e-3 to 4e-4, 200 warm-up steps, 3000 steps); each flag changes one of
them. The run is scored like the example: 12 held-out functions (fresh, checked to occur nowhere
in the corpus) x 15 queries, greedy exact match at k = 0, 1, 2, 4, 8, plus the hand-written
examples/tasks/phone_keypad.jsonl (the tasks are those of examples/tasks/heldout/, and all 60
records of each are scored by `tinyllm fewshot --task examples/tasks/heldout`; here 15 per task
keep a run's scoring short). One JSON line per run is printed and appended to --results.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm import fewshot as fs  # noqa: E402
from tinyllm.checkpoint import load_checkpoint  # noqa: E402
from tinyllm.config import GPTConfig, TrainConfig  # noqa: E402
from tinyllm.icl_corpus import FAMILIES, heldout_task  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.pretrain import pretrain  # noqa: E402

SHOTS = [0, 1, 2, 4, 8]
KEYPAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "tasks",
                      "phone_keypad.jsonl")


def heldout_tasks(n_tasks):
    """n_tasks unseen functions on 4 inputs, cycling through the families (as the example)."""
    tasks = []
    for seed in range(n_tasks):
        family = sorted(FAMILIES)[seed % len(FAMILIES)]
        header, records = heldout_task(seed, family=family, domain_size=4, n_records=60)
        tasks.append(fs.parse_task(fs.task_lines(header, records), f"held-out-{seed}"))
    return tasks


def accuracies(result, tasks, queries):
    """Pooled accuracy at each k over `tasks`: {k: accuracy}."""
    rows = [fs.evaluate_task(result["params"], result["model_config"], result["tokenizer"], t,
                             SHOTS, n_queries=queries, seed=i) for i, t in enumerate(tasks)]
    return {row["k"]: round(row["accuracy"], 3) for row in fs.pool_results(rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--max-iters", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    parser.add_argument("--warmup-iters", type=int, default=200)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--results", default=None, help="append the JSON line to this file")
    parser.add_argument("--out", default=None, help="keep the run here (default: a temp dir)")
    parser.add_argument("--checkpoint", default=None,
                        help="score this finished run instead of training (model flags ignored)")
    args = parser.parse_args()
    tune_malloc()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        result = {"params": ckpt.params, "model_config": ckpt.model_config,
                  "tokenizer": ckpt.tokenizer}
        line = {"checkpoint": args.checkpoint, "bias": ckpt.model_config.bias,
                "seed": ckpt.train_config.seed, "max_iters": ckpt.train_config.max_iters,
                "lr": ckpt.train_config.lr, "n_layer": ckpt.model_config.n_layer,
                "heldout": accuracies(result, heldout_tasks(12), 15),
                "keypad": accuracies(result, [fs.read_task(KEYPAD)], None)}
        report(line, args.results)
        return
    t0 = time.perf_counter()
    model = GPTConfig(block_size=96, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd,
                      bias=args.bias)
    train = TrainConfig(batch_size=args.batch_size, max_iters=args.max_iters, lr=args.lr,
                        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
                        warmup_iters=args.warmup_iters, weight_decay=args.weight_decay,
                        eval_interval=args.max_iters, eval_iters=5, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        result = pretrain(model, train, args.out or tmp, data="icl", tokenizer_kind="char",
                          force=True)
    seconds = time.perf_counter() - t0
    line = {"bias": args.bias, "seed": args.seed, "max_iters": args.max_iters, "lr": args.lr,
            "min_lr": train.min_lr, "warmup_iters": args.warmup_iters, "n_layer": args.n_layer,
            "n_embd": args.n_embd, "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "val_loss": round(result["final"]["val_loss"], 4),
            "heldout": accuracies(result, heldout_tasks(12), 15),
            "keypad": accuracies(result, [fs.read_task(KEYPAD)], None),
            "train_seconds": round(seconds)}
    report(line, args.results)


def report(line, results):
    """Print the JSON line and append it to the results file, if any."""
    print(json.dumps(line))
    if results:
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
