"""`tinyllm plot` and `tinyllm attention`: pictures of a run's loss curves and of what its heads
attend to. Drawing needs the optional `plot` extra (matplotlib); see tinyllm/plot.py.
"""

import click

from .attention_maps import MAX_PANELS
from .cli_common import count, user_errors
from .config import DEFAULT_RUN

FORMAT_HELP = "File format.  [default: from the suffix of --out, else png]"


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="loss.png", type=click.Path(dir_okay=False),
              help="Picture file to write (atomically), named .png, .svg or with no suffix.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg"]), default=None, help=FORMAT_HELP)
@user_errors
def plot(run_dirs, out, fmt):
    """Draw train and validation loss against step for one or more run directories.

    One colour per run (labelled with its directory; a long one by its end), validation dashed,
    the learning rate in a panel below, tokens seen on the top axis when every run reads the same
    number of tokens per step. Works on pretraining, fine-tuning and seq2seq runs, and on a run
    that is still training.
    """
    from .plot import draw_loss_curves, picture_format, read_run, require_matplotlib

    require_matplotlib()
    fmt = picture_format(out, fmt)
    note = lambda text: click.echo(text, err=True)  # noqa: E731
    runs = {run_dir: read_run(run_dir, log=note) for run_dir in run_dirs}
    path = draw_loss_curves(runs, out, fmt)
    last = ", ".join(f"{d} at step {int(s['iter'][-1])}" for d, s in runs.items())
    click.echo(f"loss curves ({last}) written to {path}")


@click.command()
@click.option("--checkpoint", default=DEFAULT_RUN, type=click.Path(file_okay=False),
              help="Run directory: pretraining, instruction or classification fine-tuning, or seq2seq.")
@click.option("--prompt", required=True,
              help="Text whose attention to draw (for seq2seq: the source).")
@click.option("--layer", default=None, callback=count, type=int,
              help="Layer to draw, counting from 0.  [default: the last layer]")
@click.option("--head", default=None, callback=count, type=int,
              help="Head to draw, counting from 0.  [default: every head of the layer, up to"
                   f" {MAX_PANELS}]")
@click.option("--part", type=click.Choice(["encoder", "decoder", "cross"]), default=None,
              help="seq2seq runs only: encoder self-attention, decoder self-attention or"
                   " cross-attention.  [default: cross]")
@click.option("--target", default=None,
              help="seq2seq runs, --part decoder or cross: the target text the decoder reads"
                   " after <bos>.  [default: the model's greedy translation of --prompt]")
@click.option("--out", default="attention.png", type=click.Path(dir_okay=False),
              help="Picture file to write (atomically), named .png, .svg or with no suffix.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg"]), default=None, help=FORMAT_HELP)
@user_errors
def attention(checkpoint, prompt, layer, head, part, target, out, fmt):
    """Draw attention weights as heatmaps: one panel per head, the tokens on the axes.

    Row i of a panel is where query token i attends; white space shows as ␣, newlines as ↵.
    """
    from .attention_maps import checkpoint_attention, select_heads
    from .plot import draw_attention, picture_format, require_matplotlib

    require_matplotlib()
    fmt = picture_format(out, fmt)
    maps = checkpoint_attention(checkpoint, prompt, part, target)
    if maps.unknown:
        click.echo(f"note: {maps.unknown} character(s) the model never saw were read as <|unk|>",
                   err=True)
    panels = select_heads(maps.weights, layer, head)
    n_head = maps.weights.shape[1]
    if head is None and len(panels) < n_head:
        click.echo(f"note: {n_head - len(panels)} of the layer's {n_head} heads left out: the"
                   f" first {len(panels)} are drawn; draw any one with --head N", err=True)
    path = draw_attention(panels, maps.query_labels, maps.key_labels, out, fmt, title=maps.what)
    heads = "1 head" if len(panels) == 1 else f"{len(panels)} heads"
    click.echo(f"{maps.what}, {heads} of {len(maps.query_labels)} x"
               f" {len(maps.key_labels)} tokens, written to {path}")
