"""The pictures (`tinyllm plot`, `tinyllm attention`, `tinyllm fewshot --plot`) on real tiny runs:
each writes a valid image of the size its layout asks for, with the Agg renderer; bad input gets
one line. Skipped when matplotlib (the `plot` extra) is not installed."""

import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from tinyllm import plot  # noqa: E402
from tinyllm.cli import main  # noqa: E402

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog.\n" * 20
SMALL = ["--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
         "--batch-size", "4", "--eval-iters", "1"]
STEPS = ["--max-iters", "4", "--eval-interval", "2"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *words):
    """Exit 1 through a handled error: one 'Error:' line naming `words`, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], errors[0]


def png_size(path):
    """(width, height) from a PNG's header; fails unless the file starts like a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"  # complete, not cut short
    return struct.unpack(">II", data[16:24])


def pixels(inches):
    return tuple(round(x * plot.DPI) for x in inches)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretraining, a classification fine-tuning (as an encoder) and a seq2seq run, tiny."""
    root = tmp_path_factory.mktemp("runs")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "labels.tsv").write_text("".join(f"{'pos' if i % 2 else 'neg'}\tthe cat {i % 7}\n"
                                             for i in range(40)), encoding="utf-8")
    (root / "pairs.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in
                                            ["cat", "dog", "mat", "log", "sat", "the", "and"] * 3),
                                    encoding="utf-8")
    commands = {
        "pretrain": ["pretrain", "--data", root / "text.txt", "--tokenizer", "char", *SMALL, *STEPS,
                     "--sample-tokens", 0],
        "classify": ["finetune", "classify", "--checkpoint", root / "pretrain", "--arch", "encoder",
                     "--data", root / "labels.tsv", *STEPS, "--batch-size", 4],
        "seq2seq": ["seq2seq", "train", "--data", root / "pairs.tsv", *SMALL, *STEPS,
                    "--eval-examples", 2, "--schedule", "noam", "--warmup-iters", 3],
    }
    for name, args in commands.items():
        result = invoke(*args, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_plot_draws_each_kind_of_run_in_one_picture(runs, tmp_path):
    out = tmp_path / "loss.png"
    result = invoke("plot", runs / "pretrain", runs / "classify", runs / "seq2seq", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"written to {out}" in result.output
    for kind in ("pretrain", "classify", "seq2seq"):
        assert f"{runs / kind} at step 4" in result.output
    assert png_size(out) == pixels((7.0, 5.0))


def test_plot_as_svg(runs, tmp_path):
    out = tmp_path / "loss.svg"
    result = invoke("plot", runs / "pretrain", runs / "seq2seq", "--out", out)
    assert result.exit_code == 0, result.output
    root = ET.fromstring(out.read_bytes())
    assert root.tag.endswith("svg") and root.get("width") == "504pt"  # 7 inches
    svg = out.read_text(encoding="utf-8")
    for label in plot.legend_labels([str(runs / "pretrain"), str(runs / "seq2seq")]):
        assert label.lstrip("\u2026") in svg  # a label per run
    forced = invoke("plot", runs / "pretrain", "--out", tmp_path / "loss", "--format", "svg")
    assert forced.exit_code == 0 and (tmp_path / "loss").read_bytes().startswith(b"<?xml")


def test_plot_a_run_still_training(runs, tmp_path):
    """metrics.jsonl whose last line is being written (cut mid-number, no newline)."""
    run = tmp_path / "live"
    lines = (runs / "pretrain" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25],
                                       encoding="utf-8")
    result = invoke("plot", run, "--out", tmp_path / "live.png")
    assert result.exit_code == 0, result.output
    assert "at step 2" in result.output
    series = plot.read_run(str(run))
    assert series["iter"] == [0.0, 2.0] and series["tokens_per_iter"] == 4 * 16


def test_a_step_logged_twice_is_drawn_once_from_its_last_record(tmp_path):
    # before, two metrics.jsonl files joined by hand drew a curve that doubled back
    run = tmp_path / "joined"
    run.mkdir()
    records = [(0, 4.0), (2, 3.0), (0, 5.0), (2, 2.5), (4, 2.0)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"iter": it, "train_loss": loss, "val_loss": loss + 0.1, "lr": 1e-3}) + "\n"
        for it, loss in records), encoding="utf-8")
    notes = []
    series = plot.read_run(str(run), log=notes.append)
    assert series["iter"] == [0, 2, 4] and series["train_loss"] == [5.0, 2.5, 2.0]
    assert len(notes) == 1 and "2 record(s) of metrics.jsonl repeat an earlier step" in notes[0]


@pytest.mark.parametrize("evaluations", [1, 2])
def test_a_run_of_few_steps_shows_each_point_on_whole_steps(runs, tmp_path, evaluations):
    # before, one evaluation (a run just started) left the learning-rate panel empty, and the
    # step axis read -0.04 ... 0.04, or 0.25, 0.5 ... for a run of 2 steps
    run = tmp_path / "few"
    run.mkdir()
    lines = (runs / "pretrain" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:evaluations]) + "\n", encoding="utf-8")
    (run / "config.json").write_bytes((runs / "pretrain" / "config.json").read_bytes())
    fig = plot.loss_figure({"few": plot.read_run(str(run))})
    fig.draw_without_rendering()
    lr_ax = fig.axes[1]
    if evaluations == 1:
        assert lr_ax.lines[0].get_marker() not in (None, "None", "")  # a line of one point: a dot
    low, high = lr_ax.get_xlim()
    shown = [t for t in lr_ax.get_xticks() if low <= t <= high]
    assert shown and all(t == int(t) and t >= 0 for t in shown), shown


def test_long_run_directories_leave_the_curves_in_view(runs):
    # before, the legend held each path whole: two long ones made it as wide as the plot,
    # over the curves
    series = plot.read_run(str(runs / "pretrain"))
    names = ["/home/someone/experiments/2024-05-01/pretrain-char-lr1e-3-batch8-context32",
             "/home/someone/experiments/2024-05-01/pretrain-char-lr3e-4-batch8-context32", "s2s"]
    fig = plot.loss_figure({name: series for name in names})
    renderer = rendered(fig)
    loss_ax = fig.axes[0]
    legend = loss_ax.get_legend()
    width = loss_ax.get_window_extent(renderer).width
    assert legend.get_window_extent(renderer).width < 0.5 * width
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "\u2026" + names[0][-(plot.LEGEND_CHARS - 1):] + " (train)"
    assert texts[2] != texts[0] and texts[4] == "s2s (train)"
    alike = ["a/" + "x" * 40, "b/" + "x" * 40]  # the same end: shown whole
    assert plot.legend_labels(alike) == alike


@pytest.mark.parametrize("kinds, unit", [(["pretrain", "seq2seq"], "nats per token"),
                                         (["classify"], "nats per example"),
                                         (["pretrain", "classify"], "per example for a classifier")])
def test_the_loss_axis_names_what_the_loss_is_per(runs, kinds, unit):
    # before, a classifier's loss (one cross-entropy per example) was said to be per token
    fig = plot.loss_figure({kind: plot.read_run(str(runs / kind)) for kind in kinds})
    assert unit in fig.axes[0].get_ylabel()


def test_a_fine_tuning_run_marks_the_step_whose_weights_it_kept(runs):
    series = plot.read_run(str(runs / "classify"))
    meta = json.loads((runs / "classify" / "config.json").read_text(encoding="utf-8"))
    assert series["best_iter"] == meta["best_iter"] in series["iter"]
    stars = [line for line in plot.loss_figure({"c": series}).axes[0].get_lines()
             if line.get_marker() == "*"]
    assert len(stars) == 1 and f"weights kept: step {meta['best_iter']}" in stars[0].get_label()
    at = series["iter"].index(meta["best_iter"])
    assert list(stars[0].get_xdata()) == [meta["best_iter"]]
    assert list(stars[0].get_ydata()) == [series["val_loss"][at]]
    pretrain = plot.read_run(str(runs / "pretrain"))  # keeps its last weights: no star
    assert pretrain["best_iter"] is None
    assert not [line for line in plot.loss_figure({"p": pretrain}).axes[0].get_lines()
                if line.get_marker() == "*"]


def test_dollar_signs_are_drawn_as_they_are(runs, tmp_path):
    # before, matplotlib read "$...$" in a run directory, a token or a title as TeX maths:
    # "r$a$" showed as an italic a, and "$\\foo$" stopped the drawing with a traceback
    run = tmp_path / "x$\\foo$"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes((runs / "pretrain" / "metrics.jsonl").read_bytes())
    result = invoke("plot", run, "--out", tmp_path / "loss.png")
    assert result.exit_code == 0, result.output
    labels = ["$", "x", "$\\foo$"]
    fig = plot.attention_figure([("layer 0, head 0", np.eye(3))], labels, labels,
                                title="decoder self-attention, target '$\\alpha$'")
    rendered(fig)  # no parse error
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["\\$", "x", "\\$\\foo\\$"]


def test_tokens_per_iter_from_the_logged_timings(runs):
    records = [json.loads(line) for line in (runs / "pretrain" / "metrics.jsonl").open()]
    assert plot.tokens_per_iter(records) == 4 * 16  # batch 4 x context 16
    assert plot.tokens_per_iter([{"iter": 0, "ms_per_iter": 0.0, "tokens_per_s": 0.0}]) is None


@pytest.mark.parametrize("kind", ["pretrain", "classify", "seq2seq"])
def test_the_lr_panel_draws_every_step_of_the_schedule_the_run_logged(runs, kind):
    series = plot.read_run(str(runs / kind))
    steps, rates = series["lr_curve"]
    assert steps == [0, 1, 2, 3, 4]
    assert [rates[int(it)] for it in series["iter"]] == pytest.approx(series["lr"], rel=1e-6)
    if kind == "seq2seq":  # noam: up for 3 steps, then down as 1 / sqrt(step)
        assert rates[2] > rates[1] > rates[0] and rates[4] < rates[3] < rates[2]


def test_the_lr_curve_of_a_run_claiming_millions_of_steps_stays_small(runs, tmp_path):
    """A run's files may claim any step count: the curve is sampled, not drawn at every step."""
    run = tmp_path / "long"
    run.mkdir()
    meta = json.loads((runs / "pretrain" / "config.json").read_text())
    meta["train"]["max_iters"] = 10**12
    (run / "config.json").write_text(json.dumps(meta))
    rate = plot.schedule_of(meta)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iter": it, "lr": rate(it)}) + "\n"
                                               for it in (0, 10**7)))
    steps, rates = plot.read_run(str(run))["lr_curve"]
    assert len(steps) <= plot.LR_CURVE_POINTS + 1 and steps[0] == 0 and steps[-1] == 10**7
    assert rates[-1] == pytest.approx(rate(10**7))


