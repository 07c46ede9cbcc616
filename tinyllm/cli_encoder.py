"""`tinyllm fill` and `tinyllm embed`: what a pretrained encoder (or decoder) makes of a text.

`fill` asks a masked language model (`tinyllm pretrain --objective mlm`, see tinyllm/mlm.py)
for the likeliest tokens at each [MASK] of a text; `embed` turns lines of text into vectors
(tinyllm/embed.py) and writes them or finds the lines nearest to a query. Thin: flags to
library calls.
"""

import os

import click

from .cli_common import positive, shown_generation, shown_text, user_errors
from .progress import Counting
from .errors import TinyLLMError

MLM_RUN = "runs/mlm"  # where the examples in the README put an MLM run
TOP_K = 5  # predictions shown per mask, and neighbours shown per query
SHOWN_CHARACTERS = 300  # most characters of a neighbouring line printed (a line may be megabytes)


@click.command()
@click.argument("text")
@click.option("--checkpoint", default=MLM_RUN, type=click.Path(file_okay=False),
              help="Run directory of `tinyllm pretrain --objective mlm`.")
@click.option("--top-k", default=TOP_K, callback=positive, help="Predictions shown for each mask.")
@user_errors
def fill(text, checkpoint, top_k):
    """Print the likeliest tokens at each [MASK] in TEXT, and TEXT with the best ones filled in.

    Example: tinyllm fill --checkpoint runs/mlm "The [MASK] statement is used to loop".
    With a BPE model one space before [MASK] belongs to the masked token (BPE tokens start with
    their space), so "The [MASK] statement" asks for a word between the two.
    """
    from .checkpoint import load_checkpoint, read_meta
    from .mlm import fill_masks, filled_text

    kind = read_meta(checkpoint)["kind"]
    if kind != "mlm":  # say what fill needs, not only what it found
        raise TinyLLMError(f"{checkpoint!r} holds a {kind!r} model: fill needs a masked language"
                           " model (tinyllm pretrain --objective mlm)")
    ckpt = load_checkpoint(checkpoint, kind="mlm")
    predictions = fill_masks(ckpt.params, ckpt.model_config, ckpt.tokenizer, text, top_k)
    for number, options in enumerate(predictions, 1):
        shown = ", ".join(f"{token!r} {p:.3f}" for token, p in options)
        click.echo(f"[MASK] {number}: {shown}")
    click.echo(shown_generation(filled_text(ckpt.tokenizer, text,
                                            [options[0][0] for options in predictions])))


@click.command()
@click.option("--checkpoint", default=MLM_RUN, type=click.Path(file_okay=False),
              help="Run directory of `tinyllm pretrain` (an MLM encoder or a causal GPT) or of"
                   " `tinyllm finetune instruct`.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text file: one text per line, each embedded as one vector.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Write the vectors here as a .npy file of float32 (N, C), row i for line i."
                   "  [default: none]")
@click.option("--query", default=None,
              help="Print the -k lines whose vectors are nearest to this text's (cosine)."
                   "  [default: none]")
@click.option("-k", "k", default=TOP_K, callback=positive, help="Nearest lines printed for --query.")
@user_errors
def embed(checkpoint, data, out, query, k):
    """Turn each line of --data into a vector: the mean of the model's final hidden states over
    its tokens. Write them with --out, or print the lines nearest to --query, or both.
    """
    from .embed import load_embedder, read_lines, save_vectors

    check_embed_flags(data, out, query)
    lines = read_lines(data)
    model = load_embedder(checkpoint)  # (params, config, tokenizer, bidirectional?)
    if query is not None:
        check_query_encodes(model, query)
    vectors = embed_lines(model, lines, data)
    if out is not None:
        save_vectors(out, vectors)
        click.echo(f"vectors written to {out}", err=True)
    if query is not None:
        print_nearest(model, vectors, lines, query, k)


def check_embed_flags(data, out, query):
    """Refuse flags that cannot work before any line is read: not after minutes of embedding."""
    if out is None and query is None:
        raise TinyLLMError("give --out FILE to write the vectors, --query TEXT to search them,"
                           " or both")
    if query is not None and not query.strip():
        raise TinyLLMError("--query is empty")
    if out is not None:
        check_out_directory(out)
        if os.path.exists(out) and os.path.exists(data) and os.path.samefile(out, data):
            raise TinyLLMError(f"--out {out} is the --data file: the vectors would replace its"
                               " lines")


def check_query_encodes(model, query):
    """The tokenizer's error for a character of --query it cannot encode, named as the flag it
    is, before the slow part."""
    _, _, tokenizer, _ = model
    try:
        tokenizer.encode(query)
    except TinyLLMError as err:
        raise TinyLLMError(f"--query: {err}") from None


def embed_lines(model, lines, data):
    """The lines' vectors (N, C), with the progress of encoding and of embedding on stderr, and a
    note counting the lines cut after the last window."""
    from .embed import MAX_WINDOWS, embed_sequences, encode_texts, most_tokens_read

    params, config, tokenizer, bidirectional = model
    most = most_tokens_read(config.block_size)
    encoding = Counting(sum(len(line) for line in lines), "characters encoded")
    try:
        seqs = encode_texts(tokenizer, lines, most, encoding.update)
    except TinyLLMError as err:
        raise TinyLLMError(f"{data}: {err}") from None
    encoding.close()
    progress = Counting(len(lines), "lines embedded")
    vectors, cut = embed_sequences(params, config, seqs, bidirectional, on_batch=progress.update)
    progress.close()
    what = "bidirectional encoder" if bidirectional else "causal decoder"
    counted = f"{len(lines)} line" + "s" * (len(lines) != 1)
    click.echo(f"{counted} -> vectors of {vectors.shape[1]} numbers ({what})", err=True)
    if cut:
        click.echo(f"note: {cut} line(s) longer than {most:,} tokens ({MAX_WINDOWS} windows of"
                   f" the {config.block_size}-token context) were cut: their vectors are of their"
                   f" first {most:,} tokens", err=True)
    return vectors


def print_nearest(model, vectors, lines, query, k):
    """Print the k lines whose vectors are nearest to the query's (cosine), best first."""
    from .embed import embed_texts, most_tokens_read, nearest

    params, config, tokenizer, bidirectional = model
    query_vectors, cut = embed_texts(params, config, tokenizer, [query], bidirectional)
    if cut:
        most = most_tokens_read(config.block_size)
        click.echo(f"note: --query is longer than {most:,} tokens: its vector is of its first"
                   f" {most:,} tokens", err=True)
    order, scores = nearest(vectors, query_vectors[0], k)
    for i, score in zip(order, scores):
        click.echo(f"{score:.3f}  line {i + 1}: {shortened(lines[i])}")


def check_out_directory(path, flag="--out"):
    """Refuse an output file whose directory does not exist before the work, not after it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise TinyLLMError(f"{flag} {path}: the directory {directory} does not exist")


def shortened(line, most=SHOWN_CHARACTERS):
    """A line as printed: its first `most` characters, and how long it is if it is longer."""
    line, length = shown_text(line[:most]), len(line)  # a control character as its escape
    return line if length <= most else f"{line}... ({length:,} characters)"
