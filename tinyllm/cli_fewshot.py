"""`tinyllm fewshot`: measure zero- and few-shot accuracy of a pretrained model on task files.

See tinyllm/fewshot.py for the task-file format, the prompt template and how answers are scored.
"""

import os

import click
import numpy as onp

from .cli_common import DEFAULT_RUN, positive, user_errors
from .errors import TinyLLMError

RESULTS_FORMAT = "tinyllm-fewshot-results"
RESULTS_VERSION = 1


def heldout_ids(ckpt, data):
    """Token ids of held-out text for the ICL score: `data`, or the checkpoint corpus's val split.

    Pretraining validates on the last 10% of its corpus and never trains on it, so that part is
    held out. A file or corpus named by --icl-data is used whole. Returns (ids, description).
    """
    from .data import load_corpus, train_val_split

    if data is None:
        data = ckpt.meta.get("data") or "pydoc"
        text = load_corpus(data)
        return train_val_split(ckpt.tokenizer.encode(text))[1], f"{data} (validation split)"
    try:
        return ckpt.tokenizer.encode(load_corpus(data)), data
    except TinyLLMError as err:
        raise TinyLLMError(f"--icl-data {data}: {err}") from None


@click.command()
@click.option("--checkpoint", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm pretrain`.")
@click.option("--task", "task_paths", multiple=True, required=True,
              type=click.Path(dir_okay=False),
              help="JSONL task file (see `tinyllm/fewshot.py`); repeat to pool several tasks.")
@click.option("--shots", default="0,1,2,4,8",
              help="Comma-separated numbers of demonstrations k to evaluate.")
@click.option("--queries", default=None, type=int, callback=positive,
              help="Queries per task, sampled from its records.  [default: all records]")
@click.option("--seed", default=0, help="Seed for choosing queries and demonstrations.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Write the results as JSON to this file (atomically).  [default: none]")
@click.option("--icl-data", default=None, metavar="FILE|NAME",
              help="Held-out text for the in-context learning score."
                   "  [default: the validation split of the checkpoint's corpus]")
@click.option("--icl-windows", default=200,
              help="Context windows averaged for the in-context learning score (0: skip it).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw accuracy against k (Wilson intervals, chance line) to this PNG or"
                   " .svg file; needs the plot extra.  [default: none]")
@user_errors
def fewshot(checkpoint, task_paths, shots, queries, seed, out, icl_data, icl_windows, plot_path):
    """Score a pretrained model on tasks with k = 0, 1, 2, ... demonstrations in its prompt.

    Prints accuracy by k with the chance level and a 95% Wilson interval (pooled over all
    --task files), then the in-context learning score of Olsson et al. (2022): mean loss late in
    the context minus early (negative: more context helps).
    """
    from .checkpoint import load_checkpoint
    from .fewshot import (check_enough_records, evaluate_task, format_table, icl_score,
                          parse_shots, pool_results, read_task)
    from .fileio import atomic_write_json

    if plot_path:  # before the slow part: say at once if matplotlib is missing
        from .plot import require_matplotlib

        require_matplotlib()
    shot_list = parse_shots(shots)
    if icl_windows < 0:
        raise TinyLLMError(f"--icl-windows must be >= 0, got {icl_windows}")
    tasks = [read_task(p) for p in task_paths]  # check every file before the slow part
    for task in tasks:
        check_enough_records(task, max(shot_list))
    ckpt = load_checkpoint(checkpoint)
    per_task = []
    for task in tasks:
        click.echo(f"{task.path}: {len(task.records)} records,"
                   f" {'choices (log-likelihood)' if task.choices else 'exact match (greedy)'}",
                   err=True)
        per_task.append(evaluate_task(ckpt.params, ckpt.model_config, ckpt.tokenizer, task,
                                      shot_list, queries, seed,
                                      log=lambda line: click.echo("  " + line, err=True)))
    pooled = pool_results(per_task)
    click.echo("\n".join(format_table(pooled)))
    if plot_path:
        from .plot import draw_fewshot, picture_format

        click.echo(f"accuracy by k drawn, written to"
                   f" {draw_fewshot(pooled, plot_path, picture_format(plot_path))}")
    icl = None
    if icl_windows:
        ids, source = heldout_ids(ckpt, icl_data)
        icl = {"data": source, **icl_score(ckpt.params, ckpt.model_config, onp.asarray(ids),
                                           icl_windows, seed)}
        click.echo(f"in-context learning score on {source}: {icl['score']:+.3f} nats"
                   f" (+/- {icl['stderr']:.3f}) = loss at token {icl['late_position']}"
                   f" ({icl['late_loss']:.3f}) - loss at token {icl['early_position']}"
                   f" ({icl['early_loss']:.3f}), {icl['n_windows']} windows")
    if out:
        atomic_write_json(out, {
            "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
            "checkpoint": os.path.abspath(checkpoint), "iter": ckpt.iter, "seed": seed,
            "shots": shot_list, "template": "{instruction}\\n{input}{output}\\n...{input}",
            "tasks": [{"path": t.path, "records": len(t.records),
                       "scoring": "choices" if t.choices else "exact-match", "results": rows}
                      for t, rows in zip(tasks, per_task)],
            "pooled": pooled, "icl_score": icl,
        })
        click.echo(f"results written to {out}")


def examples_prompt(path, shots, prompt, tokenizer):
    """`tinyllm generate --examples FILE --shots K`: K demonstrations, then the user's prompt.

    The demonstrations are the task file's first K records, in the fewshot template, so a person
    can try by hand exactly the prompts `tinyllm fewshot` measures: --prompt is the query input.
    """
    from .fewshot import encode_for, fewshot_prefix, read_task

    if shots < 0:
        raise TinyLLMError(f"--shots must be >= 0, got {shots}")
    task = read_task(path)
    for record in task.records[:shots]:
        encode_for(tokenizer, record["input"] + record["output"], task, record)
    if task.instruction:
        encode_for(tokenizer, task.instruction, task, {"line": 1})
    return fewshot_prefix(task, shots) + prompt
