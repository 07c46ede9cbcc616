"""Tests for tinyllm/train.py and the runs of tinyllm/pretrain.py: metrics, learning, resume (after
a finished run and after Ctrl-C), run-directory safety and data checks. Every run is a 1-layer,
16-channel model on a small file."""

import json
import os
from dataclasses import replace
from types import SimpleNamespace

import autograd.numpy as anp
import numpy as onp
import pytest

from tinyllm import train
from tinyllm.checkpoint import load_checkpoint
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.optim import adamw_init, lr_at
from tinyllm.pretrain import pretrain
from tinyllm.train import (
    Committed,
    TrainingClock,
    TrainingInterrupted,
    earlier_train_seconds,
    read_metrics,
    train_loop,
    truncate_metrics,
)
from tinyllm.tree import flatten

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12  # about 1900 characters: 190 validation tokens, plenty for block_size 16

MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1, bias=False)
TRAIN = TrainConfig(batch_size=4, max_iters=8, eval_interval=3, eval_iters=2, lr=1e-2,
                    min_lr=1e-3, warmup_iters=2, seed=5)
METRIC_KEYS = {"iter", "train_loss", "val_loss", "lr", "ms_per_iter", "tokens_per_s"}


def quiet(_message):
    """A log function that drops the messages."""


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def run(out, data, tc=TRAIN, **kwargs):
    kwargs.setdefault("tokenizer_kind", "char")  # these tests count characters
    return pretrain(MODEL, tc, str(out), data=data, log=quiet, **kwargs)


def curve(out):
    """The loss curve of a run: (iter, train_loss, val_loss, lr) per evaluation."""
    return [(r["iter"], r["train_loss"], r["val_loss"], r["lr"]) for r in read_metrics(str(out))]


