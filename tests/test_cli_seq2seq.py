"""End-to-end tests of `tinyllm seq2seq train` and `tinyllm seq2seq translate` on a tiny model:
training, translating, scoring a file, bit-exact --resume, and one-line errors for bad input."""

import json
import os
import shutil

import numpy as onp
import pytest
from click.testing import CliRunner


from tinyllm import seq2seq_data
from tinyllm.checkpoint import checkpoint_paths
from tinyllm.cli import main

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-iters", "1", "--eval-examples", "3"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *words):
    """Exit 1 through a handled error: one 'Error:' line that names `words`, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Reverse a word: 30 pairs, with a quote kept as an ordinary character."""
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    words = [w + s for s in ("", "s", '"') for w in WORDS]
    path.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pairs_file):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("seq2seq", "train", "--data", pairs_file, "--out", out, *TINY,
                    "--max-iters", 6, "--eval-interval", 3)
    assert result.exit_code == 0, result.output
    return out, result


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_reports_held_out_exact_match(trained_run):
    out, result = trained_run
    assert "held-out exact match:" in result.output and "of 3 pairs" in result.output
    assert [m["iter"] for m in metrics(out)] == [0, 3, 6]
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "seq2seq" and meta["label_smoothing"] == 0.1
    assert meta["schedule"] == "cosine" and meta["model"]["positions"] == "sinusoidal"


def test_train_writes_its_final_scores_to_metrics_json(trained_run):
    out, result = trained_run
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (report["format"], report["version"]) == ("tinyllm-seq2seq-metrics", 1)
    assert report["held_out_pairs"] == 3 and report["iterations"] == 6
    assert report["decoding"] == "greedy" and 0 <= report["cut"] <= 3
    assert report["max_len"] == 7  # the longest target ("sevens"/'seven"', 6) and a token more
    assert report["train_seconds"] >= 0 and report["train_seconds_this_part"] >= 0
    # the report holds what the command printed
    assert (f"held-out exact match: {100 * report['exact_match']:.1f}% of 3 pairs (greedy),"
            f" BLEU-4 {report['bleu']:.1f} (no reference has 4 words") in result.output
    assert "checkpoint and metrics.json in" in result.output


def test_force_and_resume_remove_an_earlier_report_first(tmp_path, pairs_file, monkeypatch):
    # a run that stops before its end must not leave the report of the run before it
    from tinyllm import seq2seq_run
    from tinyllm.errors import TinyLLMError

    out = tmp_path / "run"
    args = ["seq2seq", "train", "--data", pairs_file, "--out", out, *TINY, "--eval-interval", 2]
    assert invoke(*args, "--max-iters", 2).exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 2

    def stops(*args, **kwargs):
        raise TinyLLMError("stopped in training")

    with monkeypatch.context() as patch:
        patch.setattr(seq2seq_run, "train_loop", stops)
        assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 4),
                          "stopped in training")
        assert not (out / "metrics.json").exists()
    assert invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 4).exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 4
    with monkeypatch.context() as patch:
        patch.setattr(seq2seq_run, "train_loop", stops)
        assert_user_error(invoke(*args, "--max-iters", 2, "--force"), "stopped in training")
        assert not (out / "metrics.json").exists()


def test_translate_text_and_score_file(trained_run, pairs_file):
    out, _ = trained_run
    result = invoke("seq2seq", "translate", "--checkpoint", out, "one", "two")
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", pairs_file,
                    "--beam-size", 2, "--max-len", 6, "--show", 2)
    assert result.exit_code == 0, result.output
    assert "30 pairs: exact match" in result.output and "BLEU-4" in result.output
    assert "pairs translated: 30/30" in result.stderr  # progress: a beam search per pair


