"""End-to-end tests of the Click commands (`pretrain`, `generate`) on a tiny model, and of the
`python cli.py` launcher. Bad input must give a non-zero exit, one line naming the problem, no
traceback, and leave an existing run's files byte for byte as they were."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tinyllm import fast, train
from tinyllm.checkpoint import checkpoint_paths
from tinyllm.cli import main

REPO = Path(__file__).resolve().parent.parent  # the checkout: cli.py sits at its top
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12
TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "1"]
def run_files(run_dir):
    """The files a run directory should hold: its checkpoint's files, config.json, metrics.jsonl."""
    paths = checkpoint_paths(str(run_dir))
    return sorted(["config.json", "metrics.jsonl"] + [os.path.basename(p) for p in paths.values()])


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(directory):
    """Name -> bytes of every file in a directory."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def metrics_iters(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["iter"] for line in lines]


def assert_user_error(result, *words):
    """Exit != 0 through a handled error (not a crash), one 'Error:' line that names `words`."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, no crash
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_file):
    """A run directory made by the documented `pretrain` command (6 steps); treat as read-only."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 6,
                    "--eval-interval", 3, "--sample-tokens", 5)
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, for tests that resume, force or damage it."""
    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    return out


# ----------------------------------------------------------------------------- happy paths


def test_pretrain_writes_the_run_directory(trained_run, data_file):
    out, result = trained_run
    assert sorted(os.listdir(out)) == run_files(out)
    assert os.path.basename(checkpoint_paths(str(out))["model"]) == "model-000006.npz"
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert meta["iter"] == 6
    assert meta["data_characters"] == len(TEXT) and meta["data"] == str(data_file)
    assert meta["data_sha256"] == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    assert meta["model"]["n_layer"] == 1 and meta["model"]["n_embd"] == 16
    assert meta["model"]["block_size"] == 16 and meta["train"]["eval_interval"] == 3
    assert metrics_iters(out) == [0, 3, 6]
    assert "done: iteration 6" in result.output and "--- sample" in result.output


def test_generate_continues_the_prompt(trained_run):
    out, _ = trained_run
    result = invoke("generate", "--checkpoint", out, "--prompt", "The quick", "--seed", 1,
                    "--max-new-tokens", 20)
    assert result.exit_code == 0, result.output
    text = result.stdout.rstrip("\n")
    assert text.startswith("The quick") and 9 < len(text) <= 9 + 20
    again = invoke("generate", "--checkpoint", out, "--prompt", "The quick", "--seed", 1,
                   "--max-new-tokens", 20)
    assert again.stdout == result.stdout  # same seed, same text


def test_generate_greedy_with_stop_text(trained_run):
    out, _ = trained_run
    full = invoke("generate", "--checkpoint", out, "--prompt", "jump", "--temperature", 0,
                  "--max-new-tokens", 12)
    assert full.exit_code == 0, full.output
    completion = full.stdout.rstrip("\n")[len("jump"):]
    stop = completion[3:5]
    cut = invoke("generate", "--checkpoint", out, "--prompt", "jump", "--temperature", 0,
                 "--max-new-tokens", 12, "--stop", stop)
    assert cut.exit_code == 0, cut.output
    assert cut.stdout.rstrip("\n") == "jump" + completion[: completion.index(stop)]


def test_pretrain_with_a_bpe_tokenizer(tmp_path, data_file):
    out = tmp_path / "bpe"
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 2,
                    "--eval-interval", 2, "--sample-tokens", 0, "--tokenizer", "bpe",
                    "--vocab-size", 260)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == run_files(out)
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["type"] == "bpe"
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 260
    gen = invoke("generate", "--checkpoint", out, "--prompt", "Sphinx ✓", "--seed", 1,
                 "--max-new-tokens", 5)  # byte-level: any text is a valid prompt
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.startswith("Sphinx ✓")


