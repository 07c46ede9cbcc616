"""The `tinyllm` command line: thin Click commands that map flags onto configs and call the library.

Every user-fixable problem surfaces as a `TinyLLMError` and is printed as one line,
`Error: ...`, with exit code 1. Ctrl-C during training saves a checkpoint and exits with 130.
"""

import importlib.metadata

import click
import numpy as onp

from .cli_common import (count, flag_given, fraction, loss_text, no_cache_option, non_negative,
                         note_flags_resume_ignores, positive, probability_mass, random_seed,
                         share, shown_generation, step_count, training_time, user_errors)
from .cli_encoder import embed, fill
from .cli_fewshot import fewshot
from .cli_finetune import classify, finetune
from .cli_plot import attention, plot
from .cli_seq2seq import seq2seq
from . import distributed
from .distributed import abort_on_error
from .config import (DEFAULT_BPE_VOCAB_SIZE, DEFAULT_RUN, DEFAULT_SHORT_CONTEXT,
                     DEFAULT_SHORT_SHARE, DEFAULT_TOKENIZER, GPTConfig, TrainConfig)
from .errors import TinyLLMError
from .generate import MAX_NEW_TOKENS
from .mlm import MASK_RATE
from .system import tune_malloc

# The defaults of `tinyllm pretrain` are the dataclasses' own (see tinyllm/config.py).
MODEL = GPTConfig()
TRAIN = TrainConfig()


