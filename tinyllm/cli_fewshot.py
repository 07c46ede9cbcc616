"""`tinyllm fewshot`: measure zero- and few-shot accuracy of a pretrained model on task files.

See tinyllm/fewshot.py for the task-file format, the prompt template, how answers are scored
and the results file; this module only maps flags onto `fewshot.run_fewshot`.
"""

import click

from .cli_common import count, no_cache_option, positive, random_seed, user_errors
from .cli_encoder import check_out_directory
from .config import DEFAULT_RUN
from .fewshot import ICL_WINDOWS, SHOTS
from .progress import Counting


@click.command()
@click.option("--checkpoint", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm pretrain`, or by `tinyllm finetune"
                   " instruct` (LoRA adapters merged).")
@click.option("--task", "task_paths", multiple=True, required=True, type=click.Path(),
              help="JSONL task file (see `tinyllm/fewshot.py`), or a directory of them; repeat"
                   " to pool several tasks.")
@click.option("--shots", default=SHOTS,
              help="Comma-separated numbers of demonstrations k to evaluate.")
@click.option("--queries", default=None, type=int, callback=positive,
              help="Queries per task, sampled from its records; a task with fewer records uses"
                   " all of them (a note names it).  [default: all records]")
@click.option("--seed", default=0, callback=random_seed, help="Seed for choosing queries and demonstrations.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Write the results as JSON to this file (atomically).  [default: none]")
@click.option("--icl-data", default=None, metavar="FILE|NAME",
              help="Held-out text for the in-context learning score; needed for a fine-tuning"
                   " run, which keeps no pretraining text."
                   "  [default: the validation split of the checkpoint's corpus]")
@click.option("--icl-windows", default=ICL_WINDOWS, callback=count,
              help="Context windows averaged for the in-context learning score (0: skip it).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw accuracy against k (Wilson intervals, chance line) to this PNG or"
                   " .svg file; needs the plot extra.  [default: none]")
@no_cache_option
@user_errors
def fewshot(checkpoint, task_paths, shots, queries, seed, out, icl_data, icl_windows, plot_path,
            no_cache):
    """Score a pretrained model on tasks with k = 0, 1, 2, ... demonstrations in its prompt.

    Prints each task's accuracy at every k (so a task the model cannot do is not averaged
    away), then accuracy by k pooled over all --task files with the chance level and a 95%
    Wilson interval, then the in-context learning score of Olsson et al. (2022): mean loss late
    in the context minus early (negative: more context helps).
    """
    from .fewshot import (format_icl, format_table, format_task_table, parse_shots, run_fewshot,
                          write_results)

    if plot_path:  # before the slow part: say at once if matplotlib is missing or --plot wrong
        from .plot import picture_format, require_matplotlib

        require_matplotlib()
        plot_format = picture_format(plot_path)
        check_out_directory(plot_path, "--plot")
    if out:
        check_out_directory(out)
    results = run_fewshot(checkpoint, task_paths, parse_shots(shots), queries, seed, icl_data,
                          icl_windows, log=lambda line: click.echo(line, err=True),
                          use_cache=not no_cache,
                          progress=lambda total: Counting(total, "queries scored"))
    click.echo("\n".join(format_task_table(results["tasks"])))
    click.echo(f"\npooled over {len(results['tasks'])} task(s):")
    click.echo("\n".join(format_table(results["pooled"])))
    if results["icl_score"]:
        click.echo(format_icl(results["icl_score"]))
    if plot_path:
        from .plot import draw_fewshot

        click.echo(f"accuracy by k drawn, written to"
                   f" {draw_fewshot(results['pooled'], plot_path, plot_format)}")
    if out:
        write_results(out, results)
        click.echo(f"results written to {out}")
