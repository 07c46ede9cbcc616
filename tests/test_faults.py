"""Fault tests: a run killed at each step of the checkpoint protocol, a full disk at each file,
a second Ctrl-C during the save, SIGTERM, a second writer, divergence. Each one checks that the
run directory still loads and that resuming gives exactly the uninterrupted run.

Faults land exactly where they are meant to through the TINYLLM_FAULT hook of tinyllm/fileio.py
(no timing luck): "kill@renamed:model-*#2" kills the process right after the second save's model
file is renamed into place.
"""

import fcntl
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as onp
import pytest
from click.testing import CliRunner

from tinyllm import fast, fileio, train
from tinyllm.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.pretrain import pretrain
from tinyllm.train import TrainingInterrupted, read_metrics
from tinyllm.tree import flatten, tree_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.\n") * 25
MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False)
TRAIN = TrainConfig(batch_size=4, max_iters=6, eval_interval=2, eval_iters=1, lr=1e-2,
                    min_lr=1e-3, warmup_iters=1, seed=11)
CLI_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--no-bias", "--batch-size", "4", "--max-iters", "6", "--eval-interval", "2",
            "--eval-iters", "1", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-iters", "1",
            "--seed", "11", "--sample-tokens", "0"]


def quiet(_message):
    """A log function that drops the messages."""


