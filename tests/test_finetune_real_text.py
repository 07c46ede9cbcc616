"""Tests for what makes fine-tuning work on real text: texts longer than the context read as
overlapping windows, instruction records that keep the end of their prompt, the best weights
kept with early stopping, the checks on a resumed run's data, and the wiring of the runners
(which mask, which LoRA scale, what the loss sees)."""

import json
import os

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import classify_run, finetune_runs, instruct_run
from tinyllm.checkpoint import load_checkpoint
from tinyllm.config import GPTConfig
from tinyllm.errors import TinyLLMError
from tinyllm.finetune import (ClassifierConfig, classifier_logits, fit_prompt,
                              init_classifier, instruction_example, make_windows, pad_batch,
                              predict_proba, predict_windows, window_starts)
from tinyllm.classify_run import ClassifySettings, classify_texts, run_classify
from tinyllm.instruct_run import InstructSettings, encode_instructions, run_instruct
from tinyllm.labelled_data import UNK_TOKEN
from tinyllm.tokenizers import CharTokenizer
from tinyllm.pretrain import SPECIAL_TOKENS

CFG = ClassifierConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, n_classes=2,
                       bias=True)


# ----------------------------------------------------------------------------- windows


def test_window_starts_worked_examples():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(9, 4, 2) == [0, 2, 4, 5]  # the last window ends at the last token
    assert window_starts(3, 4, 2) == [0] and window_starts(4, 4, 2) == [0]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), block=st.integers(1, 40), stride=st.integers(1, 40))
def test_windows_cover_every_token_and_fit_the_context(n, block, stride):
    stride = min(stride, block)  # windows never skip tokens when they overlap or touch
    starts = window_starts(n, block, stride)
    covered = set()
    for s in starts:
        assert 0 <= s and s + min(block, n) <= n
        covered.update(range(s, s + block))
    assert covered >= set(range(n))
    assert starts == sorted(set(starts))


def test_make_windows_counts_windowed_and_cut_texts():
    windows, windowed, cut = make_windows([list(range(1, 11)), [1, 2]], 4, max_windows=3)
    assert (windowed, cut) == (1, 1)  # the first text needs 4 windows: read 3, cut after them
    assert windows.count.tolist() == [3, 1] and windows.first.tolist() == [0, 3]
    assert windows.ids[:3].tolist() == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert windows.ids[3].tolist()[:2] == [1, 2] and windows.valid[3].tolist() == [1, 1, 0, 0]


def test_window_batch_averages_each_texts_windows():
    windows, _, _ = make_windows([list(range(1, 7)), [9]], 4, max_windows=8)  # 2 windows, 1
    ids, valid, assign = windows.batch(onp.array([1, 0]))
    assert ids.shape == (3, 4) and assign.tolist() == [[1, 0, 0], [0, 0.5, 0.5]]


@pytest.mark.parametrize("arch,pooling", [("decoder", "last"), ("decoder", "mean"),
                                          ("encoder", "mean"), ("encoder", "max"),
                                          ("encoder", "meanmax")])
@settings(max_examples=8, deadline=None)
@given(texts=st.lists(st.lists(st.integers(0, 10), min_size=1, max_size=8), min_size=1,
                      max_size=4),
       long_text=st.lists(st.integers(0, 10), min_size=9, max_size=30))
def test_texts_that_fit_get_exactly_the_single_window_result(arch, pooling, texts, long_text):
    """Windowing changes nothing for a text that fits the context, even batched with a long one:
    the same rows through the plain path (no averaging) give the same logits, bit for bit, and
    the text alone gives them up to the rounding of a differently padded matmul."""
    config = ClassifierConfig(**{**CFG.__dict__, "arch": arch, "pooling": pooling})
    params = init_classifier(config, onp.random.default_rng(0))
    windows, _, _ = make_windows(texts + [long_text], config.block_size, max_windows=8)
    ids, valid, assign = windows.batch(onp.arange(len(texts) + 1))
    windowed = classifier_logits(params, ids, valid, config, assign=assign)[:len(texts)]
    plain = classifier_logits(params, ids, valid, config)[:len(texts)]  # one row per text
    onp.testing.assert_array_equal(windowed, plain)
    for text, probs in zip(texts, predict_windows(params, windows, config)):
        alone = predict_proba(params, *pad_batch([text], len(text)), config)[0]
        onp.testing.assert_allclose(probs, alone, rtol=1e-5, atol=1e-6)


