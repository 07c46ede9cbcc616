"""`tinyllm seq2seq` as a new user drives it on their own pairs: resuming a run whose file moved
or whose total is already passed, and flags that would do nothing in the combination given."""

import json
import os
import re

import numpy as onp
import pytest

from tinyllm.errors import TinyLLMError

from test_cli_seq2seq import TINY, assert_user_error, invoke


def pairs(tmp_path, name="pairs.tsv", n=20):
    path = tmp_path / name
    path.write_text("".join(f"{i}\t{'x' * (i % 5 + 1)}\n" for i in range(n)), encoding="utf-8")
    return path


def train(data, out, *flags):
    result = invoke("seq2seq", "train", "--data", data, "--out", out, *TINY, *flags)
    assert result.exit_code == 0, result.output
    return result


def test_resume_reads_a_moved_pairs_file_given_with_data(tmp_path):
    path, out = pairs(tmp_path), tmp_path / "run"
    train(path, out, "--max-iters", 2, "--eval-interval", 2)
    moved = path.rename(tmp_path / "moved.tsv")
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3),
                      str(path), "is gone", "--resume --data FILE")
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3, "--data", moved)
    assert result.exit_code == 0 and "not used" not in result.stderr, result.output
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)
    other = pairs(tmp_path, "other.tsv", n=21)
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 4,
                             "--data", other), "has changed")


def test_a_stored_pairs_path_that_is_not_utf8_shows_nothing_of_the_file(tmp_path):
    # the path comes from the run directory: until its hash matches, the file may be anyone's
    path, out = pairs(tmp_path), tmp_path / "run"
    train(path, out, "--max-iters", 2, "--eval-interval", 2)
    path.write_bytes(b"secret\tpassw\xf6rd\n")
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3)
    assert_user_error(result, str(path), "cannot be read as the text", "--resume --data FILE")
    assert "passw" not in result.output and "0xf6" not in result.output and ":1" not in result.output


def test_resume_below_the_steps_done_is_refused(tmp_path):
    path, out = pairs(tmp_path), tmp_path / "run"
    train(path, out, "--max-iters", 4, "--eval-interval", 2)
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 2),
                      "--max-iters 2", "4 steps")


def test_done_gives_the_training_time_over_every_resume(tmp_path):
    path, out, config = pairs(tmp_path), tmp_path / "run", tmp_path / "run" / "config.json"
    train(path, out, "--max-iters", 2, "--eval-interval", 2)
    assert json.loads(config.read_text())["train_seconds"] >= 0
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "train_seconds": 1000}), encoding="utf-8")
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3)
    assert result.exit_code == 0, result.output
    assert re.search(r"done: iteration 3, .*, \d+ s \(10\d\d s in all, over every --resume\);",
                     result.output), result.output
    meta = json.loads(config.read_text())
    del meta["train_seconds"]  # a run saved before tinyllm kept the time
    config.write_text(json.dumps(meta), encoding="utf-8")
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 4)
    assert result.exit_code == 0, result.output
    assert "s (the run's time before --resume is unknown" in result.output


def test_flags_that_would_do_nothing_are_refused(tmp_path):
    path, out = pairs(tmp_path), tmp_path / "run"
    noam = ["seq2seq", "train", "--data", path, "--out", out, *TINY, "--max-iters", 1,
            "--schedule", "noam"]
    assert_user_error(invoke(*noam, "--lr", 0.01), "--lr", "--schedule noam")
    assert_user_error(invoke(*noam, "--min-lr", 0), "--min-lr", "--schedule noam")
    assert not out.exists()
    translate = ["seq2seq", "translate", "--checkpoint", out, "one"]
    assert_user_error(invoke(*translate, "--length-penalty", 1.0),
                      "--length-penalty", "--beam-size")
    assert_user_error(invoke(*translate, "--show", 3), "--show", "--data")