def snapshot(directory):
    """Name -> bytes of every file in a directory."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = onp.asarray(fa[key]), onp.asarray(fb[key])
        assert x.dtype == y.dtype, key
        onp.testing.assert_array_equal(x, y, err_msg=key)


# ----------------------------------------------------------------------------- a whole run


def test_run_directory_and_metrics(tmp_path, data):
    tc = replace(TRAIN, max_iters=10, eval_interval=4)
    result = run(tmp_path / "run", data, tc)
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model-000010.npz",
                                       "optim-000010.npz", "tokenizer.json"]
    records = read_metrics(str(out))
    assert [r["iter"] for r in records] == [0, 4, 8, 10]  # every eval_interval, and at the end
    assert all(set(r) == METRIC_KEYS for r in records)
    for r in records:
        assert r["lr"] == lr_at(r["iter"], tc.lr, tc.min_lr, tc.warmup_iters, 10)  # rate at that step
        assert 0 < r["train_loss"] < 10 and 0 < r["val_loss"] < 10
    assert records[0]["ms_per_iter"] == 0 and records[0]["tokens_per_s"] == 0  # no steps yet
    assert all(r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 for r in records[1:])
    assert result["final"] == records[-1]
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert meta["iter"] == 10 and meta["last_eval_iter"] == 10 and meta["data"] == data
    assert meta["model"]["vocab_size"] == result["tokenizer"].vocab_size
    assert_trees_equal(load_checkpoint(str(out)).params, result["params"])


def test_loss_goes_down_on_easy_text(tmp_path):
    path = tmp_path / "easy.txt"
    path.write_text("abcd" * 300, encoding="utf-8")
    tc = TrainConfig(batch_size=4, max_iters=60, eval_interval=30, eval_iters=2, lr=1e-2,
                     min_lr=1e-3, warmup_iters=5)
    pretrain(replace(MODEL, dropout=0.0), tc, str(tmp_path / "run"), data=str(path), log=quiet,
             tokenizer_kind="char")
    first, *_, last = read_metrics(str(tmp_path / "run"))
    vocab = 4 + 1  # a, b, c, d and <|endoftext|>
    assert first["val_loss"] == pytest.approx(onp.log(vocab), abs=0.1)  # a fresh model guesses
    assert last["val_loss"] < 0.25 * first["val_loss"]
    assert last["train_loss"] < 0.25 * first["train_loss"]


def test_same_seed_same_run(tmp_path, data):
    a, b = run(tmp_path / "a", data), run(tmp_path / "b", data)
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert_trees_equal(a["params"], b["params"])
    run(tmp_path / "c", data, replace(TRAIN, seed=6))
    assert curve(tmp_path / "c") != curve(tmp_path / "a")


# ----------------------------------------------------------------------------- resume


def test_extending_a_finished_run_matches_one_long_run(tmp_path, data):
    """Run to 6 steps, then resume to 12: the same curve and bits as running to 12 at once.

    The cosine schedule decays over max_iters, so extending a run changes the learning rate of
    the remaining steps; a constant rate (min_lr = lr, no warm-up) makes the two runs comparable.
    """
    tc = replace(TRAIN, min_lr=TRAIN.lr, warmup_iters=0, eval_interval=3)
    whole = run(tmp_path / "whole", data, replace(tc, max_iters=12))
    run(tmp_path / "parts", data, replace(tc, max_iters=6))
    assert [r[0] for r in curve(tmp_path / "parts")] == [0, 3, 6]
    resumed = run(tmp_path / "parts", None, resume=True, max_iters=12)
    assert curve(tmp_path / "parts") == curve(tmp_path / "whole")
    assert [r[0] for r in curve(tmp_path / "parts")] == [0, 3, 6, 9, 12]
    assert_trees_equal(resumed["params"], whole["params"])
    a = load_checkpoint(str(tmp_path / "parts"), with_optimizer=True)
    b = load_checkpoint(str(tmp_path / "whole"), with_optimizer=True)
    assert_trees_equal(a.opt_state, b.opt_state)
    assert a.rng_state == b.rng_state and a.train_config == b.train_config


def interrupt_on_call(monkeypatch, k):
    """Make the k-th AdamW step raise KeyboardInterrupt, as Ctrl-C would, mid-step."""
    real = train.adamw_step
    calls = []

    def adamw_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "adamw_step", adamw_step)


def record_params(monkeypatch):
    """Record the params after each AdamW step: steps[i] is the model after i + 1 steps."""
    real, steps = train.adamw_step, []

    def adamw_step(*args, **kwargs):
        params, state = real(*args, **kwargs)
        steps.append(params)
        return params, state

    monkeypatch.setattr(train, "adamw_step", adamw_step)
    return steps


@pytest.mark.parametrize("k", [5, 4, 8])  # mid-interval; the step right after an eval; the last
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path, data, monkeypatch, k):
    steps = record_params(monkeypatch)
    whole = run(tmp_path / "whole", data)
    monkeypatch.undo()
    assert len(steps) == TRAIN.max_iters

    interrupt_on_call(monkeypatch, k)
    with pytest.raises(TrainingInterrupted) as stop:
        run(tmp_path / "parts", data)
    monkeypatch.undo()
    finished = k - 1  # the k-th step was cut short
    assert stop.value.iteration == finished and stop.value.out_dir == str(tmp_path / "parts")
    ckpt = load_checkpoint(str(tmp_path / "parts"), with_optimizer=True)
    assert ckpt.iter == finished and ckpt.opt_state["step"] == finished
    assert_trees_equal(ckpt.params, steps[finished - 1])  # the last finished step, whole
    assert not [n for n in os.listdir(tmp_path / "parts") if n.startswith(".tmp-")]
    evals_so_far = [it for it in (0, 3, 6) if it <= finished]
    assert [r[0] for r in curve(tmp_path / "parts")] == evals_so_far

    resumed = run(tmp_path / "parts", None, resume=True)
    assert curve(tmp_path / "parts") == curve(tmp_path / "whole")
    assert_trees_equal(resumed["params"], whole["params"])
    a = load_checkpoint(str(tmp_path / "parts"), with_optimizer=True)
    b = load_checkpoint(str(tmp_path / "whole"), with_optimizer=True)
    assert_trees_equal(a.opt_state, b.opt_state)
    assert a.rng_state == b.rng_state


def test_the_training_clock_adds_this_part_to_the_earlier_ones(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = TrainingClock(30.0)
    now[0] += 12.34
    assert (clock.part(), clock.total()) == (12.3, 42.3)
    clock.stop()
    now[0] += 5.0  # after stop() the clock does not run on
    assert (clock.part(), clock.total()) == (12.3, 42.3)
    assert TrainingClock(None).total() is None  # earlier parts of unknown length


@pytest.mark.parametrize("stored, want", [
    (30, 30.0), (2.5, 2.5), (0, 0.0),
    (None, None),  # a checkpoint from before tinyllm kept the time
    (-1, None), ("30", None), (True, None), (float("inf"), None), (float("nan"), None),
    (10**400, None),  # json reads a 400-digit number as an int that no float can hold
])
def test_the_earlier_training_time_counts_only_a_time(stored, want):
    """config.json is untrusted: only a finite number >= 0 is a time."""
    meta = {"iter": 3} if stored is None else {"iter": 3, "train_seconds": stored}
    assert earlier_train_seconds(meta) == want


def test_a_resumed_run_keeps_its_training_time_over_every_part(tmp_path, data, monkeypatch):
    monkeypatch.setattr(TrainingClock, "part", lambda clock: 7.0)  # each part takes 7 s
    out = tmp_path / "run"
    config = out / "config.json"
    first = run(out, data, replace(TRAIN, max_iters=3))
    assert (first["seconds"], first["train_seconds"]) == (7.0, 7.0)
    assert json.loads(config.read_text())["train_seconds"] == 7.0
    second = run(out, None, resume=True, max_iters=6)
    assert (second["seconds"], second["train_seconds"]) == (7.0, 14.0)
    assert json.loads(config.read_text())["train_seconds"] == 14.0
    meta = json.loads(config.read_text())
    del meta["train_seconds"]  # as a run saved before tinyllm kept the time
    config.write_text(json.dumps(meta), encoding="utf-8")
    third = run(out, None, resume=True, max_iters=9)
    assert third["train_seconds"] is None and third["final"]["iter"] == 9
    assert json.loads(config.read_text())["train_seconds"] is None  # and it stays unknown


def test_resume_drops_metrics_past_the_checkpoint(tmp_path, data):
    """Records newer than the checkpoint (a run that went on without saving) are not kept twice."""
    out = tmp_path / "run"
    run(out, data, replace(TRAIN, max_iters=3))
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"iter": 5, "train_loss": 9.0, "val_loss": 9.0}) + "\n")
    run(out, None, resume=True, max_iters=6)
    records = read_metrics(str(out))
    assert [r["iter"] for r in records] == [0, 3, 6]
    assert all(r["val_loss"] != 9.0 for r in records)


@pytest.mark.parametrize("lost", ["", '{"iter": 3}\n'])
def test_resuming_a_finished_run_whose_last_metrics_line_is_lost_logs_it_again(tmp_path, data,
                                                                             lost):
    # a deleted or hand-cut metrics.jsonl made `pretrain --resume` at the run's end fail with an
    # IndexError (or a KeyError) instead of evaluating the checkpoint's step again
    out = tmp_path / "run"
    first = run(out, data, replace(TRAIN, max_iters=3))["final"]
    (out / "metrics.jsonl").write_text(lost, encoding="utf-8")
    again = run(out, None, resume=True)["final"]
    assert again == {**first, "ms_per_iter": 0.0, "tokens_per_s": 0.0}  # the same evaluation
    assert read_metrics(str(out))[-1] == again


def test_resume_with_changed_data_is_refused(tmp_path, data):
    run(tmp_path / "run", data)
    before = snapshot(tmp_path / "run")
    with open(data, "a", encoding="utf-8") as f:
        f.write("one more line\n")
    with pytest.raises(TinyLLMError, match="changed"):
        run(tmp_path / "run", None, resume=True, max_iters=12)
    assert snapshot(tmp_path / "run") == before


def test_resume_without_a_run_is_refused(tmp_path, data):
    with pytest.raises(TinyLLMError, match="no checkpoint"):
        run(tmp_path / "empty", data, resume=True)


# ----------------------------------------------------------------------------- run directory


def test_existing_run_needs_resume_or_force(tmp_path, data):
    run(tmp_path / "run", data)
    before = snapshot(tmp_path / "run")
    with pytest.raises(TinyLLMError) as err:
        run(tmp_path / "run", data, replace(TRAIN, seed=9))
    assert "already holds a run" in str(err.value) and "--force" in str(err.value)
    assert snapshot(tmp_path / "run") == before


def test_force_starts_the_run_afresh(tmp_path, data):
    run(tmp_path / "run", data)
    old = snapshot(tmp_path / "run")
    run(tmp_path / "run", data, replace(TRAIN, seed=9, max_iters=6), force=True)
    new = snapshot(tmp_path / "run")
    assert "model-000006.npz" in new and "model-000008.npz" in old and "model-000008.npz" not in new
    assert [r[0] for r in curve(tmp_path / "run")] == [0, 3, 6]  # the old records are gone
    assert load_checkpoint(str(tmp_path / "run")).train_config.seed == 9


@pytest.mark.parametrize("bad", ["missing", "short", "binary"])
def test_force_with_bad_data_keeps_the_old_run(tmp_path, data, bad):
    """--force replaces a run only once the new one can start: a typo must not cost the old one."""
    run(tmp_path / "run", data)
    before = snapshot(tmp_path / "run")
    path = tmp_path / f"{bad}.txt"
    if bad == "short":
        path.write_text("too short", encoding="utf-8")
    elif bad == "binary":
        path.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(TinyLLMError):
        run(tmp_path / "run", str(path), force=True)
    assert snapshot(tmp_path / "run") == before


def test_corpus_shorter_than_a_block_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 16, encoding="utf-8")  # 16 tokens, block_size 16 needs 17
    with pytest.raises(TinyLLMError) as err:
        run(tmp_path / "run", str(path))
    message = str(err.value)
    assert "short.txt" in message and "block_size + 1 = 17" in message and "\n" not in message


def test_validation_split_shorter_than_a_block_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc" * 30, encoding="utf-8")  # 90 tokens: train 81, val 9
    with pytest.raises(TinyLLMError, match="val split"):
        run(tmp_path / "run", str(path))


# ----------------------------------------------------------------------------- the generic loop


def quadratic_loop(tmp_path, loss_fn, max_iters=40, eval_iters=1, grad_accum=1):
    """train_loop on a one-parameter problem: the loop is generic, not tied to GPTs."""
    params = {"w": onp.array([[3.0]], dtype="float32")}
    state = Committed(params, adamw_init(params), onp.random.default_rng(0).bit_generator.state,
                      0, -1)
    tc = TrainConfig(max_iters=max_iters, eval_interval=10, eval_iters=eval_iters, lr=0.1, min_lr=0.1,
                     warmup_iters=0, weight_decay=0.0, grad_clip=0.0, grad_accum=grad_accum)
    saved = []
    final = train_loop(state, tc, loss_fn, lambda split, rng: (onp.zeros(1),), saved.append, str(tmp_path), 1,
                       log=quiet)
    return final, saved


def test_train_loop_minimises_any_loss_and_saves_at_each_eval(tmp_path):
    final, saved = quadratic_loop(tmp_path, lambda p, batch, rng: anp.sum((p["w"] - 1.0) ** 2))
    assert final.iteration == 40 and final.opt_state["step"] == 40
    assert abs(float(final.params["w"][0, 0]) - 1.0) < 0.3  # from 3 towards the minimum at 1
    assert [s.iteration for s in saved] == [0, 10, 20, 30, 40]
    assert [r["iter"] for r in read_metrics(str(tmp_path))] == [0, 10, 20, 30, 40]


# (setting, a count of batches past the usual, what the count's line starts with in the first
# and the last evaluation or step): a run's settings may ask for thousands of either
LONG_PARTS = [("eval_iters", 60, "evaluation at iteration 0, batches: ",
               "evaluation at iteration 10, batches: "),
              ("grad_accum", 60, "iteration 1, micro-batches: ", "iteration 10, micro-batches: ")]


@pytest.mark.parametrize("setting, n, first, last", LONG_PARTS)
def test_a_long_evaluation_or_step_shows_its_progress_and_a_short_one_does_not(
        tmp_path, capsys, monkeypatch, setting, n, first, last):
    quadratic = lambda p, batch, rng: anp.sum((p["w"] - 1.0) ** 2)  # noqa: E731
    monkeypatch.setattr(train, "QUIET_SECONDS", 0.0)  # every part counts as long
    quadratic_loop(tmp_path, quadratic, max_iters=10, **{setting: n})
    long = capsys.readouterr().err
    total = 2 * n if setting == "eval_iters" else n  # both splits are evaluated
    assert f"{first}{total}/{total}" in long and last in long
    monkeypatch.setattr(train, "QUIET_SECONDS", 3600.0)  # none is
    (tmp_path / "short").mkdir()
    quadratic_loop(tmp_path / "short", quadratic, max_iters=10, **{setting: n})
    assert first not in capsys.readouterr().err


def test_a_loss_that_becomes_nan_stops_with_a_user_error(tmp_path):
    with pytest.raises(TinyLLMError, match="lower --lr"), onp.errstate(invalid="ignore"):
        quadratic_loop(tmp_path, lambda p, batch, rng: anp.sum(anp.log(p["w"] - 2.5)))


def test_truncate_and_read_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iter": i}) + "\n" for i in (0, 3, 6)) + '{"iter": 9, "tr',
                    encoding="utf-8")
    assert [r["iter"] for r in read_metrics(str(tmp_path))] == [0, 3, 6]  # torn line skipped
    notes = []
    truncate_metrics(str(tmp_path), 4, notes.append)
    assert path.read_text(encoding="utf-8") == '{"iter": 0}\n{"iter": 3}\n'
    assert notes == ["note: 1 line(s) of metrics.jsonl were no record of an evaluation (a line"
                     " torn by a crash, or edited by hand) and were dropped"]
    assert read_metrics(str(tmp_path / "nowhere")) == []


def test_flat_value_and_grad_equals_autograd_on_the_tree():
    """The training loop differentiates through a flat dict for speed; same loss, same gradients."""
    import autograd

    from tinyllm.models import gpt_loss, init_gpt
    from tinyllm.train import flat_value_and_grad
    from tinyllm.tree import flatten

    config = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=True)
    params = init_gpt(config, onp.random.default_rng(0), dtype="float64")
    rng = onp.random.default_rng(1)
    x, y = rng.integers(0, 7, (3, 6)), rng.integers(0, 7, (3, 6))

    def loss_fn(p, batch, rng):
        return gpt_loss(p, batch[0], batch[1], config, rng)

    loss_a, grads_a = flat_value_and_grad(loss_fn)(params, (x, y), None)
    loss_b, grads_b = autograd.value_and_grad(loss_fn)(params, (x, y), None)
    assert loss_a == loss_b
    flat_a, flat_b = flatten(grads_a), flatten(grads_b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        onp.testing.assert_allclose(flat_a[key], flat_b[key], rtol=1e-12, atol=1e-15)
