"""`tinyllm seq2seq train` and `tinyllm seq2seq translate`: the encoder-decoder end to end.

Thin Click commands over the library: `seq2seq_run.train_seq2seq` (a training run),
`decoding.translate_texts` (greedy or beam search) and `seq2seq_run.score_pairs` (exact match
and corpus BLEU-4 of a PAIRS file).
"""

import click

from .checkpoint import load_checkpoint
from .cli_common import (count, flag_given, fraction, no_cache_option, non_negative,
                         note_flags_resume_ignores, positive, random_seed, step_count,
                         training_time, user_errors)
from .config import TrainConfig
from .decoding import MAX_LENGTH_PENALTY, length_penalty_problem, translate_texts
from .errors import TinyLLMError
from .progress import Counting
from .seq2seq import POSITIONS, Seq2SeqConfig
from .seq2seq_data import read_pairs, readable_pairs
from .seq2seq_run import (EVAL_EXAMPLES, LABEL_SMOOTHING, SCHEDULE, SCHEDULES, SEQ2SEQ_RUN,
                          SEQ2SEQ_TRAIN, check_training_options, score_pairs, train_seq2seq)

# The defaults of `tinyllm seq2seq train` are the model config's and the run module's own.
MODEL = Seq2SeqConfig()
TRAIN = SEQ2SEQ_TRAIN


def length_penalty_alpha(ctx, param, value):
    """--length-penalty: a number from 0 to decoding.MAX_LENGTH_PENALTY (decoding's own check)."""
    value = non_negative(ctx, param, value)
    problem = length_penalty_problem(value)
    if problem:
        raise click.BadParameter(problem)
    return value


# ----------------------------------------------------------------------------- commands


@click.group()
def seq2seq():
    """The encoder-decoder transformer of "Attention Is All You Need": train it, translate."""


@seq2seq.command("train")
@click.option("--data", default=None, metavar="PAIRS|NAME",
              help="Pairs to learn: a TSV file (source<TAB>target, split on the first tab) or"
                   " JSONL ({\"source\", \"target\"} per line); every 10th pair is held out."
                   " With --resume: where the run's own pairs are now, if moved."
                   "  [default: dates, an embedded task: dates in six formats -> YYYY-MM-DD]")
@click.option("--n-layer", default=MODEL.n_layer, callback=positive,
              help="Encoder blocks, and as many decoder blocks.")
@click.option("--n-head", default=MODEL.n_head, callback=positive,
              help="Attention heads per block.")
@click.option("--n-embd", default=MODEL.n_embd, callback=positive,
              help="Model width d_model; must be divisible by --n-head.")
@click.option("--block-size", default=MODEL.block_size, callback=positive,
              help="Longest source in tokens (characters); a target may have one fewer (its <bos>"
                   " or <eos> takes the place). Longer pairs are an error.")
@click.option("--positions", type=click.Choice([p for p in POSITIONS if p != "none"]),
              default=MODEL.positions,
              help="Position encodings: the paper's fixed sinusoids, or learned as in GPT.")
@click.option("--share-embeddings/--no-share-embeddings", default=MODEL.share_embeddings,
              help="One embedding table for source and target tokens.")
@click.option("--bias/--no-bias", default=MODEL.bias,
              help="Biases in linear layers and layer norms.")
@click.option("--dropout", default=MODEL.dropout, callback=fraction, help="Dropout probability during training.")
@click.option("--label-smoothing", default=LABEL_SMOOTHING, callback=fraction,
              help="Spread this much target probability over the vocabulary (the paper: 0.1).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=SCHEDULE,
              help="cosine: linear warm-up to --lr, cosine decay to --min-lr; noam: the paper's"
                   " d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), with no --lr or --min-lr,"
                   " which peaks at (d_model * warmup)^-0.5: for d_model 64 give it"
                   " --warmup-iters 1000 (peak 0.004).")
@click.option("--batch-size", default=TRAIN.batch_size, callback=positive, help="Pairs per step.")
@click.option("--max-iters", default=TRAIN.max_iters, callback=step_count,
              help="Optimizer steps in the whole run (with --resume: the new total).")
@click.option("--lr", default=TRAIN.lr, callback=positive, help="Peak learning rate (cosine schedule).")
@click.option("--min-lr", default=TRAIN.min_lr, callback=non_negative, help="Final learning rate (cosine schedule).")
@click.option("--warmup-iters", default=TRAIN.warmup_iters, callback=non_negative,
              help="Steps of linear learning-rate warm-up (both schedules).")