def test_held_out_translations_may_be_as_long_as_the_longest_target(tmp_path, monkeypatch):
    # translate's default stops at twice the source plus 50 tokens: 52 for these 1-character
    # sources, so a perfect model would score 0% on 70-character targets
    from tinyllm import seq2seq_run

    from tinyllm.decoding import Translation

    asked = []
    monkeypatch.setattr(seq2seq_run, "translate",
                        lambda params, config, tok, texts, *args, **kw:
                        asked.append(kw["max_len"]) or [Translation("z" * 70, False)] * len(texts))
    path = tmp_path / "long.tsv"
    path.write_text("".join(f"{i}\t{'z' * 70}\n" for i in range(10)), encoding="utf-8")
    result = train(path, tmp_path / "run", "--block-size", 80, "--max-iters", 1)
    assert asked == [71] and "held-out exact match: 100.0%" in result.output  # one token more:
    # an output that has not stopped after 70 tokens must not be cut into a match


def test_held_out_outputs_that_do_not_stop_are_not_cut_into_matches(tmp_path, monkeypatch):
    from tinyllm import decoding, seq2seq_run

    # a "model" that emits the target and goes on: cut at the target's length it would match
    real = seq2seq_run.translate

    def never_stops(params, config, tokenizer, texts, *args, **kw):
        z = tokenizer.encode("z")[0]
        monkeypatch.setattr(decoding, "greedy_decode", lambda params, config, src, src_valid,
                            bos, eos, max_len, use_cache: [decoding.Output([z] * max_len, cut=True)
                                                           for _ in src])
        return real(params, config, tokenizer, texts, *args, **kw)

    monkeypatch.setattr(seq2seq_run, "translate", never_stops)
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{i}\t{'z' * 5}\n" for i in range(10)), encoding="utf-8")
    result = train(path, tmp_path / "run", "--max-iters", 1)
    assert "held-out exact match: 0.0%" in result.output
    # and the cut translation is counted, in the output and in the report
    assert ("note: 1 held-out translations reached the length limit of 6 tokens without <eos>"
            in result.output)
    report = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert (report["cut"], report["max_len"], report["held_out_pairs"]) == (1, 6, 1)


def test_a_header_row_is_not_a_pair(tmp_path):
    from tinyllm.seq2seq_data import read_pairs

    path = tmp_path / "header.tsv"
    path.write_text("\ufeffSource\tTarget\r\n1\tone\r\nsource\ttarget\r\n", encoding="utf-8")
    assert [(p.source, p.target, p.where) for p in read_pairs(str(path))] == [
        ("1", "one", f"{path} line 2"), ("source", "target", f"{path} line 3")]  # only the first


def test_held_out_pairs_that_are_also_training_pairs_are_noted(tmp_path):
    path = tmp_path / "dups.tsv"
    path.write_text("a\tb\n" * 10 + "".join(f"{i}\t{i}\n" for i in range(10)), encoding="utf-8")
    result = train(path, tmp_path / "run", "--max-iters", 1)
    assert "note: 1 of the 2 held-out pairs are also training pairs" in result.output


@pytest.fixture(scope="module")
def long_targets_run(tmp_path_factory):
    """One-character sources, 70-character targets, a context of 80: a run that is all room."""
    tmp = tmp_path_factory.mktemp("long")
    path = tmp / "long.tsv"
    path.write_text("".join(f"{i}\t{'z' * 70}\n" for i in range(10)), encoding="utf-8")
    train(path, tmp / "run", "--block-size", 80, "--max-iters", 1)
    return path, tmp / "run"


def decoding_emits(monkeypatch, length):
    """Make greedy decoding emit `length` z's and then <eos> (cut by max_len, as the loop is)."""
    from tinyllm import decoding

    def emit(params, config, src, src_valid, bos, eos, max_len, use_cache):
        z = config.vocab_size - 4  # 'z': the last character
        return [decoding.Output([z] * min(length, max_len), cut=length >= max_len) for _ in src]

    monkeypatch.setattr(decoding, "greedy_decode", emit)


