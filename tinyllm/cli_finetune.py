"""`tinyllm finetune classify|instruct` and `tinyllm classify`: Click commands that map flags onto
the fine-tuning runners in tinyllm/finetune_runs.py.
"""

import os

import click

from .cli_common import count, non_negative, positive, random_seed, step_count, user_errors
from .errors import TinyLLMError
from .finetune import confusion_matrix
from .finetune_runs import (_fmt_acc, accuracy, encode_classification, format_confusion,
                            classify_texts, load_classifier, run_classify, run_instruct)
from .labelled_data import read_classification


# ----------------------------------------------------------------------------- Click commands


def training_options(max_iters, lr, warmup_iters, eval_interval, batch_size):
    """The training flags both fine-tuning commands share, with per-command defaults."""
    options = [
        click.option("--data", default=None, type=click.Path(dir_okay=False),
                     help="Labelled data file (see the command's help).  [default: embedded set]"),
        click.option("--val-data", default=None, type=click.Path(dir_okay=False),
                     help="Validation file; with --test-data replaces the random split."),
        click.option("--test-data", default=None, type=click.Path(dir_okay=False),
                     help="Test file; with --val-data replaces the random split."),
        click.option("--checkpoint", default=None, type=click.Path(file_okay=False),
                     help="Pretrained run directory (`tinyllm pretrain`).  [default: none: random"
                          " init of the default pretraining architecture]"),
        click.option("--random-init", is_flag=True,
                     help="Use --checkpoint's architecture and tokenizer but random weights"
                          " (the from-scratch baseline)."),
        click.option("--lora-rank", default=0, callback=count, help="LoRA adapter rank; 0: no LoRA (train weights)."),
        click.option("--lora-alpha", default=None, type=float,
                     help="LoRA scale numerator (change = alpha/rank * A B).  [default: 2 * rank]"),
        click.option("--batch-size", default=batch_size, callback=positive, help="Examples per step."),
        click.option("--max-iters", default=max_iters, callback=step_count,
                     help="Optimizer steps (with --resume: the new total)."),
        click.option("--epochs", default=None, callback=positive, type=float,
                     help="Passes over the training split; overrides --max-iters.  [default: off]"),
        click.option("--lr", default=lr, callback=positive, help="Peak learning rate (cosine decay to lr/10)."),
        click.option("--warmup-iters", default=warmup_iters, callback=non_negative, help="Steps of linear warm-up."),
        click.option("--weight-decay", default=0.01, callback=non_negative, help="AdamW decoupled weight decay."),
        click.option("--eval-interval", default=eval_interval, callback=step_count,
                     help="Evaluate the validation loss and save a checkpoint every this many steps."),
        click.option("--eval-iters", default=5, callback=positive, help="Batches per evaluation."),
        click.option("--seed", default=1337, callback=random_seed, help="Seed for the split, initialisation and batches."),
        click.option("--resume", is_flag=True, help="Continue the run in --out (only --max-iters may change)."),
        click.option("--force", is_flag=True, help="Overwrite an existing run in --out."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _given(name):
    return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


@click.group()
def finetune():
    """Fine-tune a pretrained model on labelled data: classify or instruct."""


@finetune.command("classify")
@click.option("--out", default="runs/classify", type=click.Path(file_okay=False),
              help="Run directory (checkpoint, metrics.jsonl, metrics.json).")
@click.option("--text-column", default=None,
              help="CSV/TSV column (header name or 0-based position) holding the text.  [default:"
                   " 'text', or column 0 without a header]")
@click.option("--label-column", default=None,
              help="CSV/TSV column holding the label.  [default: 'label', or column 1]")
@click.option("--arch", type=click.Choice(["decoder", "encoder"]), default="decoder",
              help="decoder: causal, as pretrained; encoder: the same weights run bidirectionally.")
@click.option("--pooling", type=click.Choice(["last", "mean", "first"]), default=None,
              help="How a sequence becomes one vector.  [default: last for decoder, mean for encoder]")
@click.option("--freeze", default="none",
              help="What stays fixed: none (all trains), all (head only trains), all-but-N (the"
                   " last N blocks, final norm and head train).")
@click.option("--balance", "do_balance", is_flag=True,
              help="Downsample larger classes to the size of the smallest.")
@training_options(max_iters=200, lr=3e-4, warmup_iters=20, eval_interval=50, batch_size=16)
@user_errors
def finetune_classify(out, text_column, label_column, arch, pooling, freeze, do_balance, **kw):
    """Fine-tune a classifier on texts with labels (.csv, .tsv, .jsonl with text and label).

    Without --data it uses the embedded set (pydoc sentences, real vs letter-scrambled). Without
    --val-data/--test-data the data is split 70/10/20 with --seed. Reports accuracy before and
    after, a confusion matrix and per-class precision/recall, written to OUT/metrics.json.
    """
    report = run_classify(out, text_column=text_column, label_column=label_column, arch=arch,
                          pooling=pooling, freeze=freeze, do_balance=do_balance,
                          max_iters_given=_given("max_iters"), log=click.echo, **kw)
    click.echo("accuracy after fine-tuning:  " + _fmt_acc(report["accuracy_after"]))
    click.echo("test confusion matrix (rows: true, columns: predicted):")
    click.echo(format_confusion(report["test_confusion_matrix"], report["labels"]))
    for label, stats in report["test_per_class"].items():
        click.echo(f"  {label}: precision {100 * stats['precision']:.1f}%, recall"
                   f" {100 * stats['recall']:.1f}% ({stats['support']} examples)")
    click.echo(f"done in {report['train_seconds']:.0f} s; metrics in {os.path.join(out, 'metrics.json')}")


@finetune.command("instruct")
@click.option("--out", default="runs/instruct", type=click.Path(file_okay=False),
              help="Run directory (checkpoint, metrics.jsonl, responses.jsonl, metrics.json).")
@click.option("--include-prompt", is_flag=True,
              help="Compute the loss on the prompt tokens too (default: response tokens only).")
@click.option("--max-new-tokens", default=32, callback=count, help="Most tokens per generated test response.")
@training_options(max_iters=1500, lr=1e-3, warmup_iters=50, eval_interval=250, batch_size=16)
@user_errors
def finetune_instruct(out, include_prompt, max_new_tokens, **kw):
    """Instruction-tune a model on records with instruction, optional input, and output
    (a JSON array or JSONL, Alpaca layout). Each record becomes

    \b
        Instruction: {instruction}
        Input: {input}            (this line only when input is not empty)
        Response: {output}<|endoftext|>

    and the loss counts the response tokens only. Without --data it uses embedded tasks
    (reverse, uppercase, sort letters, add). Split 85/5/10 with --seed; at the end the test
    responses go to OUT/responses.jsonl and exact match / token F1 to OUT/metrics.json.
    """
    report = run_instruct(out, include_prompt=include_prompt, max_new_tokens=max_new_tokens,
                          max_iters_given=_given("max_iters"), log=click.echo, **kw)
    b, a = report["test_before"], report["test_after"]
    click.echo(f"test exact match: {100 * b['exact_match']:.1f}% -> {100 * a['exact_match']:.1f}%;"
               f" token F1: {100 * b['token_f1']:.1f}% -> {100 * a['token_f1']:.1f}%")
    click.echo(f"done in {report['train_seconds']:.0f} s; responses in"
               f" {os.path.join(out, 'responses.jsonl')}, metrics in {os.path.join(out, 'metrics.json')}")


@click.command("classify")
@click.option("--checkpoint", default="runs/classify", type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm finetune classify`.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Score a whole labelled file (.csv/.tsv/.jsonl) and print its accuracy.")
@click.option("--text-column", default=None, help="As for `finetune classify`.")
@click.option("--label-column", default=None, help="As for `finetune classify`.")
@click.argument("text", required=False)
@user_errors
def classify(checkpoint, data, text_column, label_column, text):
    """Classify TEXT (prints the label and class probabilities), or score --data FILE."""
    params, config, tokenizer, labels = load_classifier(checkpoint)
    if (text is None) == (data is None):
        raise TinyLLMError("give either a TEXT argument or --data FILE")
    if text is not None:
        probs = classify_texts(params, config, tokenizer, [text])[0]
        click.echo(labels[int(probs.argmax())])
        for label, p in sorted(zip(labels, probs), key=lambda lp: -lp[1]):
            click.echo(f"  {label}: {p:.3f}")
        return
    examples = read_classification(data, text_column, label_column)
    ids, valid, y, truncated, _ = encode_classification(tokenizer, examples, labels,
                                                        config.block_size, data)
    acc, pred = accuracy(params, config, ids, valid, y)
    click.echo(f"{len(y)} examples{f' ({truncated} truncated)' if truncated else ''}:"
               f" accuracy {100 * acc:.1f}%")
    click.echo(format_confusion(confusion_matrix(y, pred, len(labels)), labels))
