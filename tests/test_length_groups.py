"""Tests for batches split by length (`finetune.length_groups`): the split itself, and that a
fine-tuning batch of groups has the loss and gradient of the same rows padded as one batch, for
classification (texts and their windows) and for instruction rows."""

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.finetune import (ClassifierConfig, init_classifier, instruction_example,
                              length_groups, make_windows)
from tinyllm import classify_run, instruct_run
from tinyllm.classify_run import (batch_groups, classification_evaluator,
                                  classification_loss_and_batches)
from tinyllm.instruct_run import instruct_evaluator, instruct_loss_and_batches, row_groups
from tinyllm.config import GPTConfig
from tinyllm.models import gpt_loss, init_gpt
from tinyllm.train import flat_value_and_grad
from tinyllm.tree import flatten


@pytest.fixture
def small_overhead(monkeypatch):
    """Groups even for the few-token rows of these tests (the default overhead, 64 tokens,
    would keep them in one)."""
    for run_module in (classify_run, instruct_run):
        monkeypatch.setattr(run_module, "length_groups",
                            lambda lengths: length_groups(lengths, overhead=2))


def group_cost(lengths, groups, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def test_length_groups_worked_example():
    groups = length_groups([3, 100, 4, 98], overhead=10)
    assert [g.tolist() for g in groups] == [[0, 2], [3, 1]]
    assert [g.tolist() for g in length_groups([3, 100, 4, 98], overhead=1000)] == [[0, 2, 3, 1]]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=24),
       overhead=st.integers(0, 200))
def test_length_groups_split_every_row_once_and_cost_the_least(lengths, overhead):
    groups = length_groups(lengths, overhead)
    rows = onp.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # each row in exactly one group
    ordered = [lengths[i] for i in rows]
    assert ordered == sorted(lengths)  # groups are runs of the rows sorted by length
    best = group_cost(lengths, groups, overhead)
    assert best <= group_cost(lengths, [rows], overhead)  # never worse than one padded batch
    cuts = range(1, len(lengths))  # every split into two runs, and into singletons
    for cut in cuts:
        assert best <= group_cost(lengths, [rows[:cut], rows[cut:]], overhead)
    assert best <= group_cost(lengths, [[i] for i in rows], overhead)


# ----------------------------------------------------------------------------- classification

CLS = ClassifierConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, n_classes=3,
                       bias=True)


def text_sets(config, seed=0):
    """Texts of 1 to 20 tokens (so some are read as several windows of 8) and their labels."""
    rng = onp.random.default_rng(seed)
    texts = [rng.integers(1, 13, size=n).tolist() for n in (1, 2, 3, 5, 7, 8, 9, 12, 20, 4)]
    windows, windowed, _ = make_windows(texts, config.block_size, max_windows=8)
    assert windowed >= 2
    y = rng.integers(0, config.n_classes, size=len(texts)).astype(onp.int32)
    return {"train": (windows, y), "val": (windows, y)}


@pytest.mark.parametrize("arch,pooling", [("decoder", "last"), ("encoder", "meanmax")])
def test_a_classification_batch_of_groups_has_the_loss_and_gradient_of_one_padded_batch(
        arch, pooling, small_overhead):
    config = ClassifierConfig(**{**CLS.__dict__, "arch": arch, "pooling": pooling}).validate()
    params = init_classifier(config, onp.random.default_rng(1))
    sets = text_sets(config)
    windows, y = sets["train"]
    loss_fn, _ = classification_loss_and_batches(sets, config, batch_size=6)
    texts = onp.array([0, 8, 1, 6, 8, 3])  # mixed lengths, one text twice, as a draw may be
    groups = batch_groups(windows, y, texts)
    assert len(groups) >= 2  # the test is about several groups
    for ids, valid, _, _ in groups:  # each group is cut to its own longest window
        assert valid.shape[1] == int(valid.sum(axis=1).max())
    one_batch = [(*windows.batch(texts), y[texts])]  # every row padded to the longest
    value_and_grad = flat_value_and_grad(loss_fn)
    loss_g, grads_g = value_and_grad(params, groups, None)
    loss_1, grads_1 = value_and_grad(params, one_batch, None)
    assert float(loss_g) == pytest.approx(float(loss_1), rel=1e-5)
    for path, g in flatten(grads_1).items():
        onp.testing.assert_allclose(flatten(grads_g)[path], g, rtol=1e-4, atol=1e-6)


