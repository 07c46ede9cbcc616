"""Tests of pretraining's short stage (Shortformer's staged training, tinyllm/pretrain.py): which
windows each step reads, what a run keeps of it in config.json, resuming across the switch, and
the flags and the untrusted config.json that set it."""

import json
import os
from dataclasses import replace

import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tinyllm import pretrain as pretrain_module
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main
from tinyllm.config import DEFAULT_SHORT_CONTEXT, DEFAULT_SHORT_SHARE, GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.pretrain import (next_token_loss_and_batches, pretrain, short_stage, staged_batches,
                              stored_short_stage)
from tinyllm.train import TrainingInterrupted, read_metrics
from tinyllm.tree import flatten

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12  # about 1900 characters, one token each

MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0, bias=False)
TRAIN = TrainConfig(batch_size=2, max_iters=8, eval_interval=3, eval_iters=2, lr=1e-2,
                    min_lr=1e-3, warmup_iters=2, seed=5)


def quiet(_message):
    """A log function that drops the messages."""


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def run(out, data, **kwargs):
    return pretrain(MODEL, TRAIN, str(out), data=data, tokenizer_kind="char", log=quiet,
                    **kwargs)


def same_weights(a, b):
    """True if two parameter trees hold the same arrays, bit for bit."""
    flat_a, flat_b = flatten(a), flatten(b)
    return flat_a.keys() == flat_b.keys() and all(
        onp.array_equal(flat_a[key], flat_b[key]) for key in flat_a)


def stage_of(run_dir):
    return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["short_context"]


# ----------------------------------------------------------------------------- the schedule


def test_no_stage_by_default_and_720_of_900_steps_with_64_token_windows():
    assert (DEFAULT_SHORT_CONTEXT, DEFAULT_SHORT_SHARE, TrainConfig().max_iters) == (0, 0.8, 750)
    assert short_stage(DEFAULT_SHORT_CONTEXT, DEFAULT_SHORT_SHARE, 256, 750) is None
    assert short_stage(64, 0.8, 256, 900) == {"tokens": 64, "steps": 720}
    assert short_stage(64, 0.8, 256, 7) == {"tokens": 64, "steps": 6}  # round(5.6)


def test_a_context_that_64_does_not_divide_trains_without_a_flag(tmp_path, data):
    """The in-context-learning example pretrains with a context of 96: no stage, no error."""
    pretrain(replace(MODEL, block_size=96), TRAIN, str(tmp_path / "run"), data=data,
             tokenizer_kind="char", log=quiet)
    assert stage_of(tmp_path / "run") is None


@pytest.mark.parametrize("tokens, share, block, steps", [
    (0, 0.8, 256, 1000),  # turned off
    (256, 0.8, 256, 1000),  # not shorter than the context: nothing to stage
    (512, 0.8, 256, 1000),
    (64, 0.0, 256, 1000),  # no step in the stage
    (64, 0.4, 256, 1),  # round(0.4) = 0 steps
])
def test_no_stage_where_every_step_would_read_whole_windows(tokens, share, block, steps):
    assert short_stage(tokens, share, block, steps) is None


@pytest.mark.parametrize("tokens, share, words", [
    (48, 0.8, ["--short-context (48)", "divide", "--block-size (256)"]),
    (64, 1.5, ["--short-share", "1.5"]),
    (64, -0.1, ["--short-share"]),
    (-64, 0.8, ["--short-context", "negative"]),
])
def test_a_stage_that_cannot_be_kept_is_refused_naming_the_flag(tokens, share, words):
    with pytest.raises(TinyLLMError) as err:
        short_stage(tokens, share, 256, 1000)
    for word in words:
        assert word in str(err.value)