def package_version():
    """tinyllm's installed version; `python cli.py` from a checkout has no package metadata."""
    try:
        return importlib.metadata.version("tinyllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (run from a checkout that is not installed)"

STDIN = "/dev/stdin"  # what --data - reads (Linux and macOS name standard input so)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=package_version(), prog_name="tinyllm")
@click.pass_context
def main(ctx):
    """tinyllm: make a (tiny) large language model on a CPU.

    Pretrain a GPT on raw text (pretrain) and sample from it (generate); fine-tune it on labelled
    data (finetune classify, finetune instruct, classify); prompt it with k demonstrations
    (fewshot); train the original encoder-decoder transformer (seq2seq); draw loss curves (plot)
    and attention maps (attention); fill masked tokens with an encoder pretrained by --objective
    mlm (fill) and turn lines of text into vectors (embed). Run a command with --help for its flags.
    """
    tune_malloc()  # keep freed memory in the process: faster numpy steps (see tinyllm/system.py)
    # numpy's overflow warnings would print code lines before the one-line error: a training
    # step's loss and weights and a model's outputs are checked for NaN and infinity instead
    onp.seterr(over="ignore", invalid="ignore")
    try:
        distributed.check_command_runs_here(ctx.invoked_subcommand)  # under mpirun -n N > 1
    except TinyLLMError as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.option("--data", default=None, metavar="FILE|NAME",
              help="UTF-8 text file to train on ('-': standard input, read once), or the name of"
                   " an embedded corpus: python-docs"
                   " (Python's pydoc topics and its standard library's docstrings), pydoc (the"
                   " topics alone), stdlib-docstrings, icl (generated in-context-learning"
                   " episodes).  [default: python-docs]")
@click.option("--objective", type=click.Choice(["clm", "mlm"]), default="clm",
              help="clm: a causal GPT learns to predict the next token; mlm: the same blocks as a"
                   " bidirectional encoder learn to predict masked tokens (15% of positions:"
                   " 80% masked, 10% random, 10% kept), as BERT. With --resume: the run's own.")
@click.option("--mask-rate", default=MASK_RATE, callback=probability_mass,
              help="With --objective mlm: the share of each window's positions chosen for"
                   " prediction (BERT: 0.15). With --resume: the run's own.")
@click.option("--distance-bias/--no-distance-bias", default=None,
              help="With --objective mlm: the encoder's attention subtracts slope * |i - j| from"
                   " the score of token i for token j (slope 1, 1/2, 1/4, ... by head; a"
                   " symmetric ALiBi), so it reads a masked token's neighbours from the first"
                   " step. Without it the encoder stayed on the unigram plateau here (see"
                   " docs/experiments.md).  [default: on with --objective mlm]")
@click.option("--tokenizer", "tokenizer_kind", type=click.Choice(["char", "bpe"]),
              default=DEFAULT_TOKENIZER,
              help="char: one token per character; bpe: byte-level BPE trained on the data.")
@click.option("--vocab-size", default=DEFAULT_BPE_VOCAB_SIZE, callback=positive,
              help="BPE vocabulary size (256 bytes + merges + 1 special token); ignored for char.")
@click.option("--n-layer", default=MODEL.n_layer, callback=positive, help="Number of GPT blocks.")
@click.option("--n-head", default=MODEL.n_head, callback=positive, help="Attention heads per block.")
@click.option("--n-embd", default=MODEL.n_embd, callback=positive,
              help="Embedding width (channels); must be divisible by --n-head.")
@click.option("--block-size", default=MODEL.block_size, callback=positive,
              help="Context length in tokens.")
@click.option("--bias/--no-bias", default=MODEL.bias,
              help="Biases in linear layers and layer norms (GPT-2 has them; off is faster).")
@click.option("--dropout", default=MODEL.dropout, callback=fraction, help="Dropout probability during training.")
@click.option("--batch-size", default=TRAIN.batch_size, callback=positive,
              help="Sequences per step.")
@click.option("--grad-accum", default=TRAIN.grad_accum, callback=positive,
              help="Micro-batches of --batch-size per optimizer step, gradients averaged: a K"
                   " times larger batch in the memory of one. Under `mpirun -n N`, each rank"
                   " does K (the step sees N x K micro-batches).")
@click.option("--max-iters", default=TRAIN.max_iters, callback=step_count,
              help="Optimizer steps in the whole run (with --resume: the new total).")
@click.option("--short-context", default=DEFAULT_SHORT_CONTEXT, callback=count, metavar="TOKENS",
              help="Staged training (Shortformer): the first --short-share of the steps read"
                   " windows of this many tokens, --block-size / TOKENS times as many a step,"
                   " so a step holds as many tokens in less time (attention's cost grows with"
                   " the window); the later steps read whole windows. Must divide"
                   " --block-size; 0, or --block-size or more: whole windows throughout. 64"
                   " with --max-iters 900 gives a lower validation loss than the default in"
                   " 10 to 20% more time (docs/experiments.md). With --resume: the run's own.")
@click.option("--short-share", default=DEFAULT_SHORT_SHARE, callback=share,
              help="The share of the steps that read --short-context windows (from the first"
                   " step on). With --resume: the run's own.")
@click.option("--lr", default=TRAIN.lr, callback=positive, help="Peak learning rate, reached after the warm-up.")
@click.option("--min-lr", default=TRAIN.min_lr, callback=non_negative, help="Learning rate at the end of the cosine decay.")
@click.option("--warmup-iters", default=TRAIN.warmup_iters, callback=non_negative,
              help="Steps of linear learning-rate warm-up.")
@click.option("--weight-decay", default=TRAIN.weight_decay, callback=non_negative,
              help="AdamW decoupled weight decay (matrices only).")
@click.option("--grad-clip", default=TRAIN.grad_clip, callback=non_negative,
              help="Clip the global gradient norm to this (0: off).")
@click.option("--eval-interval", default=TRAIN.eval_interval, callback=step_count,
              help="Evaluate, log metrics and save a checkpoint every this many steps.")
@click.option("--eval-iters", default=TRAIN.eval_iters, callback=positive,
              help="Batches per split in each evaluation.")
@click.option("--seed", default=TRAIN.seed, callback=random_seed, help="Seed for initialisation, batches and dropout.")
@click.option("--out", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="Run directory for checkpoints and metrics.jsonl.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (its settings are kept;"
                   " only --max-iters may change; --data may say where its text is now, if it"
                   " was moved or came from a pipe: its sha256 must match).")
@click.option("--force", is_flag=True, help="Overwrite an existing run in --out.")
@click.option("--sample-tokens", default=300, callback=count,
              help="Tokens to sample from the model at the end (0: none). With --objective mlm,"
                   " any number but 0 measures the masked-token accuracy on the validation split"
                   " instead.")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Train with the hand-written forward and backward passes of tinyllm/fast.py"
                   " (used when --dropout is 0); --no-fast differentiates the readable reference"
                   " model with autograd instead (slower, same losses up to float32 rounding).")