def test_a_sampled_classification_batch_holds_the_drawn_texts(small_overhead):
    sets = text_sets(CLS)
    windows, y = sets["train"]
    _, sample = classification_loss_and_batches(sets, CLS, batch_size=12)
    batch = sample("train", onp.random.default_rng(5))
    drawn = onp.random.default_rng(5).integers(0, len(y), size=12)
    rows_seen = sum(len(assign) for _, _, assign, _ in batch)
    assert rows_seen == 12
    labels = onp.concatenate([labels for *_, labels in batch])
    assert sorted(labels.tolist()) == sorted(y[drawn].tolist())
    windows_seen = sum(len(ids) for ids, *_ in batch)
    assert windows_seen == int(windows.count[drawn].sum())


def test_the_classification_evaluation_is_the_mean_loss_over_the_split(small_overhead):
    config = CLS
    params = init_classifier(config, onp.random.default_rng(1))
    sets = text_sets(config)
    windows, y = sets["val"]
    loss_fn, _ = classification_loss_and_batches(sets, config, batch_size=4)
    whole = float(loss_fn(params, [(*windows.batch(onp.arange(len(y))), y)], None))
    assert classification_evaluator(sets, config, loss_fn)(params)["val"] == pytest.approx(
        whole, rel=1e-5)


# ----------------------------------------------------------------------------- instructions

GPT = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True)


def instruction_arrays(seed=0):
    """Rows of prompts and responses of several lengths, padded to the longest, as
    `encode_instructions` makes them."""
    rng = onp.random.default_rng(seed)
    rows = [instruction_example(rng.integers(1, 12, size=p).tolist(),
                                rng.integers(1, 12, size=r).tolist(), 12, GPT.block_size)
            for p, r in ((1, 1), (3, 2), (2, 9), (6, 6), (1, 4), (8, 7), (2, 2))]
    longest = max(int(m.nonzero()[0].max()) + 1 for _, _, m in rows)
    split = tuple(onp.stack([r[i][:longest] for r in rows]) for i in range(3))
    return {"train": split, "val": split}


def test_an_instruction_batch_of_groups_has_the_loss_and_gradient_of_one_padded_batch(
        small_overhead):
    params = init_gpt(GPT, onp.random.default_rng(2))
    arrays = instruction_arrays()
    loss_fn, _ = instruct_loss_and_batches(arrays, GPT, batch_size=5)
    rows = onp.array([5, 0, 3, 0, 2])
    groups = row_groups(arrays["train"], rows)
    assert len(groups) >= 2
    for x, y, m in groups:  # cut to the group's longest row: its last column counts a target
        assert m[:, -1].any()
    x, y, m = (a[rows] for a in arrays["train"])
    value_and_grad = flat_value_and_grad(loss_fn)
    loss_g, grads_g = value_and_grad(params, groups, None)
    one_batch = flat_value_and_grad(lambda p, batch, rng: gpt_loss(p, x, y, GPT, None, mask=m))
    loss_1, grads_1 = one_batch(params, None, None)  # every row padded to the longest
    assert float(loss_g) == pytest.approx(float(loss_1), rel=1e-5)
    for path, g in flatten(grads_1).items():
        onp.testing.assert_allclose(flatten(grads_g)[path], g, rtol=1e-4, atol=1e-6)


def test_the_instruction_evaluation_is_the_loss_per_response_token_over_the_split(
        small_overhead):
    params = init_gpt(GPT, onp.random.default_rng(2))
    arrays = instruction_arrays()
    loss_fn, _ = instruct_loss_and_batches(arrays, GPT, batch_size=5)
    x, y, m = arrays["val"]
    whole = float(gpt_loss(params, x, y, GPT, None, mask=m))
    assert instruct_evaluator(arrays, loss_fn)(params)["val"] == pytest.approx(whole, rel=1e-5)


def test_the_progress_counts_a_batchs_real_tokens_not_its_padding():
    windows, _, _ = make_windows([[1, 2], [3, 4, 5, 6], [7] * 10], 8, max_windows=8)
    # texts of 2, 4 and 10 tokens; the last is read as windows of 8 and 8 (starts 0 and 2)
    assert classify_run.real_tokens_per_batch(windows, 3) == round(3 * (2 + 4 + 16) / 3)