def test_a_long_texts_vector_is_the_mean_of_its_windows():
    params = init_classifier(CFG, onp.random.default_rng(1))
    text = list(onp.random.default_rng(2).integers(0, 11, 13))
    windows, _, _ = make_windows([text], 8, max_windows=8)  # starts 0, 4, 5
    ids, valid, assign = windows.batch(onp.array([0]))
    logits = classifier_logits(params, ids, valid, CFG, assign=assign)
    per_window = [classifier_logits(params, *pad_batch([text[s:s + 8]], 8), CFG)[0]
                  for s in (0, 4, 5)]
    # The head is linear, so the mean of the window vectors gives the mean of their logits.
    onp.testing.assert_allclose(logits[0], onp.mean(per_window, axis=0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- runs on a tiny base


ALPHABET = "abcdefghijklmnopqrstuvwxyzIR .:\n"  # the template needs I and R


@pytest.fixture(scope="module")
def base(tmp_path_factory, save_char_base):
    """A tiny 'pretrained' checkpoint: random weights, a char tokenizer, a 16-token context."""
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    return save_char_base(str(tmp_path_factory.mktemp("base")), ALPHABET, config)


def write_tsv(path, rows):
    path.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows),
                    encoding="utf-8")
    return str(path)


def test_a_cue_past_the_first_context_decides_after_training(base, tmp_path):
    """Every text starts with the same 20 letters (more than the 16-token context); the label is
    decided by the last letter alone, x or z. Read whole, the classifier learns it; a reader
    that cut texts to the context could not do better than chance."""
    rng = onp.random.default_rng(0)
    rows = []
    for i in range(160):
        label = "spam" if i % 2 else "ham"
        noise = "".join(rng.choice(list("abcdefgh"), 3))
        rows.append((label, "the same long start " + noise + (" x" if label == "spam" else " z")))
    data = write_tsv(tmp_path / "cue.tsv", rows)
    settings = ClassifySettings(checkpoint=base, data=data, max_iters=150, eval_interval=50,
                                lr=3e-3, batch_size=16, patience=0, seed=1)
    report = run_classify(str(tmp_path / "run"), settings, log=lambda *a: None)
    assert report["windowed_texts"] == 160 and report["cut_texts"] == 0
    assert report["accuracy_after"]["test"] >= 0.9
    params, config, tok, labels, max_windows = classify_run.load_classifier(str(tmp_path / "run"))
    assert max_windows == settings.max_windows
    start = "the same long start abc"
    probs = classify_texts(params, config, tok, [start + " x", start + " z"])
    assert [labels[i] for i in probs.argmax(axis=1)] == ["spam", "ham"]
    assert len(tok.encode(start)) > config.block_size  # the cue really is past the first window
    notes = []  # a text cut after --max-windows is said, not read short unseen
    classify_texts(params, config, tok, [start + " x", "x"], max_windows=1, log=notes.append)
    assert notes == ["note: 1 text(s) longer than 1 windows of 16 tokens (the run's --max-windows)"
                     " were read up to there only"]


def test_a_text_of_spaces_only_is_refused_as_in_a_training_file():
    tok = CharTokenizer.train("ab \n\t", special_tokens=SPECIAL_TOKENS)
    for texts in (["   "], ["ab", "\n\t "], [""]):
        with pytest.raises(TinyLLMError, match="cannot classify an empty text"):
            classify_texts(None, None, tok, texts)  # refused before the model is used