@no_cache_option
@user_errors
@abort_on_error
def pretrain(data, objective, mask_rate, distance_bias, tokenizer_kind, vocab_size, n_layer,
             n_head, n_embd, block_size, bias, dropout, batch_size, grad_accum, max_iters,
             short_context, short_share, lr, min_lr, warmup_iters, weight_decay, grad_clip,
             eval_interval, eval_iters, seed, out, resume, force, sample_tokens, fast, no_cache):
    """Pretrain a GPT on raw text by next-token prediction (or an encoder by masked tokens).

    With no flags it trains a 1.1M-parameter model with a byte-level BPE tokenizer (2048 tokens)
    and a 256-token context on the embedded default corpus for 750 steps (3.5 to 3.8 minutes
    on 2 cores of a 2.45 GHz AMD EPYC), then prints a sample.
    """
    from .generate import generate_text
    from .pretrain import pretrain as run_pretrain

    world = distributed.world()  # one process unless started by mpirun with N > 1
    if resume:
        note_flags_resume_ignores({"out", "resume", "max_iters", "objective", "sample_tokens",
                                   "fast", "no_cache", "data"})
    if distance_bias and objective != "mlm" and not resume:  # resumed: the run's own setting
        raise TinyLLMError("--distance-bias is for --objective mlm: a causal model's attention"
                           " has no use for it")
    model_config = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd, dropout=dropout, bias=bias,
                             distance_bias=objective == "mlm" and distance_bias is not False
                             ).validate()
    train_config = TrainConfig(batch_size=batch_size, max_iters=max_iters, lr=lr, min_lr=min_lr,
                               warmup_iters=warmup_iters, weight_decay=weight_decay,
                               grad_clip=grad_clip, eval_interval=eval_interval,
                               eval_iters=eval_iters, seed=seed, grad_accum=grad_accum).validate()
    # --resume keeps the run's own --max-iters unless this command line sets one
    new_total = max_iters if resume and flag_given("max_iters") else None
    if resume and not flag_given("objective"):
        objective = None  # the run's own
    if data == "-":
        data = STDIN  # read as the pipe (or file) it is; --resume then needs --data again
    result = run_pretrain(model_config, train_config, out, data=data,
                          tokenizer_kind=tokenizer_kind, vocab_size=vocab_size, resume=resume,
                          force=force, max_iters=new_total, log=click.echo, world=world, fast=fast,
                          objective=objective, mask_rate=None if resume else mask_rate,
                          short_context=short_context, short_share=short_share)
    if not world.is_root:
        return  # rank 0 reports and samples
    final = result["final"]
    seconds = training_time(result["seconds"], result["train_seconds"])
    click.echo(f"done: iteration {final['iter']}, train loss {loss_text(final.get('train_loss'))},"
               f" val loss {loss_text(final.get('val_loss'))}, {seconds}; checkpoint in {out}")
    if sample_tokens and result.get("objective") == "mlm":
        from .mlm import masked_accuracy

        acc = masked_accuracy(result["params"], result["model_config"], result["tokenizer"],
                              result["val_ids"])
        click.echo(f"masked-token accuracy on the validation split: {acc['accuracy']:.3f} over"
                   f" {acc['positions']} masked positions (always guessing the most frequent"
                   f" token, {acc['baseline_token']!r}: {acc['baseline']:.3f})")
    elif sample_tokens:
        text = generate_text(result["params"], result["model_config"], result["tokenizer"], "",
                             max_new_tokens=sample_tokens, temperature=0.8, seed=seed,
                             use_cache=not no_cache)
        click.echo(f"--- sample (temperature 0.8) ---\n{shown_generation(text)}\n---")


@main.command()
@click.option("--checkpoint", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="Run directory written by `tinyllm pretrain`.")
@click.option("--prompt", default="", help="Text to continue (empty: start from a newline).")
@click.option("--max-new-tokens", default=MAX_NEW_TOKENS, callback=count,
              help="Most tokens to generate.")
@click.option("--temperature", default=0.8, callback=non_negative,
              help="Sampling temperature: <1 sharper, >1 more random, 0 greedy.")
@click.option("--top-k", default=None, callback=positive, type=int,
              help="Sample only from the k likeliest tokens.  [default: off]")
@click.option("--top-p", default=None, callback=probability_mass, type=float,
              help="Sample only from the smallest set of tokens with total probability >= p."
                   "  [default: off]")
@click.option("--seed", default=None, callback=random_seed, type=int,
              help="Seed for sampling.  [default: random]")