def test_resume_continues_to_a_larger_max_iters(run_copy):
    result = invoke("pretrain", "--out", run_copy, "--resume", "--max-iters", 9,
                    "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "done: iteration 9" in result.output
    assert json.loads((run_copy / "config.json").read_text())["iter"] == 9
    assert metrics_iters(run_copy) == [0, 3, 6, 9]
    assert "note: --resume" not in result.output  # every flag given was used


def test_resume_of_a_finished_run_whose_last_losses_are_null_says_unknown(run_copy):
    path = run_copy / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    last = {**json.loads(lines[-1]), "train_loss": None, "val_loss": None}  # NaN is kept as null
    path.write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n", encoding="utf-8")
    result = invoke("pretrain", "--out", run_copy, "--resume", "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert "done: iteration 6, train loss unknown, val loss unknown" in result.output, result.output


def test_resume_names_the_flags_it_does_not_use(run_copy, data_file):
    # the run keeps its own settings: a new --lr must not be dropped unseen (--data is used: it
    # says where the run's own text is now, see tests/test_user_corpus.py)
    result = invoke("pretrain", "--out", run_copy, "--resume", "--max-iters", 7, "--lr", 0.5,
                    "--no-bias", "--data", data_file, "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert ("note: --resume continues the run with the settings it began with; not used:"
            " --no-bias, --lr") in result.stderr
    assert json.loads((run_copy / "config.json").read_text())["train"]["lr"] != 0.5


def test_resume_to_a_total_below_the_steps_done_is_refused(run_copy):
    before = (run_copy / "config.json").read_text()
    result = invoke("pretrain", "--out", run_copy, "--resume", "--max-iters", 4)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --max-iters 4 is below the 6 steps the run in")
    assert (run_copy / "config.json").read_text() == before  # the run is left as it was


def test_ctrl_c_exits_130_and_the_suggested_resume_finishes_the_run(tmp_path, data_file,
                                                                   monkeypatch):
    calls = []

    def interrupting(real):  # the 5th AdamW step, on the fast or the reference path, is Ctrl-C
        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return interrupted

    monkeypatch.setattr(train, "adamw_step", interrupting(train.adamw_step))
    monkeypatch.setattr(fast, "adamw_flat", interrupting(fast.adamw_flat))
    out = tmp_path / "run"
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 6,
                    "--eval-interval", 3, "--sample-tokens", 0)
    monkeypatch.undo()
    assert result.exit_code == 130
    assert "interrupted at iteration 4" in result.output and "--resume" in result.output
    assert json.loads((out / "config.json").read_text())["iter"] == 4
    # The command the message suggests: the run keeps its own --max-iters (6), not the default.
    resumed = invoke("pretrain", "--out", out, "--resume", "--sample-tokens", 0)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "config.json").read_text())["iter"] == 6
    assert metrics_iters(out) == [0, 3, 6]


def test_force_replaces_an_existing_run(run_copy, data_file):
    before = snapshot(run_copy)
    result = invoke("pretrain", "--data", data_file, "--out", run_copy, *TINY, "--max-iters", 4,
                    "--eval-interval", 2, "--seed", 7, "--sample-tokens", 0, "--force")
    assert result.exit_code == 0, result.output
    after = snapshot(run_copy)
    model_before = [v for k, v in before.items() if k.startswith("model-")]
    assert [k for k in after if k.startswith("model-")] == ["model-000004.npz"]
    assert after["model-000004.npz"] not in model_before
    assert metrics_iters(run_copy) == [0, 2, 4]


# ----------------------------------------------------------------------------- help