def test_every_text_too_long_even_for_windows_is_one_line(base, tmp_path):
    data = write_tsv(tmp_path / "long.tsv", [(("a", "b")[i % 2], "word " * 40) for i in range(30)])
    with pytest.raises(TinyLLMError, match=r"long\.tsv.*every text is longer than 2 windows"):
        run_classify(str(tmp_path / "r"), ClassifySettings(checkpoint=base, data=data,
                                                           max_windows=2), log=lambda *a: None)


def test_empty_text_is_one_line_naming_the_example(base, tmp_path):
    path = tmp_path / "e.jsonl"
    lines = [json.dumps({"text": "abc" if i != 4 else "", "label": "ab"[i % 2]}) for i in range(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TinyLLMError, match=r"e\.jsonl:5: empty 'text'"):
        run_classify(str(tmp_path / "r"), ClassifySettings(checkpoint=base, data=str(path), seed=3,
                                                           max_iters=2), log=lambda *a: None)


def test_empty_texts_are_counted_among_the_records_read_not_their_case_copies():
    tok = CharTokenizer.train("abcABC", special_tokens=SPECIAL_TOKENS)
    records = [("ab", "x"), ("", "y"), ("c", "x")]
    examples = records + [(t.upper(), y) for t, y in records] + [(t.lower(), y) for t, y in records]
    with pytest.raises(TinyLLMError, match=r"1 example\(s\) have empty text \(the first is example 2\)"):
        classify_run.encode_classification(tok, examples, ["x", "y"], 8, 2, "d.csv (train)",
                                            counted=len(records))


def test_best_weights_are_the_result_and_early_stopping_says_when(base, tmp_path, monkeypatch):
    """A val loss that gets worse after the first evaluation stops the run after `patience`
    evaluations, and the saved weights are those of that best evaluation."""
    data = write_tsv(tmp_path / "d.tsv", [("ab"[i % 2], f"text {'ab'[i % 2]} {i}")
                                           for i in range(60)])
    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    real = classify_run.classification_evaluator

    def rising(sets, config, loss_fn, *world):
        inner = real(sets, config, loss_fn, *world)
        return lambda params: {"train": inner(params)["train"], "val": next(losses)}

    monkeypatch.setattr(classify_run, "classification_evaluator", rising)
    kept = {}
    real_save = finetune_runs.atomic_save_npz

    def spy(path, arrays):
        kept.update(arrays)
        return real_save(path, arrays)

    monkeypatch.setattr(finetune_runs, "atomic_save_npz", spy)
    out = str(tmp_path / "run")
    report = run_classify(out, ClassifySettings(checkpoint=base, data=data, max_iters=20,
                                                eval_interval=2, patience=2, lr=1e-2),
                          log=lambda *a: None)
    assert report["best_iter"] == 0 and report["iterations"] == 4  # evals at 0, 2, 4: stop
    assert int(kept["_iter"]) == 0 and not os.path.exists(os.path.join(out, "best.npz"))
    ckpt = load_checkpoint(out, kind="classifier")
    assert ckpt.meta["best_iter"] == 0
    onp.testing.assert_array_equal(ckpt.params["cls_head"]["w"], kept["cls_head.w"])
    onp.testing.assert_array_equal(ckpt.params["h"][0]["mlp"]["c_fc"]["w"], kept["h.0.mlp.c_fc.w"])


def test_resume_refuses_changed_data(base, tmp_path):
    rows = [("ab"[i % 2], f"text {i}") for i in range(40)]
    data = write_tsv(tmp_path / "d.tsv", rows)
    out = str(tmp_path / "run")
    run_classify(out, ClassifySettings(checkpoint=base, data=data, max_iters=2, eval_interval=2),
                 log=lambda *a: None)
    write_tsv(tmp_path / "d.tsv", rows[:-1] + [("a", "changed")])
    with pytest.raises(TinyLLMError, match="changed since it began"):
        run_classify(out, resume=True, max_iters=4, log=lambda *a: None)


def test_resumed_report_keeps_the_base(base, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("ab"[i % 2], f"text {i}") for i in range(40)])
    out = str(tmp_path / "run")
    run_classify(out, ClassifySettings(checkpoint=base, data=data, max_iters=2, eval_interval=2),
                 log=lambda *a: None)
    report = run_classify(out, resume=True, max_iters=4, log=lambda *a: None)
    assert report["base"] == os.path.abspath(base) and report["random_init"] is False
    assert report["iterations"] == 4


