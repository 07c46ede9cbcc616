"""Tests for tinyllm/finetune.py: pooling, padding invariance, the classifier head, freezing,
instruction rows and loss masking, and the metrics."""

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.errors import TinyLLMError
from tinyllm.finetune import (ClassifierConfig, classifier_from_gpt, classifier_logits,
                              classifier_loss, confusion_matrix, format_prompt,
                              init_classifier, instruction_example, merge_params, pad_batch, pool,
                              precision_recall, split_params, token_f1, trainable_paths)
from tinyllm.models import gpt_loss
from tinyllm.train import flat_value_and_grad
from tinyllm.tree import flatten

CFG = ClassifierConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, n_classes=3,
                       bias=True)


def make(config=CFG, seed=0):
    return init_classifier(config, onp.random.default_rng(seed))


def test_pool_worked_example():
    hidden = onp.array([[[1.0], [2.0], [9.0]]], dtype=onp.float32)
    valid = onp.array([[1, 1, 0]], dtype=onp.float32)
    assert pool(hidden, valid, "last").tolist() == [[2.0]]
    assert pool(hidden, valid, "mean").tolist() == [[1.5]]
    assert pool(hidden, valid, "max").tolist() == [[2.0]]
    assert pool(hidden, valid, "meanmax").tolist() == [[1.75]]
    assert pool(hidden, valid, "first").tolist() == [[1.0]]


def test_max_pooling_takes_each_channels_maximum_and_sends_its_gradient_there():
    from autograd import grad

    hidden = onp.array([[[1.0, 5.0], [3.0, -2.0], [9.0, 9.0]]])  # (B=1, T=3, C=2)
    valid = onp.array([[1, 1, 0]])  # the last position is padding
    assert pool(hidden, valid, "max").tolist() == [[3.0, 5.0]]
    weights = onp.array([[10.0, 100.0]])
    g = grad(lambda h: (pool(h, valid, "max") * weights).sum())(hidden)
    assert g.tolist() == [[[0.0, 100.0], [10.0, 0.0], [0.0, 0.0]]]


@pytest.mark.parametrize("arch,pooling", [("decoder", "last"), ("decoder", "mean"),
                                          ("decoder", "max"), ("encoder", "mean"),
                                          ("encoder", "max"), ("encoder", "meanmax"),
                                          ("encoder", "first")])
@settings(max_examples=10, deadline=None)
@given(tokens=st.lists(st.integers(0, 10), min_size=1, max_size=5),
       pad=st.lists(st.integers(0, 10), min_size=3, max_size=3))
def test_padding_never_changes_the_prediction(arch, pooling, tokens, pad):
    config = ClassifierConfig(**{**CFG.__dict__, "arch": arch, "pooling": pooling})
    params = make(config)
    short_ids, short_valid = pad_batch([tokens], len(tokens))
    long_ids, long_valid = pad_batch([tokens], len(tokens) + 3)
    long_ids[0, len(tokens):] = pad  # whatever sits in the padding slots
    a = classifier_logits(params, short_ids, short_valid, config)
    b = classifier_logits(params, long_ids, long_valid, config)
    assert onp.allclose(a, b, atol=1e-5)


def test_logits_shape_and_dtype():
    ids, valid = pad_batch([[1, 2, 3], [4]], 4)
    logits = classifier_logits(make(), ids, valid, CFG)
    assert logits.shape == (2, 3) and logits.dtype == onp.float32


def test_head_replaces_the_lm_head():
    from dataclasses import replace

    from tinyllm.models import init_gpt

    gpt = init_gpt(replace(CFG.gpt(), tie_weights=False), onp.random.default_rng(0))
    params = classifier_from_gpt(gpt, CFG, onp.random.default_rng(1))
    assert "lm_head" not in params and params["cls_head"]["w"].shape == (16, 3)
    assert params["wte"] is gpt["wte"]  # the body is the pretrained one


def test_config_rejects_first_token_pooling_for_a_decoder():
    with pytest.raises(TinyLLMError, match="--pooling first"):
        ClassifierConfig(**{**CFG.__dict__, "pooling": "first"}).validate()


