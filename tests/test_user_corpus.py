"""A new user's own text through `tinyllm pretrain`, `generate` and `finetune instruct`: what
they see while it works, and one-line errors for what cannot work."""

import os
from dataclasses import replace

import pytest
from click.testing import CliRunner

from tinyllm import train
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.train import merges_progress, pretrain

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
    monkeypatch.setattr(train, "merges_progress",
                        lambda log: merges_progress(log, every_seconds=0.0))
    lines = []
    pretrain(MODEL, TRAIN, str(tmp_path / "run"), data=data, tokenizer_kind="bpe",
             vocab_size=270, log=lines.append)
    assert lines[0] == f"tokenizer: learning BPE merges from {len(TEXT):,} characters ..."
    assert "tokenizer: 13 of 13 merges learned" in lines


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


def test_resume_data_must_be_the_runs_own_text(tmp_path, data):
    out = str(tmp_path / "run")
    pretrain(MODEL, TRAIN, out, data=data, tokenizer_kind="char", log=lambda line: None)
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(TinyLLMError, match="sha256"):
        pretrain(MODEL, TRAIN, out, data=str(other), resume=True, max_iters=4,
                 log=lambda line: None)


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