@click.option("--stop", "stop_text", default=None,
              help="Stop before this text if the model produces it (taken literally: in bash, $'\\n'"
                   " is a newline).  [default: none]")
@click.option("--examples", default=None, type=click.Path(dir_okay=False),
              help="Task file (JSONL, see `tinyllm fewshot`): its first --shots records go before"
                   " the prompt as demonstrations, and the completion stops at the end of the"
                   " line unless --stop is given.  [default: none]")
@click.option("--shots", default=4, callback=count, help="Demonstrations taken from --examples.")
@click.option("--instruction", default=None,
              help="For an instruction-tuned run (`tinyllm finetune instruct`): the prompt is this"
                   " instruction in the fine-tuning template, and the response ends at"
                   " <|endoftext|>. A prompt that would leave the response less than a quarter"
                   " of the context is read from its end, with a note.  [default: none]")
@click.option("--input", "input_text", default="",
              help="The input that goes with --instruction (empty: none).")
@no_cache_option
@user_errors
def generate(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_text,
             examples, shots, instruction, input_text, no_cache):
    """Continue a prompt with a pretrained model and print prompt plus completion (as it is
    made: Ctrl-C stops it, keeping what is printed)."""
    from .instruct_run import load_generator
    from .generate import generate_text

    _check_prompt_flags(prompt, examples, stop_text, instruction, input_text)
    if instruction is not None:  # instruction-tuned model: its template, stop at end-of-text
        from .instruct_run import generate_instruction

        notes = []  # said on stderr once the response's line has ended
        generate_instruction(checkpoint, instruction, input_text, max_new_tokens, temperature,
                             top_k, top_p, seed, use_cache=not no_cache, log=notes.append,
                             on_text=lambda piece: click.echo(shown_generation(piece), nl=False))
        click.echo()
        for note in notes:
            click.echo(note, err=True)
        return
    params, config, tokenizer = load_generator(checkpoint)  # a GPT, LoRA adapters merged if any
    if prompt:
        _check_prompt(tokenizer, prompt, None if examples else config.block_size)
    if examples:  # few-shot prompting by hand: demonstrations first, in the fewshot template
        from .fewshot import examples_prompt

        prompt = examples_prompt(examples, shots, prompt, tokenizer, config.block_size)
        stop_text = stop_text or "\n"
    click.echo(shown_generation(prompt), nl=False)  # then the completion as it comes: Ctrl-C
    # keeps what is shown
    generate_text(params, config, tokenizer, prompt, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop_text=stop_text, use_cache=not no_cache,
                  on_text=lambda piece: click.echo(shown_generation(piece), nl=False))
    click.echo()


def _check_prompt_flags(prompt, examples, stop_text, instruction, input_text):
    """Refuse flags that the chosen kind of prompt would ignore, rather than drop them unseen."""
    if instruction is not None:
        ignored = [flag for flag, given in (("--prompt", prompt), ("--examples", examples),
                                            ("--stop", stop_text is not None)) if given]
        if ignored:
            raise TinyLLMError(f"{' and '.join(ignored)} cannot go with --instruction: its prompt"
                               " is the fine-tuning template, and the response ends at"
                               " <|endoftext|>")
    elif input_text:
        raise TinyLLMError("--input goes with --instruction (the input of an instruction)")
    if stop_text == "":
        raise TinyLLMError("--stop is empty: give the text to stop before (in bash, $'\\n' is a"
                           " newline)")
    if flag_given("shots") and examples is None:
        raise TinyLLMError("--shots counts the demonstrations taken from --examples; give"
                           " --examples FILE too")


def _check_prompt(tokenizer, prompt, block_size=None):
    """--prompt must encode; one longer than block_size (if given) is noted on stderr, since the
    model reads only its end."""
    try:
        n_tokens = len(tokenizer.encode(prompt))
    except TinyLLMError as err:
        raise TinyLLMError(f"--prompt: {err}") from None
    if block_size is not None and n_tokens > block_size:
        click.echo(f"note: --prompt is {n_tokens:,} tokens, more than the model's context of"
                   f" {block_size}: the model reads only its last {block_size}", err=True)


# The commands of the later stages live in their own modules.
main.add_command(finetune)
main.add_command(classify)
main.add_command(fewshot)
main.add_command(seq2seq)
main.add_command(plot)
main.add_command(attention)
main.add_command(fill)
main.add_command(embed)

if __name__ == "__main__":
    main()
