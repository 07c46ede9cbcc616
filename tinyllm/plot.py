"""Pictures: loss curves, attention heatmaps and the few-shot accuracy-by-k chart.

Matplotlib is optional (the `plot` extra, or `pip install matplotlib`), so it is imported inside
the drawing functions, never when `tinyllm` or another command is imported; `require_matplotlib`
turns its absence into a one-line error that says how to install it.

We draw with matplotlib's object interface (`matplotlib.figure.Figure`) and never touch
`pyplot`: no global figure list and no backend switch in a user's process. `savefig` on a bare
Figure renders with Agg for PNG and with the SVG writer for SVG, so it needs no display. Every
file is rendered into memory first and then written atomically (temporary file, then rename),
as tinyllm writes every file a user keeps; dates and version stamps are left out, so the same
picture gives the same bytes.

The reading side (metrics.jsonl of a run directory, tokens seen per step) is plain Python here;
what an attention map is lives in tinyllm/attention_maps.py.
"""

import io
import math
import os
import textwrap

from .errors import TinyLLMError
from .fileio import atomic_write_bytes

# Names matplotlib itself: where tinyllm runs from a checkout (`python cli.py`), not an installed
# copy, "tinyllm[plot]" would install whatever the package index calls tinyllm (not this project).
INSTALL_HINT = "pip install matplotlib"
FORMATS = ("png", "svg")
LEGEND_CHARS = 32  # longest run label in a loss picture's legend: the curves stay in view
LR_CURVE_POINTS = 2000  # most points of the computed learning-rate curve
DPI = 100  # pixels per inch: a figure of (w, h) inches is exactly (100 w, 100 h) pixels
# The largest loss or learning rate drawn: matplotlib's axis arithmetic (the span of the data,
# its margins, tick steps of several times that) overflows a float near 1e308 and stops with a
# traceback. No run's loss or rate comes within a hundred orders of this; beyond it is a gap.
LARGEST_DRAWN = 1e300