def test_freeze_options():
    params = make()
    everything = trainable_paths(params, "none", 2)
    head = trainable_paths(params, "all", 2)
    last = trainable_paths(params, "all-but-1", 2)
    assert set(head) == {"cls_head.w", "cls_head.b"}
    assert all(p.startswith(("h.1.", "ln_f.", "cls_head.")) for p in last)
    assert any(p.startswith("h.1.") for p in last) and not any(p.startswith("h.0.") for p in last)
    assert len(everything) == len(flatten(params))
    with pytest.raises(TinyLLMError, match="--freeze"):
        trainable_paths(params, "some", 2)


def test_split_and_merge_round_trip():
    params = make()
    trainable, frozen = split_params(params, trainable_paths(params, "all-but-1", 2))
    merged = merge_params(trainable, frozen)
    assert flatten(merged).keys() == flatten(params).keys()
    assert all(onp.array_equal(flatten(merged)[k], v) for k, v in flatten(params).items())


def test_gradient_of_frozen_training_reaches_only_trainable_paths():
    params = make()
    trainable, frozen = split_params(params, trainable_paths(params, "all", 2))
    ids, valid = pad_batch([[1, 2], [3, 4, 5]], 3)
    labels = onp.array([0, 2], dtype=onp.int32)
    value_and_grad = flat_value_and_grad(  # as the training loop differentiates
        lambda t, batch, rng: classifier_loss(merge_params(t, frozen), *batch, CFG))
    _, grads = value_and_grad(trainable, (ids, valid, labels), None)
    assert set(grads) == {"cls_head"} and onp.abs(grads["cls_head"]["w"]).sum() > 0


def test_format_prompt_with_and_without_input():
    assert format_prompt({"instruction": "reverse", "input": "abc"}) == \
        "Instruction: reverse\nInput: abc\nResponse: "
    assert format_prompt({"instruction": "say hi", "input": ""}) == "Instruction: say hi\nResponse: "


def test_instruction_example_worked_example():
    x, y, m = instruction_example([1, 2], [3], 9, 4)
    assert x.tolist() == [1, 2, 3, 0] and y.tolist() == [2, 3, 9, 0] and m.tolist() == [0, 1, 1, 0]
    _, _, m_all = instruction_example([1, 2], [3], 9, 4, include_prompt=True)
    assert m_all.tolist() == [1, 1, 1, 0]
    assert instruction_example([1, 2, 3], [4, 5], 9, 4) is None  # 6 tokens need 5 positions


def test_loss_ignores_prompt_and_padding_targets():
    from tinyllm.models import init_gpt

    gpt_cfg = CFG.gpt()
    params = init_gpt(gpt_cfg, onp.random.default_rng(0))
    x, y, m = (a[None] for a in instruction_example([1, 2, 3], [4, 5], 9, 8))
    y_other = y.copy()
    y_other[0, 0] = 7  # change a prompt target
    y_other[0, 6:] = 3  # and padding targets
    a = float(gpt_loss(params, x, y, gpt_cfg, mask=m))
    b = float(gpt_loss(params, x, y_other, gpt_cfg, mask=m))
    assert a == pytest.approx(b)
    y_resp = y.copy()
    y_resp[0, 3] = 1  # a response target does count
    assert float(gpt_loss(params, x, y_resp, gpt_cfg, mask=m)) != pytest.approx(a)


def test_confusion_and_precision_recall_worked_example():
    matrix = confusion_matrix([0, 0, 1], [0, 1, 1], 2)
    assert matrix.tolist() == [[1, 1], [0, 1]]
    precision, recall = precision_recall(matrix)
    assert precision == [1.0, 0.5] and recall == [0.5, 1.0]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=30))
def test_confusion_matrix_counts_every_example(pairs):
    true, pred = zip(*pairs)
    matrix = confusion_matrix(true, pred, 4)
    assert matrix.sum() == len(pairs)
    assert onp.trace(matrix) == sum(t == p for t, p in pairs)


def test_token_f1():
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert token_f1("CAT DOG", "CAT DOG") == 1.0 and token_f1("", "x") == 0.0


@given(st.text(alphabet="abc ", max_size=12), st.text(alphabet="abc ", max_size=12))
def test_token_f1_is_symmetric_and_bounded(a, b):
    assert token_f1(a, b) == pytest.approx(token_f1(b, a))
    assert 0.0 <= token_f1(a, b) <= 1.0