def test_scoring_leaves_room_for_the_longest_reference(long_targets_run, monkeypatch):
    # translate's default stops at twice the source plus 50 tokens: 52 for these 1-character
    # sources, which would cut a perfect model's 70-character outputs into misses
    path, out = long_targets_run
    decoding_emits(monkeypatch, 70)
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path)
    assert result.exit_code == 0, result.output
    assert "10 pairs: exact match 100.0%" in result.output and "note" not in result.output


def test_translations_cut_at_the_length_limit_are_counted(long_targets_run, monkeypatch):
    path, out = long_targets_run
    decoding_emits(monkeypatch, 1000)  # a model that never stops
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path)
    assert result.exit_code == 0, result.output
    assert ("note: 10 translations reached the length limit of 71 tokens without <eos> and are"
            " cut there (longer than every target: they cannot match)") in result.output
    assert "10 pairs: exact match 0.0%" in result.output
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path, "--max-len", 70)
    assert "note: 10 translations reached the length limit of 70 tokens" in result.output
    assert "(--max-len 70)" in result.output and "exact match 100.0%" in result.output
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path, "--max-len", 500)
    assert "limit of 79 tokens" in result.output
    assert "the context, --block-size 80, allows no more" in result.output



def decoder_always_says(monkeypatch, token, eos):
    """Make the decoder's likeliest next token always `token` (an id) and `eos` the least likely;
    the greedy and beam search loops run as they are."""
    from tinyllm import decoding

    def next_log_probs_fn(params, config, memory, src_valid, use_cache):
        def next_log_probs(prefixes, parents=None):
            logp = onp.full((len(prefixes), config.vocab_size), -30.0)  # (R, V)
            logp[:, eos], logp[:, token] = -60.0, 0.0
            return logp

        return next_log_probs

    monkeypatch.setattr(decoding, "next_log_probs_fn", next_log_probs_fn)


@pytest.mark.parametrize("beam", ["1", "2"])
def test_cut_translations_of_pad_tokens_are_counted(long_targets_run, monkeypatch, beam):
    """A barely trained model may emit <pad> until the length limit: decoding drops <pad> from
    the text, so the (empty) text cannot show the cut; the decoder reports it."""
    from tinyllm.checkpoint import load_checkpoint

    path, out = long_targets_run
    special = load_checkpoint(str(out), kind="seq2seq").tokenizer.special_tokens
    decoder_always_says(monkeypatch, special["<pad>"], special["<eos>"])
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path,
                    "--beam-size", beam)
    assert result.exit_code == 0, result.output
    assert "note: 10 translations reached the length limit of 71 tokens" in result.output
    assert "10 pairs: exact match 0.0%" in result.output


def stored_data(out, value):
    """Make the run in `out` say its pairs are at `value`, as a run directory from elsewhere may."""
    config = out / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "data": value}),
                      encoding="utf-8")


def test_a_stored_path_is_read_only_as_a_regular_file_and_only_as_the_run_s_pairs(tmp_path):
    # the path in config.json is untrusted: a FIFO was opened and waited on for 10 s, and any
    # other file was parsed as pairs, its line numbers and faults shown before the sha256 check
    path, out = pairs(tmp_path), tmp_path / "run"
    train(path, out, "--max-iters", 2, "--eval-interval", 2)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    stored_data(out, str(fifo))
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3),
                      str(fifo), "not a regular file")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n\tkey\n", encoding="utf-8")
    stored_data(out, str(secret))
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3)
    assert_user_error(result, str(secret), "has changed since the run began")
    assert "line" not in result.output and "tab" not in result.output, result.output