@given(st.sampled_from([(8, 4), (16, 2), (16, 4), (16, 8), (32, 4)]),
       st.integers(1, 6), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_every_step_reads_the_same_tokens_and_short_steps_short_windows(sizes, batch, it, seed):
    """A step of the stage draws block / T_s times as many windows of T_s tokens; the others
    draw whole windows: batch x block tokens either way, each target the token after its input."""
    block, tokens = sizes
    ids = onp.arange(500, dtype=onp.int32)  # token i is i: a window's targets are its inputs + 1
    _, sample = next_token_loss_and_batches({"train": ids, "val": ids},
                                            replace(MODEL, block_size=block), batch)
    stage = {"tokens": tokens, "steps": 10}
    x, y = staged_batches(sample, batch, block, stage)(onp.random.default_rng(seed), it)
    assert x.shape == ((batch * block // tokens, tokens) if it < 10 else (batch, block))
    assert x.size == batch * block
    assert onp.array_equal(y, x + 1)
    assert onp.array_equal(x[:, 1:], x[:, :-1] + 1)  # each row one window of consecutive tokens


def test_without_a_stage_the_loop_draws_its_batches_as_it_always_did():
    assert staged_batches(lambda *a: None, 8, 256, None) is None  # train_loop's default then


# ----------------------------------------------------------------------------- wiring


def record_batch_shapes(monkeypatch):
    """The (windows, tokens) of every batch pretraining draws from now on, in order."""
    shapes = []
    real = pretrain_module.get_batch

    def get_batch(ids, batch_size, block_size, rng):
        shapes.append((batch_size, block_size))
        return real(ids, batch_size, block_size, rng)

    monkeypatch.setattr(pretrain_module, "get_batch", get_batch)
    return shapes


def test_a_run_reads_short_windows_for_its_stage_and_whole_ones_after_and_in_evaluations(
        tmp_path, data, monkeypatch):
    shapes = record_batch_shapes(monkeypatch)
    run(tmp_path / "run", data, short_context=4, short_share=0.5)  # 4 of 8 steps
    assert stage_of(tmp_path / "run") == {"tokens": 4, "steps": 4}
    short, whole = (8, 4), (2, 16)
    assert shapes.count(short) == 4
    # evaluations at steps 0, 3, 6 and 8 read 2 batches of each split, all whole
    assert shapes.count(whole) == 4 * 2 * 2 + 4
    first_whole_step = len(shapes) - 1 - shapes[::-1].index(short) + 1
    assert shapes[first_whole_step] == whole


def test_with_gradient_accumulation_each_micro_batch_of_the_stage_is_short(tmp_path, data,
                                                                         monkeypatch):
    shapes = record_batch_shapes(monkeypatch)
    pretrain(MODEL, replace(TRAIN, grad_accum=2), str(tmp_path / "run"), data=data,
             tokenizer_kind="char", log=quiet, short_context=4, short_share=0.5)
    assert shapes.count((8, 4)) == 4 * 2  # 4 steps of the stage, 2 micro-batches each


def test_a_resumed_run_keeps_its_stage_and_matches_one_run_across_the_switch(
        tmp_path, data, monkeypatch):
    whole = run(tmp_path / "whole", data, short_context=4, short_share=0.5)
    calls = []
    real_step = pretrain_module.fast_path.gpt_train_step

    def interrupting_step(config, objective="clm"):
        step = real_step(config, objective)

        def wrapped(*args):
            calls.append(1)
            if len(calls) == 3:  # mid-stage: steps 0 and 1 done
                raise KeyboardInterrupt
            return step(*args)

        return wrapped

    monkeypatch.setattr(pretrain_module.fast_path, "gpt_train_step", interrupting_step)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "parts", data, short_context=4, short_share=0.5)
    monkeypatch.undo()
    # resumed with other flags: the run keeps its own stage
    resumed = run(tmp_path / "parts", None, resume=True, short_context=8, short_share=0.25)
    assert stage_of(tmp_path / "parts") == {"tokens": 4, "steps": 4}
    assert [r["val_loss"] for r in read_metrics(str(tmp_path / "parts"))] == \
        [r["val_loss"] for r in read_metrics(str(tmp_path / "whole"))]
    assert same_weights(resumed["params"], whole["params"])


def test_the_stage_changes_the_run(tmp_path, data):
    staged = run(tmp_path / "staged", data, short_context=4, short_share=0.5)
    plain = run(tmp_path / "plain", data, short_context=0)
    assert stage_of(tmp_path / "plain") is None
    assert not same_weights(staged["params"], plain["params"])


def test_the_masked_token_objective_is_staged_as_asked(tmp_path, data):
    run(tmp_path / "mlm", data, objective="mlm")
    assert stage_of(tmp_path / "mlm") is None
    run(tmp_path / "mlm4", data, objective="mlm", short_context=4)
    assert stage_of(tmp_path / "mlm4") == {"tokens": 4, "steps": 6}  # round(0.8 * 8)


TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--batch-size", "2", "--eval-iters", "1", "--max-iters", "5", "--eval-interval", "5",
        "--sample-tokens", "0"]


def test_plain_pretrain_reads_whole_windows_and_the_flags_reach_the_run(tmp_path):
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT * 4, encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["pretrain", "--data", str(long_text), "--block-size", "128",
                                  "--out", str(tmp_path / "plain"), *TINY])
    assert result.exit_code == 0, result.output
    assert stage_of(tmp_path / "plain") is None and "stages:" not in result.output
    result = runner.invoke(main, ["pretrain", "--data", str(long_text), "--block-size", "128",
                                  "--short-context", "64", "--out", str(tmp_path / "a"), *TINY])
    assert result.exit_code == 0, result.output
    assert stage_of(tmp_path / "a") == {"tokens": 64, "steps": 4}  # round(0.8 * 5)
    assert "steps 0 to 3 read windows of 64 tokens (4 a step)" in result.output
    result = runner.invoke(main, ["pretrain", "--data", str(long_text), "--block-size", "128",
                                  "--short-context", "32", "--short-share", "0.4",
                                  "--out", str(tmp_path / "b"), *TINY])
    assert result.exit_code == 0, result.output
    assert stage_of(tmp_path / "b") == {"tokens": 32, "steps": 2}
    result = runner.invoke(main, ["pretrain", "--data", str(long_text), "--block-size", "128",
                                  "--objective", "mlm", "--short-context", "64",
                                  "--out", str(tmp_path / "c"), *TINY])
    assert result.exit_code == 0, result.output
    assert stage_of(tmp_path / "c") == {"tokens": 64, "steps": 4}