def require_matplotlib():
    """Import matplotlib, or raise a one-line TinyLLMError saying how to install it."""
    try:
        import matplotlib  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise TinyLLMError(f"drawing needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def picture_format(out, fmt=None):
    """The file format of a picture: `fmt` if given, else from the suffix of `out` (PNG by default).

    Example: ("loss.svg", None) -> "svg"; ("loss", None) -> "png"; ("a.png", "svg") -> error,
    since a .png file holding SVG would mislead whoever opens it; ("a.pdf", None) -> error too,
    and so is any other suffix: a picture written over runs/x/config.json would destroy the run.
    A name with no suffix (README, .bashrc) is refused when a file holds it that is no picture.
    """
    suffix = os.path.splitext(out)[1].lower().lstrip(".")
    if suffix and suffix not in FORMATS:
        raise TinyLLMError(f"{out}: tinyllm draws PNG or SVG pictures, not .{suffix}: name the"
                           " file .png or .svg")
    if not suffix and os.path.lexists(out) and not holds_picture(out):
        raise TinyLLMError(f"{out} exists and holds no PNG or SVG picture, which a picture"
                           " would replace: name the file .png or .svg")
    if fmt is None:
        return suffix if suffix in FORMATS else "png"
    if fmt not in FORMATS:
        raise TinyLLMError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if suffix in FORMATS and suffix != fmt:
        raise TinyLLMError(f"--out {out} ends in .{suffix} but --format is {fmt}")
    return fmt


def holds_picture(path):
    """Does `path` name a regular file that starts as a PNG or an SVG that tinyllm writes does?"""
    if not os.path.isfile(path):  # a FIFO would block the read; a directory is no picture
        return False
    with open(path, "rb") as f:
        start = f.read(8)
    return start == b"\x89PNG\r\n\x1a\n" or start.startswith((b"<?xml", b"<svg"))


def save_figure(fig, out, fmt):
    """Render `fig` as `fmt` and write it to `out` atomically; returns the path written."""
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise TinyLLMError(f"cannot write {out}: the directory {directory} does not exist")
    from matplotlib import rc_context

    buffer = io.BytesIO()
    # No creation date, no software stamp and fixed SVG element ids (salted, not random): a
    # picture of the same data is the same file.
    metadata = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
    with rc_context({"svg.hashsalt": "tinyllm"}):
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    try:
        atomic_write_bytes(out, buffer.getvalue())
    except OSError as err:  # read-only, full disk, a directory by that name ...
        raise TinyLLMError(f"cannot write {out}: {err.strerror or err}") from None
    return out


def literal(text):
    r"""Text to draw as it is: matplotlib reads what stands between two $ as TeX maths, so a
    run directory or a token "$x$" would show as an italic x, and "$\foo$" stop the drawing
    with a parse error. An escaped dollar, \$, is drawn as $. Example: "$5 or $6" -> "\$5 or \$6".
    """
    return text.replace("$", r"\$")


def new_figure(width, height):
    """A matplotlib Figure of width x height inches with constrained layout (exact size kept)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


# ----------------------------------------------------------------------------- loss curves


def read_run(run_dir, log=print):
    """The evaluations of a run directory as a dict of lists: iter, train_loss, val_loss, lr;
    and tokens_per_iter (None when it cannot be told), lr_curve (see `lr_by_step`) and
    loss_per ("example" for a classifier, whose loss is per example, else "token").

    Works on a run that is still training. A run directory is untrusted, and nothing in it is
    dropped unsaid: `log` is told how many lines of metrics.jsonl are not records (a last line
    still being written, a line edited by hand), how many records have a step no run can reach
    (below 0 or above MAX_STEPS), how many losses are missing or not numbers a picture can show
    (drawn as gaps: see `_drawable`) and how many learning rates are given but cannot be drawn.
    A step logged twice (metrics.jsonl files joined by hand) is drawn once, from its last
    record, so the curve does not double back; `log` is told.
    """
    from .config import MAX_STEPS
    from .train import read_metrics_counted

    if not os.path.isdir(run_dir):
        raise TinyLLMError(f"run directory {run_dir} not found")
    logged, unread = read_metrics_counted(run_dir)
    if unread:
        log(f"note: {run_dir}: {unread} line(s) of metrics.jsonl left out: not a record of an"
            " evaluation (a JSON object with a whole-number \"iter\"), or not finished yet")
    records = [r for r in logged if 0 <= r["iter"] <= MAX_STEPS]
    if len(records) < len(logged):
        log(f"note: {run_dir}: {len(logged) - len(records)} record(s) of metrics.jsonl left out:"
            f" their step is not from 0 to {MAX_STEPS:,}")
    if not records:
        raise TinyLLMError(f"{run_dir} has no evaluations in metrics.jsonl: not a tinyllm run"
                           " directory, or no evaluation written yet")
    latest = {}  # step -> its record; a step logged twice (files joined by hand): the later
    for r in records:
        latest[r["iter"]] = r
    if len(latest) < len(records):
        log(f"note: {run_dir}: {len(records) - len(latest)} record(s) of metrics.jsonl repeat an"
            " earlier step; each step is drawn from its last record")
    records = sorted(latest.values(), key=lambda r: r["iter"])
    series = {key: [_drawable(r.get(key)) for r in records]
              for key in ("iter", "train_loss", "val_loss", "lr")}
    _note_gaps(run_dir, series, log)
    _note_rates_left_out(run_dir, records, series["lr"], log)
    series["tokens_per_iter"] = tokens_per_iter(records)
    meta = _meta(run_dir)
    series["lr_curve"] = lr_by_step(meta, series)
    series["loss_per"] = "example" if meta.get("kind") == "classifier" else "token"
    series["best_iter"] = best_step(meta, series["iter"])
    return series


def _meta(run_dir):
    """The run's config.json, read once for every figure drawn from it; {} if it cannot be read
    (a run directory is untrusted, and a run's first checkpoint may not be written yet)."""
    from .checkpoint import read_meta

    try:
        return read_meta(run_dir)
    except TinyLLMError:
        return {}


def best_step(meta, steps):
    """The step whose weights a fine-tuning run kept (config.json "best_iter"), if it is one of
    the evaluations drawn; else None (a pretraining run keeps its last weights)."""
    best = meta.get("best_iter")
    return best if _is_number(best) and best in steps else None


def _note_gaps(run_dir, series, log):
    """Tell `log` how many losses are missing or not drawable numbers: the curves have gaps."""
    gaps = [it for key in ("train_loss", "val_loss")
            for it, loss in zip(series["iter"], series[key]) if not math.isfinite(loss)]
    if gaps:
        log(f"note: {run_dir}: {len(gaps)} loss value(s) of metrics.jsonl are missing, not"
            f" finite numbers or beyond \u00b1{LARGEST_DRAWN:g} (the first at step"
            f" {int(min(gaps)):,}): the curves have gaps there")


def _note_rates_left_out(run_dir, records, rates, log):
    """Tell `log` how many learning rates metrics.jsonl gives that are not drawn. A record
    with no "lr" at all is not counted: the panel says when no record has one."""
    given = [lr for r, lr in zip(records, rates) if r.get("lr") is not None]
    left_out = sum(1 for lr in given if math.isnan(lr))
    if left_out:
        log(f"note: {run_dir}: {left_out} learning rate(s) of metrics.jsonl left out: not finite"
            f" numbers or beyond \u00b1{LARGEST_DRAWN:g}")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(x):
    """x as a float; NaN if it is not a number, or an integer too large for a float."""
    try:
        return float(x) if _is_number(x) else math.nan
    except OverflowError:
        return math.nan


def _drawable(x):
    """x as a float if a picture can show it (a number from -LARGEST_DRAWN to LARGEST_DRAWN),
    else NaN: a gap, like a missing value. Example: 3.2 -> 3.2; -1e308 -> NaN; "3.2" -> NaN."""
    x = _number(x)
    return x if abs(x) <= LARGEST_DRAWN else math.nan


def tokens_per_iter(records):
    """Tokens one training step reads, recovered from the timings each evaluation logs.

    metrics.jsonl stores ms_per_iter and tokens_per_s, whose product is tokens per step (a
    whole number, batch x context). ms_per_iter is rounded to 0.01, so we take the slowest
    record (the smallest relative rounding error) and round the product. Example:
    ms_per_iter 52.3, tokens_per_s 14684.5 -> 768.0 -> 768. None if no record timed a step
    (or the product is not a number of tokens: a run's files may hold anything, and a step
    reads at most a batch of MAX_SIZE sequences of MAX_SIZE tokens).
    """
    timings = [(_number(r.get("ms_per_iter")), _number(r.get("tokens_per_s"))) for r in records]
    timed = [(ms, rate) for ms, rate in timings if 0 < ms < math.inf and 0 < rate < math.inf]
    if not timed:
        return None
    from .config import MAX_SIZE

    ms, rate = max(timed)
    tokens = ms * rate / 1000.0
    # else not timings; 1e300 tokens a step would also overflow the tokens-seen axis
    return round(tokens) if 1 <= tokens <= MAX_SIZE * MAX_SIZE else None


def lr_by_step(meta, series):
    """(steps, rates): the learning rate up to the last evaluation, computed from the run's
    config.json (`meta`) by the schedule it trained with, at every step (every few steps in a run of
    more than LR_CURVE_POINTS steps: a curve needs no more, and a run's files may claim any
    number of steps).

    metrics.jsonl holds the rate only at evaluations, too sparse to show a warm-up. The
    computed curve is used only if it gives every logged rate back and every rate on it can be
    drawn; otherwise (a run resumed with a new --max-iters, a config.json not yet written, a
    rate peaking beyond LARGEST_DRAWN between evaluations) this returns None and the logged
    points are joined instead.
    """
    try:
        rate = schedule_of(meta)
        logged = [(int(it), lr) for it, lr in zip(series["iter"], series["lr"]) if lr == lr]
        if not logged or any(not math.isclose(rate(it), lr, rel_tol=1e-6) for it, lr in logged):
            return None
        last = int(series["iter"][-1])
        every = -(-last // LR_CURVE_POINTS) or 1  # a step per pixel or so, however long the run
        steps = sorted(set(range(0, last + 1, every)) | {last})
        rates = [rate(it) for it in steps]
        return (steps, rates) if all(abs(r) <= LARGEST_DRAWN for r in rates) else None
    except (TinyLLMError, KeyError, TypeError, ValueError, ArithmeticError):
        return None  # a config.json we cannot read (or a 400-digit number): the logged points


def schedule_of(meta):
    """The learning rate by step of a run, from its config.json: the seq2seq paper's schedule
    ("schedule": "noam") or warm-up plus cosine decay (everything else)."""
    from .optim import lr_at
    from .seq2seq_run import noam_lr

    tc = meta["train"]
    if meta.get("schedule") == "noam":
        return lambda it: noam_lr(it, meta["model"]["n_embd"], tc["warmup_iters"])
    return lambda it: lr_at(it, tc["lr"], tc["min_lr"], tc["warmup_iters"], tc["max_iters"])


def draw_loss_curves(runs, out, fmt="png"):
    """Draw `loss_figure(runs)` to `out` as `fmt`; returns the path written."""
    return save_figure(loss_figure(runs), out, fmt)


def loss_figure(runs):
    """Train and validation loss against step, one colour per run, the learning rate below.

    `runs` maps a label (the run directory) to `read_run`'s dict. Train loss is solid,
    validation loss dashed, a dot at each evaluation, and a star at the evaluation whose weights
    a fine-tuning run kept (its lowest validation loss). When every run reads the same number of
    tokens per step, a second axis on top counts tokens seen.
    """
    require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7.0, 5.0)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for i, (label, s) in enumerate(zip(legend_labels(runs), runs.values())):
        colour = f"C{i % 10}"
        loss_ax.plot(s["iter"], s["train_loss"], color=colour, marker=".",
                     label=f"{literal(label)} (train)")
        loss_ax.plot(s["iter"], s["val_loss"], color=colour, marker=".", linestyle="--",
                     label=f"{literal(label)} (val)")
        if s.get("best_iter") is not None:  # early stopping kept the weights of this evaluation
            best = s["iter"].index(s["best_iter"])
            loss_ax.plot([s["best_iter"]], [s["val_loss"][best]], color=colour, marker="*",
                         markersize=12, linestyle="none",
                         label=f"{literal(label)} (weights kept: step {s['best_iter']:,})")
        steps, rates = s["lr_curve"] or (s["iter"], s["lr"])
        # a line through one point draws nothing: a run with one evaluation gets a dot
        lr_ax.plot(steps, rates, color=colour, marker="." if len(steps) == 1 else None)
    # a classifier's loss is one cross-entropy per example; every other run's is per token
    per = {s["loss_per"] for s in runs.values()}
    loss_ax.set_ylabel(f"loss (nats per {per.pop()})" if len(per) == 1
                       else "loss (nats per token; per example for a classifier)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    if not any(s["lr_curve"] or any(map(math.isfinite, s["lr"])) for s in runs.values()):
        # a hand-made or cut-down metrics.jsonl: say so rather than draw an empty scale
        lr_ax.text(0.5, 0.5, "no learning rate in metrics.jsonl", ha="center", va="center",
                   transform=lr_ax.transAxes, color="grey")
        lr_ax.set_yticks([])
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no step 0.25
    lr_ax.grid(alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    per_step = {s["tokens_per_iter"] for s in runs.values()}
    if len(per_step) == 1 and None not in per_step:
        n = per_step.pop()
        top = loss_ax.secondary_xaxis("top", functions=(lambda it: it * n, lambda t: t / n))
        top.set_xlabel(f"tokens seen ({n:,} per step)")
    return fig


def legend_labels(run_dirs):
    """Run directories as legend labels: as given, or if longer than LEGEND_CHARS, "…" and
    their end (the part of a path that tells runs apart), so that the legend leaves the curves
    in view; as given after all when two would read the same.

    Example: "/home/me/experiments/2024/lr-3e-4-batch-16-context-256" -> "…/2024/lr-3e-4-batch-16-
    context-256" cut to LEGEND_CHARS characters; "runs/a" -> "runs/a".
    """
    short = [d if len(d) <= LEGEND_CHARS else "\u2026" + d[-(LEGEND_CHARS - 1):] for d in run_dirs]
    return short if len(set(short)) == len(short) else list(run_dirs)


# ----------------------------------------------------------------------------- attention


PANEL_COLUMNS = 4  # heads side by side before wrapping to a new row
TITLE_CHARS_PER_INCH = 8  # of 11-point text: a digit is 0.1 inch wide, most capitals 0.11


def attention_figure_size(n_panels, n_queries, n_keys):
    """(width, height) in inches of a grid of n_panels heatmaps of n_queries x n_keys cells.

    A cell gets 0.16 inch (16 pixels: room for one tick label of 7-point text), a panel at
    least 2 inches and at most 8 across; 0.9 inch more per panel holds its tick labels and title.
    """
    cols = min(n_panels, PANEL_COLUMNS)
    rows = math.ceil(n_panels / cols)
    cell = cell_inches(n_queries, n_keys)
    side = lambda n: max(2.0, cell * n) + 0.9  # noqa: E731
    return cols * side(n_keys) + 0.9, rows * side(n_queries) + 0.4  # colour bar, suptitle


def cell_inches(n_queries, n_keys):
    """The side of a heatmap cell: 0.16 inch, less for long inputs (a panel stays within 8)."""
    return 0.16 * min(1.0, 8.0 / (0.16 * max(n_queries, n_keys)))


def label_every(n_queries, n_keys, font):
    """Label every k-th token: k = 1 while a cell is as tall as a line of `font`-point text
    (cells shrink above 50 tokens, and from about 70 labels of every token would overlap).
    Example: 121 tokens, 7-point labels (0.117 inch a line), cells of 8 / 121 = 0.066 inch ->
    every 2nd token."""
    line = font * 1.2 / 72  # inches
    return max(1, math.ceil(line / cell_inches(n_queries, n_keys)))


def draw_attention(panels, query_labels, key_labels, out, fmt="png", title=None, marks=None):
    """Draw `attention_figure` to `out` as `fmt`; returns the path written."""
    return save_figure(attention_figure(panels, query_labels, key_labels, title, marks), out, fmt)


def attention_figure(panels, query_labels, key_labels, title=None, marks=None):
    """Heatmaps of attention weights, one panel per head, tokens as axis labels.

    `panels` is a list of (title, weights (Tq, Tk)); row i of a panel is where query token i
    attends. `marks` (optional) lists (query, key) cells to outline, e.g. the induction targets.
    """
    require_matplotlib()
    n_q, n_k = len(query_labels), len(key_labels)
    fig = new_figure(*attention_figure_size(len(panels), n_q, n_k))
    cols = min(len(panels), PANEL_COLUMNS)
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    font = 7 if max(n_q, n_k) > 24 else 9
    # characters read best upright; longer BPE tokens need turning to fit under their column
    turn = 90 if max(len(label) for label in key_labels) > 2 else 0
    every = label_every(n_q, n_k, font)
    which = "" if every == 1 else f"; every {every}{_ordinal(every)} token labelled"
    for ax, (name, weights) in zip(axes, panels):
        image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(0, n_k, every), [literal(t) for t in key_labels[::every]],
                      rotation=turn, fontsize=font)
        ax.set_yticks(range(0, n_q, every), [literal(t) for t in query_labels[::every]],
                      fontsize=font)
        ax.tick_params(length=0, pad=1)
        ax.set_xlabel(f"key (attended to{which})", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        for q, k in marks or ():
            ax.add_patch(_outline(q, k))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(panels)]), shrink=0.6, label="attention weight")
    if title:  # wrapped to the figure's width: one panel of a few tokens is narrow
        fig.suptitle(textwrap.fill(literal(title), int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)),
                     fontsize=11)
    return fig