def test_classifier_loss_stays_float32():
    ids, valid = pad_batch([[1, 2, 3], [4]], 3)
    for pooling in ("last", "mean", "max", "meanmax"):
        config = ClassifierConfig(**{**CFG.__dict__, "pooling": pooling})
        loss = classifier_loss(make(config), ids, valid, onp.array([0, 1], onp.int32), config)
        assert onp.asarray(loss).dtype == onp.float32


@pytest.mark.parametrize("epochs,accum,ranks,steps", [
    (1, 1, 1, 11), (1, 2, 1, 6), (1, 2, 2, 3), (2.5, 1, 1, 27), (0.01, 1, 1, 1)])
def test_an_epoch_is_the_records_over_the_examples_a_step_takes(epochs, accum, ranks, steps):
    """42 records, batch 4: a step takes 4 examples on each of grad_accum micro-batches on each
    MPI rank, and --epochs E is ceil(E * 42 / that) steps (at least one)."""
    from tinyllm.classify_run import ClassifySettings
    from tinyllm.finetune_runs import make_train_config

    settings = ClassifySettings(epochs=epochs, batch_size=4, grad_accum=accum, lr=5e-4,
                                warmup_iters=20)
    assert make_train_config(settings, 42, ranks).max_iters == steps


def test_an_instruct_run_counts_the_characters_read_as_unk_in_each_split(tmp_path, save_char_base):
    # before, metrics.json of an instruct run kept no count of them (a classify run's did)
    import json

    from tinyllm.config import GPTConfig
    from tinyllm.instruct_run import InstructSettings, run_instruct

    alphabet = "abcdefghijklmnopqrstuvwxyzIR :\n"  # the template's letters, no accents
    base = save_char_base(str(tmp_path / "base"), alphabet,
                          GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16))
    files = {}
    for name, n, text in (("train", 8, "é"), ("val", 2, "ü"), ("test", 2, "ñ")):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"instruction": "copy", "input": "a" + text,
                                                   "output": text}) + "\n" for _ in range(n)),
                               encoding="utf-8")
    settings = InstructSettings(checkpoint=base, data=str(files["train"]),
                                val_data=str(files["val"]), test_data=str(files["test"]),
                                max_iters=1, eval_interval=1, batch_size=2, max_new_tokens=2)
    notes = []
    report = run_instruct(str(tmp_path / "run"), settings, log=notes.append)
    # train and val: input and output (2 a record); test: the prompt only (1 a record)
    assert report["fallback_characters"] == {"train": 16, "val": 4, "test": 2}
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert stored["fallback_characters"] == report["fallback_characters"]
    assert "note: 16 character(s) in train fell back to <|unk|>" in notes


def test_an_instruct_run_counts_the_test_references_a_response_cannot_reach(tmp_path,
                                                                           save_char_base):
    # before, a reference longer than --max-new-tokens let its response be cut short unsaid, and
    # its exact match could only be 0
    import json

    from tinyllm.config import GPTConfig
    from tinyllm.instruct_run import InstructSettings, run_instruct

    base = save_char_base(str(tmp_path / "base"), "abcdefghijklmnopqrstuvwxyzIR :\n",
                          GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16))
    files = {}
    for name, outputs in (("train", ["ab"] * 8), ("val", ["ab"] * 2), ("test", ["ab", "abcdefg"])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"instruction": "say", "output": out}) + "\n"
                                       for out in outputs), encoding="utf-8")
    settings = InstructSettings(checkpoint=base, data=str(files["train"]),
                                val_data=str(files["val"]), test_data=str(files["test"]),
                                max_iters=1, eval_interval=1, batch_size=2, max_new_tokens=4)
    notes = []
    report = run_instruct(str(tmp_path / "run"), settings, log=notes.append)
    assert report["test_references_cut"] == 1  # "abcdefg": 7 tokens, a response at most 4
    assert any(n.startswith("note: 1 test record(s) have a reference longer") for n in notes)
    rows = (tmp_path / "run" / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and len(json.loads(rows[1])["response"]) <= 4
