"""`tinyllm finetune classify|instruct` and `tinyllm classify`: Click commands that map flags onto
the settings dataclasses of tinyllm/classify_run.py and tinyllm/instruct_run.py and call their
runners.

Every default comes from the dataclass field (ClassifySettings, InstructSettings).
"""

import os
from dataclasses import fields

import click

from . import distributed
from .classify_run import (LR_AND_WARMUP, ClassifySettings, averaged_probs, format_accuracies,
                           format_confusion, label_texts, load_classifiers, per_class_stats,
                           run_classify, score_file, score_run_split)
from .cli_common import (count, flag_given, fraction, no_cache_option, non_negative,
                         note_flags_resume_ignores, positive, random_seed, shown_text, step_count,
                         training_time, user_errors)
from .distributed import abort_on_error
from .embed import read_lines
from .errors import TinyLLMError
from .finetune import DEFAULT_POOLING, POOLINGS
from .finetune_runs import DATA_FLAGS, data_fingerprints
from .instruct_run import InstructSettings, run_instruct
from .labelled_data import UNK_TOKEN
from .rundir import prepare_out_dir

MOST_CLASSES_SHOWN = 20  # a wider confusion matrix is not printed (see echo_confusion)


def training_options(settings_cls):
    """The training flags both fine-tuning commands share, with `settings_cls`'s defaults."""
    d = settings_cls()

    def by_base(name):
        """The default of a flag that the base's objective sets (classify_run.LR_AND_WARMUP)."""
        if getattr(d, name) is not None:
            return ""  # click shows the default
        index = ("lr", "warmup_iters").index(name)
        clm, mlm = (LR_AND_WARMUP[objective][index] for objective in ("clm", "mlm"))
        return (f"  [default: {clm:g}; {mlm:g} from an MLM checkpoint (pretrain --objective mlm),"
                " see docs/experiments.md]")

    options = [
        click.option("--data", default=None, type=click.Path(dir_okay=False),
                     help="Labelled data file (see the command's help).  [default: embedded set]"),
        click.option("--val-data", default=None, type=click.Path(dir_okay=False),
                     help="Validation file; with --test-data replaces the random split."
                          "  [default: none]"),
        click.option("--test-data", default=None, type=click.Path(dir_okay=False),
                     help="Test file; with --val-data replaces the random split.  [default: none]"),
        click.option("--checkpoint", default=None, type=click.Path(file_okay=False),
                     help="Pretrained run directory (`tinyllm pretrain`).  [default: none: random"
                          " init of the default pretraining architecture]"),
        click.option("--random-init", is_flag=True,
                     help="Use --checkpoint's architecture and tokenizer but random weights"
                          " (the from-scratch baseline)."),
        click.option("--lora-rank", default=d.lora_rank, callback=count,
                     help="LoRA adapter rank; 0: no LoRA (train weights). With R > 0 only the"
                          " adapters (and a classifier's head) train."),
        click.option("--lora-alpha", default=None, type=float,
                     help="LoRA scale numerator (change = alpha/rank * A B).  [default: 2 * rank]"),
        click.option("--batch-size", default=d.batch_size, callback=positive,
                     help="Examples per step."),
        click.option("--grad-accum", default=d.grad_accum, callback=positive,
                     help="Micro-batches of --batch-size per optimizer step, gradients averaged"
                          " (under `mpirun -n N`: on each rank)."),
        click.option("--max-iters", default=d.max_iters, callback=step_count,
                     help="Most optimizer steps (with --resume: the new total)."),
        click.option("--epochs", default=None, callback=positive, type=float,
                     help="Passes over the training split, instead of --max-iters: an epoch is"
                          " as many examples as the split has records read (`finetune classify`"
                          " draws them from the records and their case copies), over all"
                          " --grad-accum micro-batches and MPI ranks; rounded up to whole steps."
                          "  [default: off]"),
        click.option("--lr", default=d.lr, type=float, callback=positive,
                     help="Peak learning rate (cosine decay to lr/10)." + by_base("lr")),
        click.option("--warmup-iters", default=d.warmup_iters, type=int, callback=non_negative,
                     help="Steps of linear warm-up." + by_base("warmup_iters")),
        click.option("--weight-decay", default=d.weight_decay, callback=non_negative,
                     help="AdamW decoupled weight decay."),
        click.option("--eval-interval", default=d.eval_interval, callback=step_count,
                     help="Evaluate the loss on the whole validation split and save a checkpoint"
                          " every this many steps, and at the last step."),
        click.option("--patience", default=d.patience, callback=count,
                     help="Stop after this many evaluations without a lower validation loss (0:"
                          " never stop early). The weights of the best evaluation are the run's"
                          " result either way."),
        click.option("--seed", default=d.seed, callback=random_seed,
                     help="Seed for initialisation and batches, and for the random split unless"
                          " --split-seed is given."),
        click.option("--split-seed", default=None, type=int, callback=random_seed,
                     help="Seed for the random split alone: runs with the same --split-seed and"
                          " different --seed train and test on the same records"
                          + (", and `tinyllm classify --checkpoint A --checkpoint B --split test`"
                             " averages them" if settings_cls is ClassifySettings else "")
                          + ".  [default: --seed]"),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out with its own settings (only --max-iters may"
                          " change; --data, --val-data or --test-data may say where a file of"
                          " the run is now, if it was moved: its sha256 must match)."),
        click.option("--force", is_flag=True, help="Overwrite an existing run in --out."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def check_flag_combinations(flags, resume):
    """Refuse a flag that another would make do nothing, rather than drop it unseen: --lora-alpha
    scales the adapters only --lora-rank makes, --epochs sets the steps --max-iters would,
    --split-seed seeds a random split that --val-data and --test-data replace (only --balance
    would still use it), and with adapters only they and the head train, whatever --freeze
    says (--freeze none too: it would train every weight)."""
    if not resume and flag_given("lora_alpha") and not flags["lora_rank"]:
        raise TinyLLMError("--lora-alpha scales LoRA adapters, and without --lora-rank R there are"
                           " none: give --lora-rank too, or leave --lora-alpha out")
    if not resume and flag_given("epochs") and flag_given("max_iters"):
        raise TinyLLMError("--epochs sets the number of steps, so --max-iters would do nothing:"
                           " give one of the two")
    if not resume and flag_given("split_seed") and flags["val_data"] and not flags.get("balance"):
        raise TinyLLMError("--split-seed seeds the random split, and with --val-data and"
                           " --test-data there is none: leave --split-seed out")
    if not resume and "freeze" in flags and flag_given("freeze") and flags["lora_rank"]:
        raise TinyLLMError(f"--freeze {flags['freeze']} does nothing with --lora-rank: only the"
                           " adapters and the head train; leave out one of the two")


def settings_from_flags(cls, flags):
    """A settings dataclass from the command's keyword arguments (names equal field names)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in flags.items() if k in names})


def run_on_every_rank(runner, out, settings, resume, force, max_iters, **options):
    """runner(out, settings, ...) on this process, or on every rank of an MPI job (`mpirun -n
    N`): rank 0 checks and writes --out; each other rank runs in a scratch copy of it that it
    deletes at the end, so only rank 0's files are kept."""
    world = distributed.world()
    kwargs = {"resume": resume, "max_iters": max_iters, "log": click.echo, **options}
    if world.size == 1:
        return runner(out, settings, force=force, **kwargs)
    world.from_root(lambda: prepare_out_dir(out, resume, force))  # its errors stop every rank
    distributed.check_same_data_files(world, lambda: data_fingerprints(settings))
    with distributed.rank_run_dir(out, resume, world) as run_dir:
        return runner(run_dir, settings, force=force or not world.is_root, world=world, **kwargs)


@click.group()
def finetune():
    """Fine-tune a pretrained model on labelled data: classify or instruct."""


@finetune.command("classify")
@click.option("--out", default="runs/classify", type=click.Path(file_okay=False),
              help="Run directory (checkpoint, metrics.jsonl, metrics.json).")
@click.option("--text-column", default=None,
              help="CSV/TSV column (header name or 0-based position) holding the text.  [default:"
                   " 'text'; without such a header column 0, or column 1 where column 0 holds"
                   " few values repeated and column 1 many (the label first)]")
@click.option("--label-column", default=None,
              help="CSV/TSV column holding the label.  [default: 'label'; without such a header"
                   " column 1, or column 0 where it holds the labels, as said above]")
@click.option("--arch", type=click.Choice(["decoder", "encoder"]), default=ClassifySettings.arch,
              help="decoder: causal, as pretrained; encoder: the same weights run bidirectionally."
                   "  [default: encoder from an MLM checkpoint (pretrain --objective mlm), else"
                   " decoder]")
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="How a window becomes one vector: the last token's state, the mean or the"
                   " channel-wise max over tokens, the average of those two (meanmax), or the"
                   " first token's state (encoder only)."
                   f"  [default: {DEFAULT_POOLING['decoder']} for decoder,"
                   f" {DEFAULT_POOLING['encoder']} for encoder]")
@click.option("--freeze", default=ClassifySettings.freeze,
              help="What stays fixed: none (all trains), all (head only trains), all-but-N (the"
                   " last N blocks, final norm and head train; N at most the model's blocks).")
@click.option("--balance", is_flag=True,
              help="Downsample larger classes to the size of the smallest.")
@click.option("--dedupe", is_flag=True,
              help="Keep only the first record of each text (word for word), before the split;"
                   " a --val-data or --test-data text also in an earlier file is dropped."
                   " Without it, a repeated record can be both trained on and tested on (the"
                   " run notes how many).")
@click.option("--case-copies/--no-case-copies", default=ClassifySettings.case_copies,
              help="Train on every training text also in upper and in lower case, with its"
                   " label (validation and test texts stay as they are): real messages mix"
                   " cases, and the tokenizer reads capitals as rare fragments. Turn off where"
                   " case decides the label.")
@click.option("--max-windows", default=ClassifySettings.max_windows, callback=positive,
              help="A text longer than the context is read as overlapping windows (half a"
                   " context apart), at most this many; the rest of a longer text is cut.")
@click.option("--dropout", default=ClassifySettings.dropout, callback=fraction,
              help="Dropout probability in the body while fine-tuning (0: none).")
@training_options(ClassifySettings)
@user_errors
@abort_on_error
def finetune_classify(out, resume, force, **flags):
    """Fine-tune a classifier on labelled texts (.csv, .tsv, .jsonl or a .json array; a file with
    no extension, or .txt, is read by its first line: a tab makes it TSV).

    Without --data it uses the embedded set (standard-library docstring sentences labelled by
    subject: internet, files, concurrency, numbers). Without --val-data/--test-data the data is
    split 70/10/20 with --split-seed (default: --seed). Texts longer than the context are read
    whole, as overlapping windows. The validation loss is measured on the whole validation split
    at every evaluation; the best evaluation's weights are kept. Reports accuracy before and
    after, a confusion matrix and per-class precision/recall, written to OUT/metrics.json.
    """
    if resume:
        note_flags_resume_ignores({"out", "resume", "max_iters", *DATA_FLAGS})
    check_flag_combinations(flags, resume)
    report = run_on_every_rank(run_classify, out, settings_from_flags(ClassifySettings, flags),
                               resume, force, flags["max_iters"] if flag_given("max_iters") else None)
    click.echo("accuracy after fine-tuning:  " + format_accuracies(report["accuracy_after"]))
    echo_confusion("test confusion matrix", report["test_confusion_matrix"], report["labels"],
                   os.path.join(out, "metrics.json"))
    echo_per_class(report["test_per_class"])
    seconds = training_time(report["train_seconds_this_part"], report["train_seconds"])
    click.echo(f"done in {seconds}; metrics in {os.path.join(out, 'metrics.json')}")


def echo_confusion(heading, matrix, labels, kept_in=None):
    """Print a confusion matrix below `heading`, or, past MOST_CLASSES_SHOWN classes, a line
    that says where it is kept (`kept_in`, a file, if any): K x K counts of hundreds of classes
    are megabytes that no terminal shows (600 classes of long names printed 55 MB)."""
    if len(labels) > MOST_CLASSES_SHOWN:
        kept = f"; it is in {kept_in}" if kept_in else ""
        click.echo(f"{heading}: not printed for {len(labels)} classes (more than"
                   f" {MOST_CLASSES_SHOWN}){kept}")
        return
    click.echo(f"{heading} (rows: true, columns: predicted):")
    click.echo(format_confusion(matrix, labels))


def echo_per_class(per_class):
    """One line per class: precision, recall and support (classify_run.per_class_stats)."""
    for label, stats in per_class.items():
        click.echo(f"  {label}: precision {100 * stats['precision']:.1f}%, recall"
                   f" {100 * stats['recall']:.1f}% ({stats['support']} examples)")


@finetune.command("instruct")
@click.option("--out", default="runs/instruct", type=click.Path(file_okay=False),
              help="Run directory (checkpoint, metrics.jsonl, responses.jsonl, metrics.json).")
@click.option("--include-prompt", is_flag=True,
              help="Compute the loss on the prompt tokens too (default: response tokens only).")
@click.option("--skip-long", is_flag=True,
              help="Leave out the records whose response alone is longer than the context, and"
                   " count them in a note and in metrics.json, instead of refusing the file"
                   " (default: refused, naming them).")
@click.option("--max-new-tokens", default=InstructSettings.max_new_tokens, callback=count,
              help="Most tokens per generated test response.")
@training_options(InstructSettings)
@no_cache_option
@user_errors
@abort_on_error
def finetune_instruct(out, resume, force, no_cache, **flags):
    """Instruction-tune a model on records with instruction, optional input, and output
    (a JSON array or JSONL, Alpaca layout; Dolly's context and response are read as input and
    output). Each record becomes

    \b
        Instruction: {instruction}
        Input: {input}            (this line only when input is not empty)
        Response: {output}<|endoftext|>

    and the loss counts the response tokens only. A record longer than the context keeps the
    end of its prompt and all of its response (counted). Without --data it uses embedded tasks
    (reverse the words, uppercase, sort the words, add). Without --val-data/--test-data the data
    is split 85/5/10 with --split-seed (default: --seed); the best evaluation's weights are kept;
    at the end the test responses go to OUT/responses.jsonl and exact match / token F1 to
    OUT/metrics.json.
    """
    if resume:
        note_flags_resume_ignores({"out", "resume", "max_iters", "no_cache", *DATA_FLAGS})
    check_flag_combinations(flags, resume)
    report = run_on_every_rank(run_instruct, out, settings_from_flags(InstructSettings, flags),
                               resume, force, flags["max_iters"] if flag_given("max_iters") else None,
                               use_cache=not no_cache)
    b, a = report["test_before"], report["test_after"]
    click.echo(f"test exact match: {100 * b['exact_match']:.1f}% -> {100 * a['exact_match']:.1f}%;"
               f" token F1: {100 * b['token_f1']:.1f}% -> {100 * a['token_f1']:.1f}%")
    if report["val_loss_before"] is not None:
        click.echo(f"validation loss on the responses: {report['val_loss_before']:.4f} (base) ->"
                   f" {report['best_val_loss']:.4f} (iteration {report['best_iter']})")
    seconds = training_time(report["train_seconds_this_part"], report["train_seconds"])
    click.echo(f"done in {seconds}; responses in"
               f" {os.path.join(out, 'responses.jsonl')}, metrics in {os.path.join(out, 'metrics.json')}")


@click.command("classify")
@click.option("--checkpoint", "checkpoints", default=("runs/classify",), multiple=True,
              type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm finetune classify`. Give it several times"
                   " to average the class probabilities of several runs (an ensemble; they must"
                   " have the same classes).")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Score a whole labelled file (.csv/.tsv/.jsonl/.json) and print its accuracy."
                   "  [default: none: classify TEXT]")
@click.option("--lines", default=None, type=click.Path(dir_okay=False),
              help="Label each line of this UTF-8 file (one text per line, no labels): print a"
                   " tab-separated row per line, the label, its probability and the text, below"
                   " a header row.  [default: none]")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="Score the validation or test split the run was fine-tuned with, made again"
                   " from its data file (which must be unchanged: its sha256 is checked). Runs"
                   " scored together must share it: the same data and `finetune classify"
                   " --split-seed`.  [default: none]")
@click.option("--text-column", default=None,
              help="As for `finetune classify`.  [default: 'text'; without such a header column"
                   " 0, or 1 where column 0 holds the labels]")
@click.option("--label-column", default=None,
              help="As for `finetune classify`.  [default: 'label'; without such a header column"
                   " 1, or 0 where it holds the labels]")
@click.argument("text", required=False)
@user_errors
def classify(checkpoints, data, lines, split, text_column, label_column, text):
    """Classify TEXT (prints the label and class probabilities), label each line of --lines FILE,
    or score --data FILE or a run's own --split.

    Texts longer than the context are read as windows, as in fine-tuning. With several
    --checkpoint runs, each text gets the mean of their class probabilities."""
    if sum(x is not None for x in (text, data, lines, split)) != 1:
        raise TinyLLMError("give one of a TEXT argument, --data FILE, --lines FILE or --split"
                           " val|test")
    if data is None and (text_column or label_column):
        given = ("a TEXT argument" if text is not None else "--lines" if lines is not None
                 else "--split")
        raise TinyLLMError("--text-column and --label-column choose the columns of --data FILE;"
                           f" {given} has none")
    texts = read_lines(lines, "--lines", "classify --lines") if lines is not None else None
    members = load_classifiers(checkpoints)
    labels = members[0].labels
    notes = lambda note: click.echo(note, err=True)  # noqa: E731
    if texts is not None:
        click.echo("label\tprobability\ttext")
        for line, (label, p) in zip(texts, label_texts(members, texts, log=notes)):
            click.echo(f"{label}\t{p:.3f}\t{shown_text(line)}")
        return
    if text is not None:
        probs = averaged_probs(members, [text], log=notes)[0]
        click.echo(labels[int(probs.argmax())])
        for label, p in sorted(zip(labels, probs), key=lambda lp: -lp[1]):
            click.echo(f"  {label}: {p:.3f}")
        return
    if split:
        scored = score_run_split(checkpoints, members, split, log=notes)
    else:
        scored = score_file(members, data, text_column, label_column, log=notes)
    counted = ", ".join(f"{scored[k]} {k}" for k in ("windowed", "cut") if scored[k])
    if scored["fallback_characters"]:
        counted += (", " if counted else "") + (f"{scored['fallback_characters']} character(s)"
                                                f" read as {UNK_TOKEN}")
    where = f" of {scored['where']}" if split else ""
    runs = f", the mean of {len(members)} runs" if len(members) > 1 else ""
    click.echo(f"{scored['examples']} examples{where}{f' ({counted})' if counted else ''}:"
               f" accuracy {100 * scored['accuracy']:.1f}%{runs}")
    echo_confusion("confusion matrix", scored["confusion_matrix"], labels)
    echo_per_class(per_class_stats(scored["confusion_matrix"], labels))