def test_a_stored_task_name_is_never_read_as_a_file(tmp_path, monkeypatch):
    from tinyllm import seq2seq_data

    train_pairs, held = seq2seq_data.dates_task()
    monkeypatch.setitem(seq2seq_data.EMBEDDED_TASKS, "dates", lambda: (train_pairs[:50], held[:5]))
    out = tmp_path / "run"
    train("dates", out, "--block-size", 32, "--max-iters", 1)
    assert json.loads((out / "config.json").read_text())["data"] == "dates"
    monkeypatch.chdir(tmp_path)
    pairs(tmp_path, name="dates")  # a file that happens to bear the task's name
    result = invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 2)
    assert result.exit_code == 0 and "data: dates" in result.output, result.output


def test_text_moved_across_the_tab_is_a_change_of_data(tmp_path):
    # the stored sha256 was of the sides run together: "ab<TAB>c" and "a<TAB>bc" had the same
    path, out = tmp_path / "pairs.tsv", tmp_path / "run"
    lines = [f"{i}\t{'x' * (i % 5 + 1)}\n" for i in range(20)]
    path.write_text("".join(lines), encoding="utf-8")
    train(path, out, "--max-iters", 2, "--eval-interval", 2)
    path.write_text("".join([lines[0], "1x\tx\n", *lines[2:]]), encoding="utf-8")  # "1<TAB>xx"
    assert_user_error(invoke("seq2seq", "train", "--out", out, "--resume", "--max-iters", 3),
                      "has changed")


def test_a_beam_too_wide_for_memory_is_refused_before_decoding(long_targets_run, monkeypatch):
    # --beam-size 1,048,576 passed the option's bound and ran until numpy's MemoryError (a
    # traceback) or the swap: each hypothesis holds a key/value cache of the whole context
    from tinyllm import decoding
    from tinyllm.checkpoint import load_checkpoint

    path, out = long_targets_run
    monkeypatch.setattr(decoding, "available_memory", lambda: 10**9)

    def must_not_run(*args, **kwargs):
        raise AssertionError("beam search began")

    monkeypatch.setattr(decoding, "encoder_forward", must_not_run)
    for args in (["1"], ["--data", path]):
        result = invoke("seq2seq", "translate", "--checkpoint", out, *args, "--beam-size", 1048576)
        assert_user_error(result, "beam search with --beam-size 1,048,576", "GB of memory")
    # the library's own entry point meets the same check: translate a text, as a script would
    ckpt = load_checkpoint(str(out), kind="seq2seq")
    with pytest.raises(TinyLLMError, match="--beam-size 1,048,576 needs about"):
        decoding.translate(ckpt.params, ckpt.model_config, ckpt.tokenizer, ["1"],
                           beam_size=1048576)
    # the estimate: 1 layer x (keys, values) x 80 positions x 16 channels x 4 bytes, twice,
    # plus three float64 scores over the 14 tokens, per hypothesis
    monkeypatch.setattr(decoding, "available_memory", lambda: 4 * (20480 + 336))
    decoding.check_beam_search(ckpt.params, ckpt.model_config, 4, 0.6)
    with pytest.raises(TinyLLMError, match="--beam-size 5"):
        decoding.check_beam_search(ckpt.params, ckpt.model_config, 5, 0.6)


@pytest.mark.parametrize("alpha", ["10.5", "1e308"])
def test_a_length_penalty_past_any_use_is_refused(long_targets_run, alpha):
    # ((5 + n) / 6)^alpha overflowed a float in beam search: an OverflowError traceback
    path, out = long_targets_run
    result = invoke("seq2seq", "translate", "--checkpoint", out, "1", "--beam-size", 2,
                    "--length-penalty", alpha)
    assert result.exit_code == 2 and "Invalid value for '--length-penalty'" in result.output
    assert "must be from 0 to 10" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("alpha", [1000.0, 10.5, -1.0, float("nan"), float("inf"), "0.6", True])