@click.option("--weight-decay", default=TRAIN.weight_decay, callback=non_negative,
              help="AdamW decoupled weight decay (matrices only).")
@click.option("--grad-clip", default=TRAIN.grad_clip, callback=non_negative,
              help="Clip the global gradient norm to this (0: off).")
@click.option("--eval-interval", default=TRAIN.eval_interval, callback=step_count,
              help="Evaluate, log metrics and save a checkpoint every this many steps.")
@click.option("--eval-iters", default=TRAIN.eval_iters, callback=positive,
              help="Batches per split in each evaluation.")
@click.option("--eval-examples", default=EVAL_EXAMPLES, callback=positive,
              help="Held-out pairs to translate (greedy) for the exact match printed at the end.")
@click.option("--seed", default=TRAIN.seed, callback=random_seed, help="Seed for initialisation, batches and dropout.")
@click.option("--out", default=SEQ2SEQ_RUN, type=click.Path(file_okay=False),
              help="Run directory for checkpoints and metrics.jsonl.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (only --max-iters may change).")
@click.option("--force", is_flag=True, help="Overwrite an existing run in --out.")
@no_cache_option
@user_errors
def train_command(data, n_layer, n_head, n_embd, block_size, positions, share_embeddings, bias,
                  dropout, label_smoothing, schedule, batch_size, max_iters, lr, min_lr,
                  warmup_iters, weight_decay, grad_clip, eval_interval, eval_iters, eval_examples,
                  seed, out, resume, force, no_cache):
    """Train an encoder-decoder by teacher forcing, then report held-out exact match.

    With no flags it learns the embedded dates task (0.24M parameters, 1500 steps of 64
    pairs: about 2 minutes on 2 cores) to 100% held-out exact match.
    """
    model_config = Seq2SeqConfig(block_size=block_size, n_layer=n_layer, n_head=n_head,
                                 n_embd=n_embd, dropout=dropout, bias=bias, positions=positions,
                                 share_embeddings=share_embeddings).validate()
    train_config = TrainConfig(batch_size=batch_size, max_iters=max_iters, lr=lr, min_lr=min_lr,
                               warmup_iters=warmup_iters, weight_decay=weight_decay,
                               grad_clip=grad_clip, eval_interval=eval_interval,
                               eval_iters=eval_iters, seed=seed).validate()
    check_training_options(label_smoothing, schedule)
    if resume:
        note_flags_resume_ignores({"out", "resume", "max_iters", "eval_examples", "no_cache",
                                   "data"})
    elif schedule == "noam" and (flag_given("lr") or flag_given("min_lr")):
        raise TinyLLMError("--lr and --min-lr do nothing with --schedule noam: its rate follows"
                           " from --n-embd and --warmup-iters alone")
    new_total = max_iters if resume and flag_given("max_iters") else None
    result = train_seq2seq(model_config, train_config, out, data=data,
                           label_smoothing=label_smoothing, schedule=schedule, resume=resume,
                           force=force, max_iters=new_total, eval_examples=eval_examples,
                           log=click.echo, use_cache=not no_cache)
    final = result["final"]
    seconds = training_time(result["seconds"], result["train_seconds"])
    for pair, output in result["examples"]:
        click.echo(f"  {pair.source!r} -> {output!r} (reference {pair.target!r})")
    click.echo(f"done: iteration {final['iter']}, train loss {final['train_loss']:.4f},"
               f" val loss {final['val_loss']:.4f}, {seconds}; checkpoint and metrics.json"
               f" in {out}")
    if result["cut"]:
        click.echo(f"note: {result['cut']:,} held-out translations reached the length limit of"
                   f" {result['max_len']} tokens without <eos> and are cut there")
    click.echo(f"held-out exact match: {100 * result['exact_match']:.1f}% of"
               f" {result['held_out_pairs']} pairs (greedy), {bleu_text(result)}")