def _ordinal(n):
    """The suffix of an ordinal number: 2 -> "nd", 3 -> "rd", 4 -> "th", 11 -> "th"."""
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _outline(q, k):
    """A red square around cell (q, k) of a heatmap."""
    from matplotlib.patches import Rectangle

    return Rectangle((k - 0.5, q - 0.5), 1.0, 1.0, fill=False, edgecolor="red", linewidth=1.2)


# ----------------------------------------------------------------------------- few-shot


def draw_fewshot(rows, out, fmt="png", title=None):
    """Accuracy against the number of demonstrations k, with 95% Wilson intervals as error bars
    and the chance level as a dashed line. `rows` are `fewshot.accuracy_row` dicts."""
    require_matplotlib()
    fig = new_figure(5.0, 3.6)
    ax = fig.subplots()
    ks = [r["k"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    below = [r["accuracy"] - r["ci95"][0] for r in rows]
    above = [r["ci95"][1] - r["accuracy"] for r in rows]
    ax.errorbar(ks, acc, yerr=[below, above], marker="o", capsize=4, label="accuracy (95% Wilson CI)")
    ax.plot(ks, [r["chance"] for r in rows], color="grey", linestyle="--", label="chance")
    ax.set_xticks(ks)
    ax.set_xlabel("demonstrations in the prompt (k)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)  # a point at 0 whole, not half under the edge
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title(literal(title) if title else f"few-shot accuracy ({rows[0]['n']} queries per k)",
                 fontsize=10)
    return save_figure(fig, out, fmt)