def leaf_commands(group=main, path=()):
    """(path, click command) of every command that runs, e.g. (("finetune", "classify"), ...)."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path + (name,))
        else:
            yield path + (name,), command


LEAF_COMMANDS = list(leaf_commands())


@pytest.mark.parametrize("path, command", LEAF_COMMANDS,
                         ids=[" ".join(path) for path, _ in LEAF_COMMANDS])
def test_help_mentions_every_flag_and_its_default_once(path, command):
    result = invoke(*path, "--help")
    assert result.exit_code == 0
    # Click writes each option as an entry whose first line starts with two spaces and a dash
    options_part = result.output.split("\nOptions:\n")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", "\n" + options_part)[1:]]
    for option in command.params:
        if not isinstance(option, click.Option) or option.name == "help":
            continue
        mine = [e for e in entries if e.split(" ")[0].rstrip(",") in option.opts]
        assert len(mine) == 1, (option.opts, entries)
        entry = mine[0]
        for flag in option.opts + option.secondary_opts:
            assert flag in entry, flag
        on_off_flag = option.is_flag and not option.secondary_opts  # --resume, --force: off
        if not on_off_flag and not option.required:  # a default of None says what it means too
            assert "[default: " in entry, entry
        assert entry.count("[default: ") <= 1, entry  # not Click's and a hand-written one
    text = " ".join(result.output.split())
    if path == ("pretrain",):
        assert "--n-layer INTEGER Number of GPT blocks. [default: 4]" in text
        assert "[default: python-docs]" in text
    if path == ("generate",):
        assert "--temperature FLOAT" in text and "[default: 0.8]" in text


def test_main_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "pretrain" in result.output and "generate" in result.output


@pytest.mark.parametrize("args, expected", [
    (["--help"], "pretrain"),
    (["pretrain", "--help"], "--max-iters"),
    (["generate", "--help"], "--checkpoint"),
    (["--version"], "tinyllm, version"),  # with or without the package installed
])
def test_launcher_runs_from_the_checkout(args, expected):
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout and "Traceback" not in proc.stderr


def test_pretrain_reads_standard_input_from_data_dash(tmp_path, data_file):
    with open(data_file, "rb") as stdin:
        proc = subprocess.run([sys.executable, "cli.py", "pretrain", "--data", "-", "--out",
                               str(tmp_path / "run"), *TINY, "--max-iters", "2",
                               "--sample-tokens", "0"], cwd=REPO, stdin=stdin,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"data: /dev/stdin, {len(TEXT):,} characters" in proc.stdout
    meta = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert meta["data_sha256"] == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.dat").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    (folder / "short.txt").write_text("tiny text", encoding="utf-8")
    return folder


@pytest.mark.parametrize("args, words", [
    (["--data", "{bad}/missing.txt"], ["missing.txt", "not found"]),
    (["--data", "{bad}/empty.txt"], ["empty.txt", "empty"]),
    (["--data", "{bad}/binary.dat"], ["binary.dat", "binary"]),
    (["--data", "{bad}/short.txt"], ["short.txt", "block_size + 1"]),
    (["--data", "{data}", "--n-embd", "30", "--n-head", "4"], ["--n-embd", "--n-head"]),
    (["--data", "{data}", "--n-layer", "0"], ["--n-layer"]),
])
def test_bad_pretrain_input_keeps_the_existing_run(run_copy, bad_files, data_file, args, words):
    """Even with --force, nothing of the old run is touched until the new one can start."""
    args = [a.format(bad=bad_files, data=data_file) for a in args]
    before = snapshot(run_copy)
    result = invoke("pretrain", "--out", run_copy, *TINY, "--max-iters", 2, "--sample-tokens", 0,
                    "--force", *args)
    assert_user_error(result, *words)
    assert snapshot(run_copy) == before


def test_existing_run_without_resume_or_force_is_refused(run_copy, data_file):
    before = snapshot(run_copy)
    result = invoke("pretrain", "--data", data_file, "--out", run_copy, *TINY, "--max-iters", 2,
                    "--sample-tokens", 0)
    assert_user_error(result, str(run_copy), "--resume", "--force")
    assert snapshot(run_copy) == before


# Files a user may keep under the names a run writes, in a directory that holds no run.
USERS_FILES = {"model-000001.npz": b"mine", "optim-999999.npz": b"mine",
               "tokenizer.json": b'{"mine": 1}', "metrics.jsonl": b'{"my": "line"}\n'}


@pytest.mark.parametrize("files", [
    USERS_FILES,
    {"tokenizer.json": b'{"mine": 1}'},  # alone: a first save writes it after model-000000.npz
    {"metrics.jsonl": b'{"iter": 3, "val_loss": 1.0}\n'},  # a step a first save never logs
    {"notes.txt": b"mine"},
])
def test_a_directory_holding_no_run_is_refused_and_left_alone(tmp_path, data_file, files):
    out = tmp_path / "mine"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 2,
                    "--sample-tokens", 0)
    assert_user_error(result, str(out), "no config.json", "new or empty directory", "--force")
    assert snapshot(out) == files


def test_force_in_a_directory_holding_no_run_removes_only_the_names_a_run_writes(tmp_path,
                                                                              data_file):
    out = tmp_path / "mine"
    out.mkdir()
    for name, data in {**USERS_FILES, "notes.txt": b"mine", ".tmp-notes": b"mine",
                       "model-final.npz": b"mine"}.items():
        (out / name).write_bytes(data)
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 2,
                    "--eval-interval", 2, "--sample-tokens", 0, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == sorted(run_files(out) + [".tmp-notes", "model-final.npz",
                                                               "notes.txt"])
    assert metrics_iters(out) == [0, 2]


def test_what_a_crashed_first_save_left_is_cleared_without_force(tmp_path, data_file):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("model-000000.npz", "optim-000000.npz", ".tmp-a1b2c3d4-tokenizer.json"):
        (out / name).write_bytes(b"half a save")
    (out / "metrics.jsonl").write_text('{"iter": 0, "val_loss": 3.0}\n' * 2, encoding="utf-8")
    result = invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 2,
                    "--eval-interval", 2, "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == run_files(out)
    assert metrics_iters(out) == [0, 2]


def test_a_stored_data_path_that_is_not_utf8_shows_nothing_of_the_file(run_copy, tmp_path):
    """config.json names the data, so it may name anyone's file: before its sha256 matches,
    the error says only that it is not the run's text (not the line and character at fault)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"first line\npassword caf\xe9 4711\n")
    meta = json.loads((run_copy / "config.json").read_text(encoding="utf-8"))
    (run_copy / "config.json").write_text(json.dumps({**meta, "data": str(secret)}),
                                          encoding="utf-8")
    result = invoke("pretrain", "--out", run_copy, "--resume", "--max-iters", 8)
    assert_user_error(result, str(secret), "cannot be read as the text", "--resume --data FILE")
    assert not any(word in result.output for word in (":2", "0xe9", "é", "4711", "iconv"))