def test_the_lr_panel_falls_back_to_the_logged_points(runs, tmp_path):
    """A config.json whose schedule does not give the logged rates back is not believed."""
    run = tmp_path / "edited"
    run.mkdir()
    for name in ("metrics.jsonl", "config.json"):
        (run / name).write_bytes((runs / "pretrain" / name).read_bytes())
    meta = json.loads((run / "config.json").read_text())
    meta["train"]["lr"] *= 2
    (run / "config.json").write_text(json.dumps(meta))
    assert plot.read_run(str(run))["lr_curve"] is None
    (run / "config.json").unlink()
    assert plot.read_run(str(run))["lr_curve"] is None


def test_a_run_directory_s_impossible_figures_are_no_traceback(tmp_path):
    # before, a 400-digit step or loss, and timings whose product overflows, ended in OverflowError
    run = tmp_path / "crafted"
    run.mkdir()
    records = [{"iter": 0, "train_loss": 10**400, "val_loss": 2.0, "lr": 1e-3,
                "ms_per_iter": 1e308, "tokens_per_s": 1e308},
               {"iter": 4, "train_loss": 1.5, "val_loss": 1.9, "lr": 1e-3},
               {"iter": 10**400, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3},
               {"iter": -3, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("plot", run, "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "at step 4" in result.stdout
    assert "2 record(s) of metrics.jsonl left out" in result.stderr
    series = plot.read_run(str(run), log=lambda note: None)
    assert series["iter"] == [0.0, 4.0] and series["tokens_per_iter"] is None
    assert series["train_loss"][0] != series["train_loss"][0]  # NaN, drawn as a gap


@pytest.mark.parametrize("key", ["train_loss", "val_loss", "lr"])
@pytest.mark.parametrize("value", [1e308, -1e308, 1.7e308])
def test_a_finite_value_too_large_to_draw_is_a_gap_not_a_traceback(tmp_path, key, value):
    # before, a loss or learning rate near the float limit (1e300 was drawn) ended in
    # matplotlib's "ValueError: arange: cannot compute length" or an OverflowError
    run = tmp_path / "crafted"
    run.mkdir()
    records = [{"iter": 0, "train_loss": 2.0, "val_loss": 2.1, "lr": 1e-3},
               {"iter": 2, "train_loss": 1.0, "val_loss": 1.1, "lr": 1e-3}]
    records[0][key] = value
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("plot", run, "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "x.png") == pixels((7.0, 5.0))
    what = "learning rate(s)" if key == "lr" else "loss value(s)"
    assert f"1 {what} of metrics.jsonl" in result.stderr and "1e+300" in result.stderr
    series = plot.read_run(str(run), log=lambda note: None)
    assert series[key][0] != series[key][0] and series[key][1] < 3  # NaN: a gap; then drawn


def test_the_extremes_a_picture_can_show_are_drawn(tmp_path):
    """The largest finite figures on every axis at once: losses and rates at +-LARGEST_DRAWN and
    at the smallest float, the last step a run can reach, and the most tokens a step can read."""
    from tinyllm.config import MAX_SIZE, MAX_STEPS

    run = tmp_path / "extremes"
    run.mkdir()
    big, tiny = plot.LARGEST_DRAWN, 5e-324
    records = [{"iter": 0, "train_loss": big, "val_loss": -big, "lr": tiny,
                "ms_per_iter": MAX_SIZE * MAX_SIZE, "tokens_per_s": 1000.0},
               {"iter": 1, "train_loss": tiny, "val_loss": -tiny, "lr": -big},
               {"iter": MAX_STEPS, "train_loss": -big, "val_loss": tiny, "lr": big}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.read_run(str(run))["tokens_per_iter"] == MAX_SIZE * MAX_SIZE
    for fmt in ("png", "svg"):
        result = invoke("plot", run, "--out", tmp_path / f"x.{fmt}")
        assert result.exit_code == 0 and not result.stderr, result.output
    # a step of more tokens no run reads; before, 1e300 of them at step MAX_STEPS overflowed
    # the tokens-seen axis: "ValueError: Axis limits cannot be NaN or Inf"
    for ms in (2 * MAX_SIZE * MAX_SIZE, 1e300):
        records[0]["ms_per_iter"] = ms
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert plot.read_run(str(run))["tokens_per_iter"] is None
        result = invoke("plot", run, "--out", tmp_path / "x.png")
        assert result.exit_code == 0 and not result.stderr, result.output


def test_a_schedule_peaking_past_what_can_be_drawn_falls_back_to_the_logged_rates(runs, tmp_path):
    # before, a config.json whose schedule gives the logged rates back but overflows between
    # two evaluations (a warm-up of 10**9 steps to 1e308) ended in an OverflowError
    from tinyllm.optim import lr_at

    run = tmp_path / "peak"
    run.mkdir()
    meta = json.loads((runs / "pretrain" / "config.json").read_text())
    meta["train"].update(lr=1e308, min_lr=1e299, warmup_iters=10**9, max_iters=10**9 + 1)
    (run / "config.json").write_text(json.dumps(meta))
    rate = plot.schedule_of(meta)
    assert rate(0) == lr_at(0, 1e308, 1e299, 10**9, 10**9 + 1) <= plot.LARGEST_DRAWN
    records = [{"iter": it, "train_loss": 1.0, "val_loss": 1.0, "lr": rate(it)}
               for it in (0, 2 * 10**9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.read_run(str(run))["lr_curve"] is None
    result = invoke("plot", run, "--out", tmp_path / "x.png")
    assert result.exit_code == 0 and not result.stderr, result.output


def test_lines_and_losses_left_out_of_the_picture_are_counted(tmp_path):
    # before, a line that was not a record (cut short, a step of 40.5 or "40") and a loss that
    # was not a finite number (null, NaN, "3.2") were left out of the picture unsaid
    run = tmp_path / "edited"
    run.mkdir()
    lines = [{"iter": 0, "train_loss": 4.0, "val_loss": 4.1, "lr": 1e-3},
             {"iter": 2, "train_loss": None, "val_loss": "3.2", "lr": 1e-3},
             {"iter": 4, "train_loss": float("nan"), "val_loss": 3.0, "lr": 1e-3},
             {"iter": 40.5, "train_loss": 2.0}, {"iter": "6", "train_loss": 2.0}, [6]]
    text = "".join(json.dumps(r) + "\n" for r in lines) + "\n" + '{"iter": 6, "train_lo'
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    notes = []
    series = plot.read_run(str(run), log=notes.append)
    assert series["iter"] == [0, 2, 4]
    assert len(notes) == 2, notes
    assert "4 line(s) of metrics.jsonl left out" in notes[0]
    assert "3 loss value(s)" in notes[1] and "(the first at step 2)" in notes[1]
    result = invoke("plot", run, "--out", tmp_path / "x.png")
    assert result.exit_code == 0 and result.stderr.splitlines() == notes, result.output


def test_a_400_digit_timing_or_setting_is_no_traceback(runs, tmp_path):
    # before, a 400-digit ms_per_iter in metrics.jsonl, or warmup_iters in config.json, ended
    # in OverflowError
    run = tmp_path / "crafted"
    run.mkdir()
    records = [json.loads(line) for line in (runs / "pretrain" / "metrics.jsonl").open()]
    records[1]["ms_per_iter"] = 10**400
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = json.loads((runs / "pretrain" / "config.json").read_text())
    meta["train"]["warmup_iters"] = 10**400
    (run / "config.json").write_text(json.dumps(meta))
    result = invoke("plot", run, "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    series = plot.read_run(str(run))
    assert series["tokens_per_iter"] == 4 * 16  # from the other records' timings
    assert series["lr_curve"] is None  # the logged rates are drawn instead


def test_a_run_that_logged_no_learning_rate_says_so(runs, tmp_path):
    # before, its learning-rate panel was an empty scale from -0.05 to 0.05
    run = tmp_path / "no-lr"
    run.mkdir()
    records = [json.loads(line) for line in (runs / "pretrain" / "metrics.jsonl").open()]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "lr"}) + "\n" for r in records))
    lr_ax = plot.loss_figure({"no-lr": plot.read_run(str(run))}).axes[1]
    assert [t.get_text() for t in lr_ax.texts] == ["no learning rate in metrics.jsonl"]
    assert not list(lr_ax.get_yticks())
    lr_ax = plot.loss_figure({"pretrain": plot.read_run(str(runs / "pretrain"))}).axes[1]
    assert not lr_ax.texts


def test_plot_errors(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(invoke("plot", tmp_path / "empty", "--out", tmp_path / "x.png"),
                      "empty", "no evaluations in metrics.jsonl")
    assert_user_error(invoke("plot", tmp_path / "nowhere", "--out", tmp_path / "x.png"),
                      "nowhere", "not found")
    assert_user_error(invoke("plot", runs / "pretrain", "--out", tmp_path / "x.png",
                             "--format", "svg"), "x.png", "--format is svg")
    assert_user_error(invoke("plot", runs / "pretrain", "--out", tmp_path / "no" / "x.png"),
                      "does not exist")
    assert not (tmp_path / "x.png").exists()


def test_a_full_disk_is_one_line(runs, tmp_path, monkeypatch):
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "atomic_write_bytes", full)
    assert_user_error(invoke("plot", runs / "pretrain", "--out", tmp_path / "x.png"),
                      "cannot write", "x.png", "No space left")


def test_attention_all_heads_or_one(runs, tmp_path):
    prompt = "the cat sat"  # 11 characters
    out = tmp_path / "attn.png"
    result = invoke("attention", "--checkpoint", runs / "pretrain", "--prompt", prompt, "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 heads of 11 x 11 tokens" in result.output and f"written to {out}" in result.output
    assert png_size(out) == pixels(plot.attention_figure_size(2, 11, 11))
    one = tmp_path / "one.png"
    result = invoke("attention", "--checkpoint", runs / "pretrain", "--prompt", prompt,
                    "--layer", 0, "--head", 1, "--out", one)
    assert result.exit_code == 0, result.output
    assert png_size(one) == pixels(plot.attention_figure_size(1, 11, 11))
    assert png_size(one)[0] < png_size(out)[0]


def test_attention_of_more_heads_than_a_picture_holds_says_how_many_are_left_out(
        runs, tmp_path, monkeypatch):
    from tinyllm import attention_maps

    monkeypatch.setattr(attention_maps, "MAX_PANELS", 1)  # the run has 2 heads a layer
    out = tmp_path / "attn.png"
    result = invoke("attention", "--checkpoint", runs / "pretrain", "--prompt", "cat", "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 head of 3 x 3 tokens" in result.stdout
    assert result.stderr.splitlines() == ["note: 1 of the layer's 2 heads left out: the first 1"
                                          " are drawn; draw any one with --head N"]
    assert png_size(out) == pixels(plot.attention_figure_size(1, 3, 3))


def assert_nothing_cut_off(fig):
    """Every title, label and colour bar of a rendered figure lies inside the picture."""
    inside = fig.get_tightbbox(rendered(fig))  # inches
    assert inside.x0 >= 0 and inside.y0 >= 0, inside
    assert inside.x1 <= fig.get_figwidth() and inside.y1 <= fig.get_figheight(), inside


@pytest.mark.parametrize("target", ["2023-07-14", "1" * 63])
def test_a_long_title_over_one_narrow_panel_is_wrapped_not_cut(target):
    # before, the title of one head's panel ran past both edges, and pushed the colour bar's
    # label off the right edge
    labels = ["<bos>"] + list(target[:10])
    weights = np.full((len(labels), len(labels)), 1.0 / len(labels))
    title = f"decoder self-attention of a seq2seq model, target {target!r}"
    fig = plot.attention_figure([("layer 0, head 0", weights)], labels, labels, title=title)
    assert_nothing_cut_off(fig)


def rendered(fig):
    """A renderer that has drawn `fig` as savefig does for a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("n", [11, 60, 121, 256])
def test_the_token_labels_of_a_long_prompt_do_not_overlap(n):
    # before, every token got a label, and from about 70 tokens on they overlapped
    labels = ["\u2423word"] * n
    weights = np.full((n, n), 1.0 / n)
    fig = plot.attention_figure([("layer 0, head 0", weights)], labels, labels)
    renderer = rendered(fig)
    ax = fig.axes[0]
    rows = sorted((t.get_window_extent(renderer) for t in ax.get_yticklabels()), key=lambda b: b.y0)
    columns = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels()),
                     key=lambda b: b.x0)
    assert all(a.y1 <= b.y0 for a, b in zip(rows, rows[1:]))
    assert all(a.x1 <= b.x0 for a, b in zip(columns, columns[1:]))
    every = plot.label_every(n, n, 7 if n > 24 else 9)
    assert len(rows) == len(range(0, n, every)) and (every == 1) == (n <= 60)
    assert ("labelled" in ax.get_xlabel()) == (every > 1)


@pytest.mark.parametrize("part, queries, keys", [("encoder", 3, 3), ("decoder", 4, 4),
                                                 ("cross", 4, 3)])
def test_attention_of_a_seq2seq_run(runs, tmp_path, part, queries, keys):
    out = tmp_path / f"{part}.svg"
    target = [] if part == "encoder" else ["--target", "tac"]  # the encoder reads the source alone
    result = invoke("attention", "--checkpoint", runs / "seq2seq", "--prompt", "cat", *target,
                    "--part", part, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"2 heads of {queries} x {keys} tokens" in result.output
    assert ("target 'tac'" in result.output) == (part != "encoder")
    assert "target" not in result.output or part != "encoder"  # none decoded for its title
    assert ET.fromstring(out.read_bytes()).tag.endswith("svg")
    assert "&lt;bos&gt;" in out.read_text(encoding="utf-8") or part == "encoder"
    if part == "encoder":
        refused = invoke("attention", "--checkpoint", runs / "seq2seq", "--prompt", "cat",
                         "--target", "tac", "--part", part, "--out", out)
        assert refused.exit_code == 1 and "--target applies to --part decoder" in refused.output


def test_attention_of_an_encoder_classifier(runs, tmp_path):
    out = tmp_path / "cls.png"
    result = invoke("attention", "--checkpoint", runs / "classify", "--prompt", "the cat",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "bidirectional self-attention of a classifier" in result.output
    assert png_size(out) == pixels(plot.attention_figure_size(2, 7, 7))


def test_attention_says_how_many_characters_it_read_as_unk(tmp_path):
    # a char model fine-tuned on text it had not seen has <|unk|>: `attention` reads an unseen
    # character as it, and says so on stderr as `generate` does
    import numpy as onp

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.config import GPTConfig, TrainConfig
    from tinyllm.labelled_data import UNK_TOKEN
    from tinyllm.models import init_gpt
    from tinyllm.optim import adamw_init
    from tinyllm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abc ", special_tokens=(UNK_TOKEN,))
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = init_gpt(config, onp.random.default_rng(0))
    save_checkpoint(str(tmp_path / "run"), params, adamw_init(params), {}, config, TrainConfig(),
                    tok, 0)
    result = invoke("attention", "--checkpoint", tmp_path / "run", "--prompt", "ab\u00e9\u00e9",
                    "--out", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert "2 heads of 4 x 4 tokens" in result.stdout
    assert result.stderr == "note: 2 character(s) the model never saw were read as <|unk|>\n"


def test_attention_errors(runs, tmp_path):
    out = tmp_path / "a.png"
    base = ["attention", "--checkpoint", runs / "pretrain", "--out", out]
    assert_user_error(invoke(*base, "--prompt", "the cat sat on the mat"),
                      "--prompt has 22 tokens", "context of 16")
    assert_user_error(invoke(*base, "--prompt", "cat", "--layer", 2), "--layer 2", "0 to 1")
    assert_user_error(invoke(*base, "--prompt", "cat", "--head", 5), "--head 5", "0 to 1")
    assert_user_error(invoke(*base, "--prompt", "cat", "--part", "cross"), "seq2seq")
    assert_user_error(invoke("attention", "--checkpoint", runs / "seq2seq", "--prompt", "cat",
                             "--target", "c" * 16, "--out", out), "--target has 16 tokens")
    assert not out.exists()


def test_fewshot_plot(runs, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"input": w, "output": w[0]}) + "\n"
                            for w in ["cat", "dog", "mat", "log", "sat"]), encoding="utf-8")
    out = tmp_path / "fewshot.png"
    result = invoke("fewshot", "--checkpoint", runs / "pretrain", "--task", task, "--shots", "0,1,2",
                    "--icl-windows", 0, "--plot", out)
    assert result.exit_code == 0, result.output
    assert f"written to {out}" in result.output
    assert png_size(out) == pixels((5.0, 3.6))


@pytest.mark.parametrize("name", ["loss.pdf", "loss.JPG"])
def test_a_picture_is_never_written_under_another_format_s_suffix(runs, tmp_path, name):
    # before, loss.pdf was silently written as PNG bytes (the suffix was not png or svg)
    out = tmp_path / name
    for args in (["plot", runs / "pretrain"], ["plot", runs / "pretrain", "--format", "png"],
                 ["attention", "--checkpoint", runs / "pretrain", "--prompt", "cat"]):
        assert_user_error(invoke(*args, "--out", out), name, "PNG or SVG")
    task = tmp_path / "task.jsonl"
    task.write_text('{"input": "cat", "output": "c"}\n{"input": "dog", "output": "d"}\n')
    result = invoke("fewshot", "--checkpoint", runs / "pretrain", "--task", task, "--shots", "0",
                    "--icl-windows", 0, "--plot", out)
    assert_user_error(result, name, "PNG or SVG")
    assert "accuracy" not in result.output  # refused before the run, not after it
    assert not out.exists()


@pytest.mark.parametrize("name", ["config.json", "notes.txt"])
def test_a_picture_never_overwrites_a_file_of_another_kind(runs, tmp_path, name):
    # before, any suffix but a picture format's was written as PNG: `--out runs/x/config.json`
    # replaced the run's settings with an image
    out = tmp_path / name
    out.write_text("keep me", encoding="utf-8")
    for args in (["plot", runs / "pretrain"],
                 ["attention", "--checkpoint", runs / "pretrain", "--prompt", "cat"]):
        assert_user_error(invoke(*args, "--out", out), name, "PNG or SVG", ".png or .svg")
    assert out.read_text(encoding="utf-8") == "keep me"


def test_a_name_without_suffix_replaces_a_picture_only(runs, tmp_path):
    # before, `--out README` or `--out ~/.bashrc` (no suffix, so PNG) replaced the file
    keep = tmp_path / "README"
    keep.write_text("keep me", encoding="utf-8")
    assert_user_error(invoke("plot", runs / "pretrain", "--out", keep), "README",
                      "holds no PNG or SVG picture")
    assert keep.read_text(encoding="utf-8") == "keep me"
    picture = tmp_path / "loss"
    for fmt in ("png", "svg", "png"):  # a new name, then each kind of picture replaced
        result = invoke("plot", runs / "pretrain", "--out", picture, "--format", fmt)
        assert result.exit_code == 0, result.output


def test_fewshot_chart_from_rows(tmp_path):
    rows = [{"k": 0, "accuracy": 0.1, "ci95": [0.05, 0.2], "n": 50, "chance": 0.25},
            {"k": 4, "accuracy": 0.9, "ci95": [0.8, 0.95], "n": 50, "chance": 0.25}]
    out = plot.draw_fewshot(rows, str(tmp_path / "f.svg"), "svg")
    svg = (tmp_path / "f.svg").read_text(encoding="utf-8")
    assert out.endswith("f.svg") and "chance" in svg and "50 queries per k" in svg


def test_same_picture_same_bytes(tmp_path):
    """No date or version stamp: the committed pictures change only when the data does."""
    rows = [{"k": 0, "accuracy": 0.1, "ci95": [0.05, 0.2], "n": 50, "chance": 0.25}]
    for fmt in ("png", "svg"):
        a, b = (plot.draw_fewshot(rows, str(tmp_path / f"{name}.{fmt}"), fmt) for name in "ab")
        assert open(a, "rb").read() == open(b, "rb").read()


def test_the_example_finds_and_draws_the_induction_head(tmp_path, capsys):
    """examples/in_context_learning.py's last step, on a random model: scores printed, the best
    head drawn, and the head it names is the one with the highest mean score."""
    import importlib.util

    import numpy as onp

    from tinyllm.attention_maps import gpt_attention, induction_scores, kshot_prompt
    from tinyllm.config import GPTConfig
    from tinyllm.fewshot import parse_task
    from tinyllm.models import init_gpt
    from tinyllm.tokenizers import CharTokenizer

    path = Path(__file__).resolve().parent.parent / "examples" / "in_context_learning.py"
    spec = importlib.util.spec_from_file_location("icl_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tok = CharTokenizer.train("abcd1234\nmap it")
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16)
    params = init_gpt(config, onp.random.default_rng(3))
    records = [json.dumps({"input": c, "output": str(i % 4 + 1)}) for i, c in enumerate("abcdabcdab")]
    tasks = [parse_task([json.dumps({"instruction": "map it"})] + records[i:] + records[:i])
             for i in range(2)]
    out = tmp_path / "induction.png"
    example.induction_head({"params": params, "model_config": config, "tokenizer": tok}, tasks,
                           str(out))
    printed = capsys.readouterr().out
    scores = onp.mean([induction_scores(gpt_attention(params, config, ids), ids, queries)
                       for ids, queries in (kshot_prompt(tok, t.instruction, t.records[:8],
                                                         t.records[8]["input"]) for t in tasks)],
                      axis=0)
    layer, head = onp.unravel_index(onp.argmax(scores), scores.shape)
    assert f"best: layer {layer}, head {head}, score {scores[layer, head]:.3f}" in printed
    assert f"written to {out}" in printed and png_size(out)[0] > 300
