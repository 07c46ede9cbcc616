"""A new user's own text through `tinyllm pretrain`, `generate` and `finetune instruct`: what
they see while it works, and one-line errors for what cannot work."""

import hashlib
import json
import os
import re
from dataclasses import replace

import numpy as onp
import pytest
from click.testing import CliRunner

from tinyllm import pretrain as pretrain_module
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.rundir import run_corpus
from tinyllm.tokenizers import train_tokenizer
from tinyllm.pretrain import encoding_progress, merges_progress, pretrain

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12
MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
TRAIN = TrainConfig(batch_size=4, max_iters=2, eval_interval=2, eval_iters=1)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "my text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- progress


def test_merges_progress_logs_the_merges_done():
    lines = []
    progress = merges_progress(lines.append, every_seconds=0.0)
    progress(3, 40)
    assert lines == ["tokenizer: 3 of 40 merges learned"]


def test_bpe_training_says_what_it_does_and_how_far_it_got(tmp_path, data, monkeypatch):
    # a text of long words learns its merges for minutes: the user must see it is working
    monkeypatch.setattr(pretrain_module, "merges_progress",
                        lambda log: merges_progress(log, every_seconds=0.0))
    lines = []
    pretrain(MODEL, TRAIN, str(tmp_path / "run"), data=data, tokenizer_kind="bpe",
             vocab_size=270, log=lines.append)
    assert lines[0] == f"tokenizer: learning BPE merges from {len(TEXT):,} characters ..."
    assert "tokenizer: 13 of 13 merges learned" in lines


def test_a_vocabulary_smaller_than_asked_is_said(tmp_path, data):
    # TEXT has few distinct words: its merges run out long before 5,000 ids
    lines = []
    result = pretrain(MODEL, TRAIN, str(tmp_path / "run"), data=data, tokenizer_kind="bpe",
                      vocab_size=5000, log=lines.append)
    size = result["tokenizer"].vocab_size
    assert size < 5000
    assert (f"tokenizer: the text has no pair of tokens left to merge after {size - 257:,} merges:"
            f" its vocabulary is {size:,}, not the 5,000 of --vocab-size") in lines


def test_encoding_progress_logs_the_characters_encoded():
    lines = []
    progress = encoding_progress(lines.append, every_seconds=0.0)
    progress(1_048_576, 3_000_000)
    assert lines == ["tokenizer: 1,048,576 of 3,000,000 characters encoded"]
    quiet = encoding_progress(lines.append)  # the default: nothing before 5 s have passed
    quiet(10, 20)
    assert len(lines) == 1


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encoding_the_text_shows_progress_and_gives_the_same_ids(tmp_path, data, monkeypatch,
                                                                 kind):
    """100 MB of text takes a minute to encode: the user must see it working. Shown or not,
    the progress changes no id."""
    quiet = pretrain(MODEL, TRAIN, str(tmp_path / "quiet"), data=data, tokenizer_kind=kind,
                     vocab_size=270, log=lambda line: None)
    monkeypatch.setattr(pretrain_module, "encoding_progress",
                        lambda log: encoding_progress(log, every_seconds=0.0))
    real = pretrain_module.encode_corpus
    monkeypatch.setattr(pretrain_module, "encode_corpus",
                        lambda tok, text, progress: real(tok, text, progress, size=100))
    lines = []
    shown = pretrain(MODEL, TRAIN, str(tmp_path / "shown"), data=data, tokenizer_kind=kind,
                     vocab_size=270, log=lines.append)
    counts = [line for line in lines if line.endswith("characters encoded")]
    assert len(counts) > 10
    assert counts[-1] == f"tokenizer: {len(TEXT):,} of {len(TEXT):,} characters encoded"
    whole = onp.asarray(train_tokenizer(kind, TEXT, 270, pretrain_module.SPECIAL_TOKENS).encode(TEXT))
    for result in (quiet, shown):
        assert onp.array_equal(result["val_ids"], whole[int(0.9 * len(whole)):])


# ----------------------------------------------------------------------------- resume


def test_resume_reads_a_moved_corpus_from_where_data_says(tmp_path, data):
    out = str(tmp_path / "run")
    pretrain(MODEL, TRAIN, out, data=data, tokenizer_kind="char", log=lambda line: None)
    moved = tmp_path / "moved.txt"
    os.rename(data, moved)
    with pytest.raises(TinyLLMError, match="is gone .* --resume --data FILE"):
        pretrain(MODEL, TRAIN, out, resume=True, max_iters=4, log=lambda line: None)
    result = pretrain(MODEL, TRAIN, out, data=str(moved), resume=True, max_iters=4,
                      log=lambda line: None)
    assert result["final"]["iter"] == 4
    assert load_checkpoint(out).meta["data"] == str(moved)  # the next resume finds it there