@pytest.mark.parametrize("field,value,flag", [
    ("lora_alpha", -1.0, "--lora-alpha"), ("epochs", float("nan"), "--epochs"),
    ("epochs", 0.0, "--epochs"), ("lora_rank", -2, "--lora-rank"), ("lr", float("inf"), "--lr"),
    ("patience", -1, "--patience"), ("max_windows", 0, "--max-windows"), ("seed", -1, "--seed")])
def test_bad_settings_name_their_flag(field, value, flag):
    with pytest.raises(TinyLLMError, match=flag):
        ClassifySettings(**{field: value}).validate()


# ----------------------------------------------------------------------------- instructions


def test_fit_prompt_keeps_the_end_of_the_prompt():
    assert fit_prompt([1, 2, 3, 4], [5], 4) == [2, 3, 4]  # stream 2 3 4 5 eot: 5 = 4 + 1 tokens
    assert fit_prompt([1, 2], [5], 4) == [1, 2]
    assert fit_prompt([1, 2], [5, 6, 7, 8], 4) is None  # response + eot leave no prompt token
    x, y, m = instruction_example(fit_prompt([1, 2, 3, 4], [5], 4), [5], 9, 4)
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 9] and m.tolist() == [0, 0, 1, 1]


def test_long_instruction_records_are_shortened_and_counted_never_skipped():
    tok = CharTokenizer.train(ALPHABET + "IRnpstuoe", special_tokens=SPECIAL_TOKENS)
    records = [{"instruction": "say it", "input": "a" * 40, "output": "ok"},
               {"instruction": "say", "input": "", "output": "fine"}]
    (x, y, m), shortened, fallback = encode_instructions(tok, records, 32, False, "t.jsonl")
    assert shortened == 1 and fallback == 0 and len(x) == 2
    eot = tok.special_tokens["<|endoftext|>"]
    row = x[0][m[0] > 0].tolist()  # inputs at the response targets: the last prompt token on
    assert tok.decode(y[0][m[0] > 0].tolist()[:-1]) == "ok" and y[0][m[0] > 0][-1] == eot
    assert tok.decode(x[0].tolist()).endswith("Response: ok") and len(row) == 3


def test_test_prompts_cut_for_generation_are_counted():
    tok = CharTokenizer.train(ALPHABET + "IRnpstuoe", special_tokens=(*SPECIAL_TOKENS, UNK_TOKEN))
    records = [{"instruction": "say it", "input": "a" * 40 + "é", "output": "ok"},
               {"instruction": "say", "input": "", "output": "fine"}]
    prompts, limits, shortened, fallback = instruct_run.generation_prompts(tok, records, 4, 32)
    assert limits == [4, 4] and [len(p) for p in prompts] == [28, len("Instruction: say\nResponse: ")]
    assert tok.decode(prompts[0]).endswith("a<|unk|>\nResponse: ")  # the end of the prompt kept
    assert (shortened, fallback) == (1, 1)