def test_a_bad_short_context_flag_is_one_line_naming_it(tmp_path, data):
    result = CliRunner().invoke(main, ["pretrain", "--data", data, "--block-size", "16",
                                       "--short-context", "5", "--out", str(tmp_path / "r"),
                                       *TINY])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--short-context (5) must divide --block-size (16)" in errors[0]
    assert not os.path.exists(tmp_path / "r")  # refused before the run directory was made


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("stored", [
    {"tokens": 4, "steps": 3}, None,
])
def test_a_stored_stage_is_read_back(stored):
    meta = {} if stored is None else {"short_context": stored}
    assert stored_short_stage(meta, "run", 16) == stored


@pytest.mark.parametrize("stored", [
    {"tokens": 5, "steps": 3},  # does not divide the context
    {"tokens": 16, "steps": 3},  # not shorter than it
    {"tokens": 0, "steps": 3},
    {"tokens": 4, "steps": 0},
    {"tokens": 4, "steps": -1},
    {"tokens": 4, "steps": 2**40},
    {"tokens": 4.0, "steps": 3},
    {"tokens": True, "steps": 3},
    {"tokens": 4},
    {"tokens": 4, "steps": 3, "extra": 1},
    [4, 3], "4", 4,
])
def test_a_hostile_stored_stage_is_one_line_naming_the_file(stored):
    with pytest.raises(TinyLLMError) as err:
        stored_short_stage({"short_context": stored}, "run", 16)
    assert "run/config.json" in str(err.value) and "short_context" in str(err.value)


def test_resuming_a_run_with_a_hostile_stage_is_refused(tmp_path, data):
    run(tmp_path / "run", data, short_context=4, short_share=0.5)
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["short_context"] = {"tokens": 3, "steps": 4}
    path.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(TinyLLMError, match="short_context"):
        run(tmp_path / "run", None, resume=True, max_iters=10)


def test_a_run_from_before_the_stages_resumes_on_whole_windows(tmp_path, data):
    run(tmp_path / "run", data, short_context=0)
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    del meta["short_context"]  # as config.json was written before the stages
    path.write_text(json.dumps(meta), encoding="utf-8")
    run(tmp_path / "run", None, resume=True, max_iters=10)
    assert load_checkpoint(str(tmp_path / "run")).iter == 10
    assert stage_of(tmp_path / "run") is None


class Captured(Exception):
    """Raised by a stand-in for the library's pretrain, to end the command once it is called."""


@pytest.mark.parametrize("flags, max_iters, short_context", [
    ([], 750, 0),
    (["--objective", "mlm"], 750, 0),
    (["--objective", "mlm", "--short-context", "64", "--max-iters", "5"], 5, 64),
    (["--max-iters", "7", "--short-context", "32", "--short-share", "0.5"], 7, 32),
])
def test_the_command_passes_its_steps_and_stage_down(flags, max_iters, short_context, tmp_path,
                                                     monkeypatch):
    seen = {}

    def fake_pretrain(model_config, tc, out, **kwargs):
        seen.update(tc=tc, **kwargs)
        raise Captured

    monkeypatch.setattr(pretrain_module, "pretrain", fake_pretrain)
    result = CliRunner().invoke(main, ["pretrain", "--out", str(tmp_path / "r"), *flags])
    assert isinstance(result.exception, Captured), result.output
    assert seen["tc"].max_iters == max_iters
    assert seen["short_context"] == short_context
    assert seen["short_share"] == (0.5 if "--short-share" in flags else DEFAULT_SHORT_SHARE)