def test_resume_continues_bit_for_bit(tmp_path, pairs_file):
    args = ["seq2seq", "train", "--data", pairs_file, *TINY, "--eval-interval", 2,
            "--schedule", "noam", "--warmup-iters", 3, "--label-smoothing", 0.2]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert invoke(*args, "--out", straight, "--max-iters", 6).exit_code == 0
    assert invoke(*args, "--out", resumed, "--max-iters", 4).exit_code == 0
    result = invoke("seq2seq", "train", "--out", resumed, "--resume", "--max-iters", 6,
                    "--lr", 0.5, "--eval-examples", 2)
    assert "not used: --lr\n" in result.stderr  # the run's own --lr; --eval-examples is used
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    losses = lambda run: [(m["iter"], m["train_loss"], m["val_loss"]) for m in metrics(run)]  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    with onp.load(checkpoint_paths(straight)["model"]) as a, \
            onp.load(checkpoint_paths(resumed)["model"]) as b:
        assert all(onp.array_equal(a[k], b[k]) for k in a.files)


def test_noam_schedule_is_logged(tmp_path, pairs_file):
    out = tmp_path / "run"
    result = invoke("seq2seq", "train", "--data", pairs_file, "--out", out, *TINY,
                    "--max-iters", 2, "--eval-interval", 1, "--schedule", "noam",
                    "--warmup-iters", 4)
    assert result.exit_code == 0, result.output
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs[1] == pytest.approx(16**-0.5 * 2 * 4**-1.5)  # the paper's formula at step 2
    assert lrs[2] == pytest.approx(16**-0.5 * 3 * 4**-1.5)  # and at step 3


def test_existing_run_is_not_overwritten(trained_run, tmp_path, pairs_file):
    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    result = invoke("seq2seq", "train", "--data", pairs_file, "--out", out, *TINY)
    assert_user_error(result, "--resume", "--force")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


@pytest.mark.parametrize("content, words", [
    ("one\teno\ntwo owt\n", ["line 2", "no tab"]),
    ("one\teno\n\towt\n", ["line 2", "source is empty"]),
    ("one\teno\n" + "x" * 40 + "\ty\n", ["line 2", "more than the context", "--block-size"]),
    ("one\teno\n" + "x\t" + "y" * 16 + "\n", ["line 2", "target has 16 tokens", "context of 15"]),
])
def test_bad_pairs_file_is_a_one_line_error(tmp_path, content, words):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    result = invoke("seq2seq", "train", "--data", path, "--out", tmp_path / "run", *TINY)
    assert_user_error(result, str(path), *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("legacy", ["", "\ufeff"])
def test_a_run_begun_with_an_older_fingerprint_still_resumes(tmp_path, pairs_file, legacy):
    # older runs stored the sha256 of the sides run together (pairs_text), some with the BOM
    # kept at the start of the first source; new runs store it of the pairs as JSON
    from tinyllm.seq2seq_run import fingerprinted_text
    from tinyllm.rundir import text_fingerprint

    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + pairs_file.read_bytes())
    out = tmp_path / "run"
    assert invoke("seq2seq", "train", "--data", path, "--out", out, *TINY, "--max-iters", 2,
                  "--eval-interval", 2).exit_code == 0
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    train, held = seq2seq_data.load_pairs(str(path))
    assert meta["data_sha256"] == text_fingerprint(fingerprinted_text(train + held))
    text = seq2seq_data.pairs_text(train + held)
    assert not text.startswith("\ufeff")
    meta["data_sha256"] = text_fingerprint(legacy + text)
    (out / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3)
    assert result.exit_code == 0, result.output
    path.write_bytes(b"\xef\xbb\xbf" + pairs_file.read_bytes() + b"more\terom\n")
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 4),
                      "has changed")


def test_translate_errors(trained_run, tmp_path):
    out, _ = trained_run
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", out, "Zebra"), "text 1", "'Z'")
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", out, "o" * 20),
                      "more than the context")
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", out), "--data")
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", out, "one", ""), "text 2", "empty")
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", tmp_path / "none", "one"),
                      "not found")