def test_resume_with_changed_data_is_refused(tmp_path, data_file):
    data = tmp_path / "data.txt"
    shutil.copy(data_file, data)
    out = tmp_path / "run"
    assert invoke("pretrain", "--data", data, "--out", out, *TINY, "--max-iters", 2,
                  "--eval-interval", 2, "--sample-tokens", 0).exit_code == 0
    before = snapshot(out)
    data.write_text(TEXT + "more\n", encoding="utf-8")
    result = invoke("pretrain", "--out", out, "--resume", "--max-iters", 4)
    assert_user_error(result, "changed")
    assert snapshot(out) == before


def test_generate_from_a_missing_checkpoint(tmp_path):
    assert_user_error(invoke("generate", "--checkpoint", tmp_path / "nowhere"), "nowhere",
                      "not found")


def test_out_of_memory_is_one_line_not_a_traceback(trained_run, monkeypatch):
    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 64.0 GiB for an array")

    monkeypatch.setattr("tinyllm.instruct_run.load_generator", too_big)
    result = invoke("generate", "--checkpoint", trained_run[0], "--prompt", "The")
    assert_user_error(result, "out of memory", "--batch-size")
    assert result.exit_code == 1


def test_generate_from_a_truncated_model(run_copy):
    path = checkpoint_paths(str(run_copy))["model"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = snapshot(run_copy)
    result = invoke("generate", "--checkpoint", run_copy, "--prompt", "The", "--seed", 1)
    assert_user_error(result, os.path.basename(path), "truncated")
    assert snapshot(run_copy) == before


def test_generate_from_a_newer_format(run_copy):
    path = run_copy / "config.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**meta, "version": 99}), encoding="utf-8")
    before = snapshot(run_copy)
    result = invoke("generate", "--checkpoint", run_copy, "--prompt", "The", "--seed", 1)
    assert_user_error(result, "config.json", "version 99", "upgrade")
    assert snapshot(run_copy) == before


def test_generate_with_a_character_the_tokenizer_never_saw(trained_run):
    out, _ = trained_run
    before = snapshot(out)
    result = invoke("generate", "--checkpoint", out, "--prompt", "snow☃man", "--seed", 1)
    assert_user_error(result, "--prompt", "'☃'", "position 4")
    assert snapshot(out) == before


@pytest.mark.parametrize("args, words", [
    (["--instruction", "Say hi", "--prompt", "The"], ["--prompt cannot go with --instruction"]),
    (["--instruction", "Say hi", "--stop", "."], ["--stop cannot go with --instruction"]),
    (["--instruction", "Say hi", "--examples", "t.jsonl"], ["--examples", "--instruction"]),
    (["--prompt", "The", "--input", "abc"], ["--input goes with --instruction"]),
    (["--prompt", "The", "--shots", "2"], ["--shots", "--examples FILE"]),
])
def test_generate_refuses_flags_the_prompt_would_ignore(trained_run, args, words):
    # before, --instruction dropped --prompt, --stop and --examples unseen, and --input or
    # --shots alone were dropped too: the output did not show that they had done nothing
    out, _ = trained_run
    assert_user_error(invoke("generate", "--checkpoint", out, "--seed", 1, *args), *words)


@pytest.mark.parametrize("args, flag", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "1.5"], "--top-p"),
])
def test_generate_with_bad_sampling_settings(trained_run, args, flag):
    out, _ = trained_run
    assert_user_error(invoke("generate", "--checkpoint", out, "--prompt", "The", *args), flag)