def test_a_response_longer_than_the_context_is_one_line():
    tok = CharTokenizer.train(ALPHABET + "IRnpstuoe", special_tokens=SPECIAL_TOKENS)
    records = [{"instruction": "say", "input": "", "output": "o" * 40}]
    with pytest.raises(TinyLLMError, match=r"t\.jsonl \(train\): record 1: its response alone"):
        encode_instructions(tok, records, 32, False, "t.jsonl (train)")
    # a record read from a file is named by its line there, not by its place in a shuffled split
    records = [{"instruction": "say", "input": "", "output": "ok", "line": 4},
               {"instruction": "say", "input": "", "output": "o" * 40, "line": 9}]
    with pytest.raises(TinyLLMError, match=r"^t\.jsonl:9: its response alone has 40 tokens"):
        encode_instructions(tok, records, 32, False, "t.jsonl")
    # every such record is counted, so that a large file is mended in one pass
    records += [{"instruction": "say", "input": "", "output": "o" * n, "line": n} for n in (50, 60)]
    for check in (lambda: encode_instructions(tok, records, 32, False, "t.jsonl"),
                  lambda: instruct_run.check_responses_fit(tok, records, 32, "t.jsonl")):
        with pytest.raises(TinyLLMError, match=r"^t\.jsonl:9: its response alone has 40 tokens.*"
                           r" \(and 2 more bad records: t\.jsonl:50: .*; t\.jsonl:60: "):
            check()


def test_skip_long_refuses_a_split_it_would_empty():
    tok = CharTokenizer.train(ALPHABET + "IRnpstuoe", special_tokens=SPECIAL_TOKENS)
    fits, long = ({"instruction": "say", "input": "", "output": o} for o in ("ok", "o" * 40))
    kept, skipped = instruct_run.without_long_responses(tok, ([fits, long], [fits], [long, fits]),
                                                        32, lambda m: None)
    assert kept == ([fits], [fits], [fits]) and skipped == {"train": 1, "val": 0, "test": 1}
    with pytest.raises(TinyLLMError, match=r"^--skip-long: every val record has a response longer"
                       r" than the context \(32 tokens\)$"):
        instruct_run.without_long_responses(tok, ([fits], [long], [fits]), 32, lambda m: None)


@pytest.fixture
def instructions(tmp_path):
    path = tmp_path / "i.jsonl"
    recs = [{"instruction": "copy", "input": "ab" * (i % 12), "output": "ab"} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return str(path)


def test_instruction_loss_gets_the_response_mask(base, instructions, tmp_path, monkeypatch):
    """What the runner passes down: the loss sees the response-only mask built for each row."""
    seen = []
    real = instruct_run.gpt_loss

    def spy(params, ids, targets, config, rng=None, mask=None):
        seen.append((ids, mask))
        return real(params, ids, targets, config, rng, mask=mask)

    monkeypatch.setattr(instruct_run, "gpt_loss", spy)
    out = str(tmp_path / "r")
    run_instruct(out, InstructSettings(checkpoint=base, data=instructions, max_iters=2,
                                       eval_interval=2, max_new_tokens=4), log=lambda *a: None)
    assert seen and all(mask is not None for _, mask in seen)
    ids, mask = seen[-1]
    tok = load_checkpoint(out).tokenizer
    for row, m in zip(onp.asarray(ids), onp.asarray(mask)):
        first = int(onp.argmax(m > 0))  # the first counted position: the last prompt token
        assert tok.decode(row[:first + 1].tolist()).endswith("Response: ")
        assert m[:first].sum() == 0 and m[first:].min() in (0, 1)


def test_lora_instruction_tuning_trains_at_alpha_over_rank(base, instructions, tmp_path,
                                                           monkeypatch):
    """The adapters are applied in training at the scale generation merges them with."""
    scales = []
    real = instruct_run.apply_lora

    def spy(params, scale):
        scales.append(scale)
        return real(params, scale)

    monkeypatch.setattr(instruct_run, "apply_lora", spy)
    out = str(tmp_path / "r")
    run_instruct(out, InstructSettings(checkpoint=base, data=instructions, max_iters=2,
                                       eval_interval=2, lora_rank=4, lora_alpha=2.0,
                                       max_new_tokens=4), log=lambda *a: None)
    assert scales and set(scales) == {0.5}
    ckpt = load_checkpoint(out, kind="gpt-lora")
    assert ckpt.model_config.lora_alpha / ckpt.model_config.lora_rank == 0.5


def test_instruct_report_has_the_base_validation_loss(base, instructions, tmp_path):
    out = str(tmp_path / "r")
    report = run_instruct(out, InstructSettings(checkpoint=base, data=instructions, max_iters=4,
                                                eval_interval=2, max_new_tokens=4),
                          log=lambda *a: None)
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert first["iter"] == 0 and report["val_loss_before"] == first["val_loss"]
    assert report["best_val_loss"] <= report["val_loss_before"]
    # Every prompt ("Instruction: copy\n...Response: ") is longer than the 16-token context.
    records = report["records"]
    assert report["shortened_records"] == records  # test prompts too, to leave room to respond
    assert len(open(os.path.join(out, "responses.jsonl")).readlines()) == report["records"]["test"]


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_work(base, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("ab"[i % 2], f"text {i}") for i in range(40)])
    out = tmp_path / "run"
    with pytest.raises(TinyLLMError, match=r"--batch-size 1000000 .*GB of memory"):
        run_classify(str(out), ClassifySettings(checkpoint=base, data=data, batch_size=1_000_000),
                     log=lambda *a: None)
    assert not out.exists() or not os.listdir(out)