def test_resume_of_a_run_read_from_a_pipe_says_to_give_its_text_again(tmp_path, data):
    # `--data /dev/stdin` stores that path; resuming read whatever stdin was then, and said only
    # "is not a regular file"
    out = str(tmp_path / "run")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pretrain(MODEL, TRAIN, out, data=data, tokenizer_kind="char", log=lambda line: None)
    config = os.path.join(out, "config.json")
    meta = json.loads(open(config, encoding="utf-8").read())
    open(config, "w", encoding="utf-8").write(json.dumps({**meta, "data": str(fifo)}))
    with pytest.raises(TinyLLMError, match=r"not a regular file \(a pipe, read once\?\): give"
                                           r" its text again with --resume --data FILE"):
        pretrain(MODEL, TRAIN, out, resume=True, max_iters=4, log=lambda line: None)
    result = pretrain(MODEL, TRAIN, out, data=data, resume=True, max_iters=4,
                      log=lambda line: None)
    assert result["final"]["iter"] == 4


def test_done_gives_the_training_time_over_every_resume(tmp_path, data):
    out = tmp_path / "run"
    config = out / "config.json"
    tiny = ["--tokenizer", "char", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "16", "--batch-size", "4", "--eval-iters", "1", "--sample-tokens", "0"]
    result = CliRunner().invoke(main, ["pretrain", "--data", data, "--out", str(out),
                                       "--max-iters", "2", *tiny])
    assert result.exit_code == 0, result.output
    assert re.search(r"done: iteration 2, .*, \d+ s; checkpoint in", result.output)
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "train_seconds": 1000}), encoding="utf-8")
    resume = ["pretrain", "--out", str(out), "--resume", "--max-iters"]
    result = CliRunner().invoke(main, [*resume, "4"])
    assert result.exit_code == 0, result.output
    assert re.search(r"done: iteration 4, .*, \d+ s \(10\d\d s in all, over every --resume\);",
                     result.output), result.output
    meta = json.loads(config.read_text())
    del meta["train_seconds"]  # as a run saved before tinyllm kept the time
    config.write_text(json.dumps(meta), encoding="utf-8")
    result = CliRunner().invoke(main, [*resume, "6"])
    assert result.exit_code == 0, result.output
    assert "s (the run's time before --resume is unknown" in result.output


def test_resume_data_must_be_the_runs_own_text(tmp_path, data):
    out = str(tmp_path / "run")
    pretrain(MODEL, TRAIN, out, data=data, tokenizer_kind="char", log=lambda line: None)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(TinyLLMError, match="sha256"):
        pretrain(MODEL, TRAIN, out, data=str(other), resume=True, max_iters=4,
                 log=lambda line: None)


def test_a_byte_order_mark_is_not_text_and_a_run_that_kept_it_still_resumes(tmp_path):
    # The mark is dropped when the file is read, so the sha256 is the text's; a run made before
    # 2026-12-01 trained on the mark and stored the sha256 of the file's bytes, mark and all:
    # it resumes on the text it was trained on, mark included.
    data = tmp_path / "marked.txt"
    data.write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))
    out = str(tmp_path / "run")
    pretrain(MODEL, TRAIN, out, data=str(data), tokenizer_kind="char", log=lambda line: None)
    meta = load_checkpoint(out).meta
    assert meta["data_sha256"] == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    assert meta["data_characters"] == len(TEXT)
    old = {**meta, "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert run_corpus(old, out) == "\ufeff" + TEXT
    assert run_corpus(meta, out) == TEXT


# ----------------------------------------------------------------------------- LoRA flags


@pytest.mark.parametrize("command", ["instruct", "classify"])
def test_lora_alpha_without_a_rank_is_refused(tmp_path, command):
    # without --lora-rank there are no adapters: the run would train every weight, flag unseen
    result = CliRunner().invoke(main, ["finetune", command, "--lora-alpha", "8",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: --lora-alpha scales LoRA adapters")
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- a small text


def test_a_text_too_short_for_bpe_names_the_vocab_size(tmp_path, data):
    # 190 validation characters fill a 64-token context, but BPE merges them into 45 tokens:
    # a smaller vocabulary is a remedy the message must name
    with pytest.raises(TinyLLMError, match=r"has 45 tokens, fewer .* smaller --vocab-size"):
        pretrain(replace(MODEL, block_size=64), TRAIN, str(tmp_path / "run"), data=data,
                 tokenizer_kind="bpe", vocab_size=2048, log=lambda line: None)
    with pytest.raises(TinyLLMError) as char_error:
        pretrain(replace(MODEL, block_size=256), TRAIN, str(tmp_path / "run"), data=data,
                 tokenizer_kind="char", log=lambda line: None)
    assert "--vocab-size" not in str(char_error.value)  # a char tokenizer has no merges