def test_pretrain_flag_defaults_are_the_config_defaults():
    # One source per default: every flag of `tinyllm pretrain` named after a GPTConfig or
    # TrainConfig field defaults to that field's default, and the tokenizer flags and --out to
    # the constants in tinyllm/config.py.
    import dataclasses

    from tinyllm import config as cfg

    defaults = {p.name: p.default for p in main.commands["pretrain"].params}
    fields = [(f.name, f.default) for cls in (cfg.GPTConfig, cfg.TrainConfig)
              for f in dataclasses.fields(cls)
              if f.name in defaults and f.name not in ("vocab_size", "distance_bias")]
    assert len(fields) == 17  # all but vocab_size (the flag is BPE's), tie_weights and the betas
    assert defaults["distance_bias"] is None  # on with --objective mlm, else GPTConfig's False
    for name, value in fields:
        assert defaults[name] == value, name
    assert defaults["tokenizer_kind"] == cfg.DEFAULT_TOKENIZER
    assert defaults["vocab_size"] == cfg.DEFAULT_BPE_VOCAB_SIZE
    assert defaults["out"] == cfg.DEFAULT_RUN


def test_a_pretraining_warm_up_longer_than_the_run_is_noted(trained_run):
    """The 6-step run has the default 100 warm-up steps: its learning rate never reaches --lr,
    as the note says (the same note as fine-tuning's, from the loop they share)."""
    _, result = trained_run
    assert ("note: --warmup-iters 100 is more than the run's 6 steps: the learning rate only"
            " rises, to 6/100 of --lr (6e-05), and never decays") in result.output.splitlines()