def test_resume_names_a_setting_of_the_wrong_type(base, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("ab"[i % 2], f"text {i}") for i in range(40)])
    out = tmp_path / "run"
    run_classify(str(out), ClassifySettings(checkpoint=base, data=data, max_iters=2,
                                            eval_interval=2), log=lambda *a: None)
    meta = json.loads((out / "config.json").read_text())
    meta["finetune"]["seed"] = "one"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(TinyLLMError, match="wrong type"):
        run_classify(str(out), resume=True, max_iters=4, log=lambda *a: None)


def test_a_label_list_in_a_message_stays_short():
    assert classify_run.shown_labels(["ham", "spam"]) == "'ham', 'spam'"
    many = [f"comment {i}" for i in range(300)]  # the text column read as labels by mistake
    assert classify_run.shown_labels(many, most=2) == "'comment 0', 'comment 1', ... (300 classes)"
    assert classify_run.shown_label("x" * 100, width=10) == "'xxxxxxx...'"
    tok = CharTokenizer.train("abc", special_tokens=SPECIAL_TOKENS)
    for label in ("new", "a long comment " * 20):
        with pytest.raises(TinyLLMError) as err:
            classify_run.encode_classification(tok, [("a", label)], [m * 20 for m in many], 8, 2,
                                               "d.csv (val)")
        assert "is not one the model was trained on" in str(err.value)
        assert len(str(err.value)) < 600


def test_windows_longest_first_worked_example():
    # lengths 2, 5, 3 and a 12-token text whose first window (8 tokens) is its longest
    windows, _, _ = make_windows([[1, 2], [1, 2, 3, 4, 5], [1, 2, 3], list(range(12))], 8, 8)
    assert list(windows.longest_first()) == [3, 1, 2, 0]
    assert list(windows.head(2).longest_first()) == [1, 0]


@pytest.mark.parametrize("stored,earlier", [(12.5, 12.5), (0, 0.0), (None, None), ("12", None),
                                            (True, None), (float("nan"), None), (-1, None),
                                            (10 ** 400, None)])
def test_a_resumed_runs_earlier_training_time_is_a_number_or_unknown(stored, earlier):
    """config.json is untrusted: its "train_seconds" counts only as a finite time >= 0."""
    from types import SimpleNamespace

    meta = {} if stored is None else {"train_seconds": stored}
    clock = finetune_runs.run_clock(SimpleNamespace(meta=meta))
    assert clock.earlier == earlier
    clock.stop()
    assert clock.total() == (None if earlier is None else round(earlier + clock.part(), 1))
    assert finetune_runs.run_clock().earlier == 0.0  # a new run