def translate_file(out, path, text):
    """`seq2seq translate --data` on a file holding `text`, which must succeed."""
    path.write_text(text, encoding="utf-8")
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path)
    assert result.exit_code == 0, result.output
    return result


def test_pairs_the_model_cannot_read_are_left_out_and_counted(trained_run, tmp_path):
    # one unseen character (or one source longer than the context) in a file of thousands
    # would otherwise stop the scoring of all of them
    out, _ = trained_run
    path = tmp_path / "held.tsv"
    result = translate_file(out, path, "one\teno\n\nZero\torez\ntwo\towt\n" + "o" * 17 + "\tx\n")
    assert (f"note: 2 of the 4 pairs are left out of the score: the model cannot read their"
            f" source (first: {path} line 3: text has character 'Z'") in result.output
    assert "2 of 4 pairs: exact match" in result.output
    assert "pairs translated: 2/2" in result.stderr
    path.write_text("Zero\torez\n", encoding="utf-8")
    assert_user_error(invoke("seq2seq", "translate", "--checkpoint", out, "--data", path),
                      str(path), "none of its 1 sources", "line 1", "'Z'")


def test_targets_the_model_cannot_write_count_as_misses(trained_run, tmp_path):
    out, _ = trained_run
    path = tmp_path / "held.tsv"
    # an unseen space around a target is no obstacle: exact match ignores outer whitespace
    result = translate_file(out, path, "one\teno\u00a0\ntwo\tOWT\nsix\t" + "x" * 16 + "\n")
    assert (f"note: 2 scored pairs have a target the model cannot write, so they count as misses"
            f" (first: {path} line 2: text has character 'O'") in result.output
    assert "3 pairs: exact match" in result.output


def test_bad_flags(tmp_path):
    result = invoke("seq2seq", "train", "--out", tmp_path / "r", "--label-smoothing", 1.5)
    assert result.exit_code == 2 and "Invalid value for '--label-smoothing'" in result.output
    assert_user_error(invoke("seq2seq", "train", "--out", tmp_path / "r", "--n-embd", 10),
                      "divisible")


def test_help_shows_defaults():
    result = invoke("seq2seq", "train", "--help")
    assert result.exit_code == 0
    assert "--label-smoothing" in result.output and "default: 0.1" in result.output
    result = invoke("seq2seq", "translate", "--help")
    assert "--beam-size" in result.output and "--length-penalty" in result.output


def test_train_flag_defaults_are_the_config_defaults():
    # One source per default: Seq2SeqConfig's fields and seq2seq_run.SEQ2SEQ_TRAIN's.
    import dataclasses

    from tinyllm.seq2seq import Seq2SeqConfig
    from tinyllm.seq2seq_run import SEQ2SEQ_RUN, SEQ2SEQ_TRAIN

    defaults = {p.name: p.default for p in main.commands["seq2seq"].commands["train"].params}
    expected = {**dataclasses.asdict(Seq2SeqConfig()), **dataclasses.asdict(SEQ2SEQ_TRAIN)}
    shared = sorted(set(defaults) & set(expected))
    assert len(shared) == 18  # all but vocab_size, tie_weights and the betas
    assert {name: defaults[name] for name in shared} == {name: expected[name] for name in shared}
    assert defaults["out"] == SEQ2SEQ_RUN


def test_resume_of_a_run_on_the_embedded_task(tmp_path, monkeypatch):
    """The run stores the task by name (null for the default), not as a path or a corpus name."""
    train, held = seq2seq_data.dates_task()
    monkeypatch.setitem(seq2seq_data.EMBEDDED_TASKS, "dates", lambda: (train[:200], held[:20]))
    out = tmp_path / "run"
    result = invoke("seq2seq", "train", *TINY, "--block-size", 32, "--out", out, "--max-iters", 2,
                    "--eval-interval", 1)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["data"] is None
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3)
    assert result.exit_code == 0 and "resuming" in result.output, result.output