@seq2seq.command("translate")
@click.argument("texts", nargs=-1)
@click.option("--checkpoint", default=SEQ2SEQ_RUN, type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm seq2seq train`.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Score a PAIRS file (TSV or JSONL): translate every source, print exact match"
                   " and corpus BLEU-4 against the targets. A pair whose source the model cannot"
                   " read (a character it never saw, longer than the context) is left out and"
                   " counted.  [default: none: translate TEXTS]")
@click.option("--beam-size", default=1, callback=positive,
              help="Beam width; 1 is greedy decoding.")
@click.option("--length-penalty", default=0.6, callback=length_penalty_alpha,
              help="Beam search length penalty alpha in ((5 + n) / 6)^alpha, 0 (none) to"
                   f" {MAX_LENGTH_PENALTY:g}; only with --beam-size 2 or more.")
@click.option("--max-len", default=None, type=int, callback=positive,
              help="Most tokens to generate, at most the model's block size - 1; with --data,"
                   " translations that reach it are counted.  [default: twice the longest"
                   " source plus 50, or with --data the longest target plus 1 if more; within"
                   " the context]")
@click.option("--show", default=5, callback=count,
              help="With --data: how many translations to print, one line each (source ->"
                   " output, reference; line breaks in them as \\n).")
@no_cache_option
@user_errors
def translate_command(texts, checkpoint, data, beam_size, length_penalty, max_len, show, no_cache):
    """Translate TEXTS (one output line each), or score a PAIRS file with --data.

    Pairs from a JSONL file may hold line breaks, and so may what a model trained on them writes:
    a line break inside an output is printed as \\n (a carriage return as \\r), so that each
    output stays on its own line.
    """
    if not texts and not data:
        raise TinyLLMError("give a text to translate, or --data PAIRS to score a file")
    if beam_size == 1 and flag_given("length_penalty"):
        raise TinyLLMError("--length-penalty is for beam search: give --beam-size 2 or more")
    if not data and flag_given("show"):
        raise TinyLLMError("--show is for --data: every TEXT given is translated and printed")
    ckpt = load_checkpoint(checkpoint, kind="seq2seq")  # beam search checks its own memory
    args = dict(beam_size=beam_size, alpha=length_penalty, max_len=max_len, use_cache=not no_cache)
    if texts:
        for output in translate_texts(ckpt.params, ckpt.model_config, ckpt.tokenizer, list(texts),
                                      **args):
            click.echo(one_line(output))
    if data:
        score_file(ckpt, data, show, args)


def score_file(ckpt, data, show, args):
    """translate --data: score the pairs the model can read, and say what was left out or cut."""
    pairs = read_pairs(data)
    readable, unreadable = readable_pairs(ckpt.tokenizer, pairs, ckpt.model_config.block_size)
    if not readable:
        raise TinyLLMError(f"{data}: this model can read none of its {len(pairs):,} sources"
                           f" (first: {unreadable[0]})")
    progress = Counting(len(readable), "pairs translated")
    score = score_pairs(ckpt.params, ckpt.model_config, ckpt.tokenizer, readable,
                        **args, on_done=progress.update)
    progress.close()
    for pair, output in list(zip(readable, score["outputs"]))[:show]:
        click.echo(f"{one_line(pair.source)} -> {one_line(output)}"
                   f"  (reference: {one_line(pair.target)})")
    if unreadable:
        click.echo(f"note: {len(unreadable):,} of the {len(pairs):,} pairs are left out of the"
                   f" score: the model cannot read their source (first: {unreadable[0]})")
    if score["unwritable"]:
        click.echo(f"note: {len(score['unwritable']):,} scored pairs have a target the model cannot"
                   f" write, so they count as misses (first: {score['unwritable'][0]})")
    if score["cut"]:
        click.echo(f"note: {score['cut']:,} translations reached the length limit of"
                   f" {score['max_len']} tokens without <eos> and are cut there"
                   f" ({limit_reason(args['max_len'], score['max_len'], ckpt.model_config)})")
    scored = f"{len(readable):,}" + (f" of {len(pairs):,}" if unreadable else "")
    click.echo(f"{scored} pairs: exact match {100 * score['exact_match']:.1f}%, {bleu_text(score)}")


def bleu_text(score):
    """The BLEU-4 of a score_pairs dict as text, saying why it is 0 when no reference has 4
    words. Example: "BLEU-4 12.3"."""
    if score["bleu_can_score"]:
        return f"BLEU-4 {score['bleu']:.1f}"
    return (f"BLEU-4 {score['bleu']:.1f} (no reference has 4 words, so BLEU-4 is 0 by"
            " definition: use exact match)")


def one_line(text):
    """`text` with its line breaks written out, as tinyllm's readers count them ("\\n", "\\r"),
    so that it prints on one line. Example: "a\\nb" -> "a\\\\nb" (a backslash and an n)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def limit_reason(max_len, limit, config):
    """Why translations stop at `limit` tokens: --max-len, the context, or the default's room."""
    if max_len and max_len <= limit:
        return f"--max-len {max_len}"
    if limit == config.block_size - 1:
        return f"the context, --block-size {config.block_size}, allows no more"
    return "longer than every target: they cannot match"