def test_the_library_refuses_a_length_penalty_past_any_use(long_targets_run, alpha):
    # the CLI capped --length-penalty at 10, but decoding.translate (and beam_search) took any
    # alpha from a script: 1000 ended in an OverflowError traceback, a string in a TypeError
    from tinyllm import decoding
    from tinyllm.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(long_targets_run[1]), kind="seq2seq")
    with pytest.raises(TinyLLMError, match="--length-penalty must be from 0 to 10"):
        decoding.translate(ckpt.params, ckpt.model_config, ckpt.tokenizer, ["1"], beam_size=2,
                           alpha=alpha, max_len=8)
    outputs = decoding.translate(ckpt.params, ckpt.model_config, ckpt.tokenizer, ["1"],
                                 beam_size=2, alpha=10.0, max_len=8)  # the bound itself is fine
    assert len(outputs) == 1


def test_line_breaks_in_pairs_and_outputs_are_printed_as_backslash_n(tmp_path, monkeypatch):
    # JSONL pairs may hold line breaks, and a model trained on them writes them: printed as they
    # were, one translation took two lines of `translate` output and of the --show listing
    from tinyllm import decoding

    path, out = tmp_path / "lines.jsonl", tmp_path / "run"
    path.write_text("".join(json.dumps({"source": f"a{i}\nb", "target": f"b\r\na{i}"}) + "\n"
                            for i in range(10)), encoding="utf-8")
    train(path, out, "--max-iters", 1)
    ids = []

    def emit(params, config, src, src_valid, bos, eos, max_len, use_cache):
        return [decoding.Output(ids, cut=False) for _ in src]

    monkeypatch.setattr(decoding, "greedy_decode", emit)
    from tinyllm.checkpoint import load_checkpoint

    ids[:] = load_checkpoint(str(out), kind="seq2seq").tokenizer.encode("b\r\na1")
    result = invoke("seq2seq", "translate", "--checkpoint", out, "a1\nb", "a2\nb")
    assert result.exit_code == 0, result.output
    assert result.stdout == "b\\r\\na1\nb\\r\\na1\n"  # one line per text
    result = invoke("seq2seq", "translate", "--checkpoint", out, "--data", path, "--show", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "a0\\nb -> b\\r\\na1  (reference: b\\r\\na0)", "a1\\nb -> b\\r\\na1  (reference: b\\r\\na1)",
        "10 pairs: exact match 10.0%, BLEU-4 0.0 (no reference has 4 words, so BLEU-4 is 0 by"
        " definition: use exact match)"]


@pytest.mark.parametrize("name, content, hint", [
    ("pairs.txt", '{"source": "a", "target": "b"}\n', "a JSONL file must be named .jsonl"),
    ("pairs.json", "a\tb\n", "a TSV file must not be named .jsonl or .json"),
    ("pairs.csv", "a,b\n", "a PAIRS file is TSV or JSONL, not CSV"),
])
def test_a_file_in_the_other_format_is_named_as_such(tmp_path, name, content, hint):
    # JSONL saved as pairs.txt was read as TSV and refused with "TSV or JSONL, not CSV" (its
    # commas), which sent the user away from the format the file was in
    path = tmp_path / name
    path.write_text(content * 3, encoding="utf-8")
    result = invoke("seq2seq", "train", "--data", path, "--out", tmp_path / "run", *TINY)
    assert_user_error(result, f"{path} line 1", hint)


def test_every_pair_too_long_for_the_context_is_counted_in_the_one_error(tmp_path):
    # the first one alone was named: a user mended a file of thousands one line per run
    path = tmp_path / "long.tsv"
    path.write_text("".join(f"{i}\t{'x' * (20 if i % 7 == 3 else 3)}\n" for i in range(30)),
                    encoding="utf-8")
    result = invoke("seq2seq", "train", "--data", path, "--out", tmp_path / "run", *TINY)
    assert_user_error(result, f"{path} line 4: the target has 20 tokens", "and 3 more bad records",
                      f"{path} line 11", f"{path} line 18", f"{path} line 25")
    assert not (tmp_path / "run").exists()