@pytest.fixture(autouse=True)
def fresh_fault_counts(monkeypatch):
    monkeypatch.setattr(fileio, "_fault_hits", {})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    """The uninterrupted run: (final weights, loss curve)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    result = pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    return flatten(result["params"]), curve(out)


def curve(out):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_metrics(str(out))]


def resume_to_the_end(out):
    return flatten(pretrain(MODEL, TRAIN, str(out), resume=True, log=quiet)["params"])


def assert_same_run(out, final, whole):
    weights, losses = whole
    assert final.keys() == weights.keys()
    for name in weights:
        onp.testing.assert_array_equal(final[name], weights[name], err_msg=name)
    assert curve(out) == losses


def run_cli(out, data, fault=None, extra=()):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env.pop("TINYLLM_FAULT", None)
    if fault:
        env["TINYLLM_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "pretrain", "--data", data,
                           "--out", str(out), *CLI_ARGS, *extra],
                          capture_output=True, text=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- kill -9


# Steps of the second save (iteration 2): mid-write of a temp file, after the model file's rename
# (where version 1 lost the run), after the optimizer file's, with config.json written but not
# yet renamed, and right after the switch (before the old files are removed). A subprocess each:
# a real SIGKILL, no cleanup code runs.
KILL_POINTS = ["writing:model-*", "renamed:model-*", "renamed:optim-*", "written:config.json",
               "renamed:config.json"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_each_step_of_a_save_leaves_a_run_that_resumes_exactly(tmp_path, data, whole,
                                                                      point):
    out = tmp_path / "run"
    result = run_cli(out, data, fault=f"kill@{point}#2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    switched = point == "renamed:config.json"
    ckpt = load_checkpoint(str(out), with_optimizer=True)
    assert ckpt.iter == (2 if switched else 0)  # the new checkpoint, or the previous one whole
    resumed = resume_to_the_end(out)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "metrics.jsonl"] + [os.path.basename(p) for p in
                                            checkpoint_paths(str(out)).values()])
    assert_same_run(out, resumed, whole)


def test_kill_during_the_first_save_leaves_nothing_that_blocks_a_fresh_start(tmp_path, data):
    out = tmp_path / "run"
    assert run_cli(out, data, fault="kill@renamed:optim-*#1").returncode == -signal.SIGKILL
    assert "config.json" not in os.listdir(out)  # no checkpoint was committed
    assert any(n.startswith("model-") for n in os.listdir(out))
    pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)  # no --force needed; leftovers go
    assert load_checkpoint(str(out)).iter == 6
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model-000006.npz",
                                       "optim-000006.npz", "tokenizer.json"]


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("file", ["model-*", "optim-*", "config.json"])
def test_full_disk_at_each_file_keeps_the_previous_checkpoint(tmp_path, data, whole, monkeypatch,
                                                              file):
    out = tmp_path / "run"
    monkeypatch.setenv("TINYLLM_FAULT", f"enospc@writing:{file}#2")
    with pytest.raises(TinyLLMError) as err:
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    monkeypatch.delenv("TINYLLM_FAULT")
    message = str(err.value)
    assert "No space left on device" in message and "previous checkpoint is intact" in message
    assert "\n" not in message
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model-000000.npz",
                                       "optim-000000.npz", "tokenizer.json"]
    assert load_checkpoint(str(out), with_optimizer=True).iter == 0
    assert_same_run(out, resume_to_the_end(out), whole)


@pytest.mark.parametrize("file", ["model-*", "optim-*", "tokenizer.json", "config.json"])
def test_full_disk_at_the_first_save_says_nothing_was_saved_and_a_rerun_starts_clean(
        tmp_path, data, whole, monkeypatch, file):
    out = tmp_path / "run"
    monkeypatch.setenv("TINYLLM_FAULT", f"enospc@writing:{file}#1")
    with pytest.raises(TinyLLMError) as err:
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    monkeypatch.delenv("TINYLLM_FAULT")
    message = str(err.value)
    assert "iteration 0" in message and "nothing was saved" in message
    assert "previous checkpoint" not in message  # there is none
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]  # the evaluation logged before the save
    final = flatten(pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)["params"])
    assert_same_run(out, final, whole)  # one line of iteration 0, not two


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_full_disk_from_the_cli_is_one_line(tmp_path, data, monkeypatch):
    monkeypatch.setenv("TINYLLM_FAULT", "enospc@writing:optim-*#3")
    result = invoke("pretrain", "--data", data, "--out", tmp_path / "run", *CLI_ARGS)
    assert result.exit_code == 1 and not isinstance(result.exception, OSError)
    assert result.output.strip().splitlines()[-1].startswith("Error: could not save")


# ----------------------------------------------------------------------------- signals


def wrap_adamw(monkeypatch, make):
    """Replace AdamW by make(real AdamW) on both paths: `train.adamw_step` (the reference path)
    and `fast.adamw_flat` (the fast path, which `pretrain` takes at dropout 0)."""
    monkeypatch.setattr(train, "adamw_step", make(train.adamw_step))
    monkeypatch.setattr(fast, "adamw_flat", make(fast.adamw_flat))


def interrupt_at_step(monkeypatch, k, signum=signal.SIGINT):
    """Deliver `signum` to this process during the k-th optimizer step."""
    calls = []

    def make(real_step):
        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), signum)
            return real_step(*args, **kwargs)
        return step

    wrap_adamw(monkeypatch, make)


@pytest.mark.parametrize("point", ["writing:model-*", "written:optim-*", "written:config.json"])
def test_a_second_ctrl_c_during_the_save_waits_for_it(tmp_path, data, whole, monkeypatch, point):
    out = tmp_path / "run"
    interrupt_at_step(monkeypatch, 4)  # the first Ctrl-C: during step 4, so the save is of 3
    monkeypatch.setenv("TINYLLM_FAULT", f"sigint@{point}#3")  # the second: inside that save
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    monkeypatch.undo()
    monkeypatch.setattr(fileio, "_fault_hits", {})
    assert stop.value.iteration == 3
    assert load_checkpoint(str(out), with_optimizer=True).iter == 3
    assert_same_run(out, resume_to_the_end(out), whole)


def test_ctrl_c_during_an_evaluation_save_stops_once_it_is_on_disk(tmp_path, data, whole,
                                                                   monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TINYLLM_FAULT", "sigint@written:model-*#2")  # inside the save of step 2
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    monkeypatch.delenv("TINYLLM_FAULT")
    assert stop.value.iteration == 2
    assert [r[0] for r in curve(out)] == [0, 2]  # its metrics line is there, once
    assert_same_run(out, resume_to_the_end(out), whole)


def test_sigterm_saves_like_ctrl_c(tmp_path, data, whole, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_step(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    monkeypatch.undo()
    assert stop.value.iteration == 4 and stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert_same_run(out, resume_to_the_end(out), whole)


def test_sigterm_from_the_cli_exits_143_with_a_checkpoint(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TINYLLM_FAULT", "sigterm@renamed:config.json#2")
    result = invoke("pretrain", "--data", data, "--out", out, *CLI_ARGS)
    assert result.exit_code == 143, result.output
    assert "--resume" in result.output
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # one more cannot cut the exit short
    assert load_checkpoint(str(out)).iter == 2


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_at_once(tmp_path, data):
    out = tmp_path / "run"
    pretrain(MODEL, replace(TRAIN, max_iters=2), str(out), data=data, log=quiet)
    other = os.open(out, os.O_RDONLY)  # another process's lock: its own open file description
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TinyLLMError, match="another tinyllm run is writing"):
            pretrain(MODEL, TRAIN, str(out), resume=True, log=quiet)
        result = invoke("pretrain", "--out", out, "--resume")
        assert result.exit_code == 1 and "another tinyllm run is writing" in result.output
    finally:
        os.close(other)
    assert load_checkpoint(str(out)).iter == 2
    pretrain(MODEL, TRAIN, str(out), resume=True, log=quiet)  # the lock went with its holder


def test_the_lock_is_held_for_the_whole_run(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    held = []

    def make(real_step):
        def step(*args, **kwargs):
            probe = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
            finally:
                os.close(probe)
            return real_step(*args, **kwargs)
        return step

    wrap_adamw(monkeypatch, make)
    pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    assert held == [True] * TRAIN.max_iters


# ----------------------------------------------------------------------------- divergence


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    """A step whose update makes the weights infinite (the loss before it was finite)."""
    out = tmp_path / "run"
    calls = []

    def make(real_step):
        def blow_up(*args, **kwargs):
            calls.append(1)
            params, *state = real_step(*args, **kwargs)  # a tree, or the fast path's flat buffer
            if len(calls) == 3:
                params = tree_map(lambda p: p * onp.float32("inf"), params)
            return (params, *state)
        return blow_up

    wrap_adamw(monkeypatch, make)
    with pytest.raises(TinyLLMError) as err, onp.errstate(invalid="ignore", over="ignore"):
        pretrain(MODEL, TRAIN, str(out), data=data, log=quiet)
    assert "diverged at iteration 2" in str(err.value) and "last good checkpoint" in str(err.value)
    ckpt = load_checkpoint(str(out), with_optimizer=True)
    assert ckpt.iter == 2 and all(onp.isfinite(a).all() for a in flatten(ckpt.params).values())


def test_non_finite_weights_are_never_saved(tmp_path, data):
    out = tmp_path / "run"
    pretrain(MODEL, replace(TRAIN, max_iters=2), str(out), data=data, log=quiet)
    ckpt = load_checkpoint(str(out), with_optimizer=True)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    bad = tree_map(lambda p: p.copy(), ckpt.params)
    bad["wte"][0, 0] = onp.nan
    with pytest.raises(TinyLLMError, match="non-finite"):
        save_checkpoint(str(out), bad, ckpt.opt_state, ckpt.rng_state, ckpt.model_config,
                        ckpt.train_config, ckpt.tokenizer, 3)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_nan_loss_in_metrics_is_written_as_null(tmp_path):
    train.append_metrics(str(tmp_path), {"iter": 4, "train_loss": float("nan"),
                                         "val_loss": float("inf")})
    line = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert line == '{"iter": 4, "train_loss": null, "val_loss": null}\n'
