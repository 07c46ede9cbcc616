"""The fast training path (tinyllm/fast.py) against autograd on the reference model: the same loss
and every gradient, over random shapes, with and without biases, tied and untied; and the wiring:
`tinyllm pretrain` trains on the fast path, and `--no-fast` or dropout on the reference one."""

import json
import threading
import time
from dataclasses import replace
from unittest import mock

import autograd
import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import fast, ops, system
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.mlm import mlm_loss
from tinyllm.models import gpt_loss, init_gpt
from tinyllm.optim import adamw_init
from tinyllm.train import flat_value_and_grad, train_step
from tinyllm.tree import flatten, tree_map


def random_model(seed, vocab, n_layer, n_head, head_size, block, bias, tie, dtype):
    """A GPT whose every parameter is perturbed (so gains are not all 1 and biases not all 0)."""
    config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * head_size, bias=bias, tie_weights=tie)
    rng = onp.random.default_rng(seed)
    params = init_gpt(config, rng, dtype=dtype)
    params = tree_map(lambda p: (p + 0.3 * rng.standard_normal(p.shape)).astype(dtype), params)
    return config, params, rng


def reference_loss_and_grads(params, ids, targets, config):
    return autograd.value_and_grad(lambda p: gpt_loss(p, ids, targets, config))(params)


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "vocab": st.integers(2, 13), "n_layer": st.integers(1, 2),
    "n_head": st.integers(1, 3), "head_size": st.integers(1, 5), "block": st.integers(1, 9),
    "batch": st.integers(1, 3), "bias": st.booleans(), "tie": st.booleans(),
    # query rows per block of causal attention (fast.ATTENTION_BLOCK, 64 in use): small here, so
    # that contexts of a few tokens are split into blocks, evenly or not, or are one block
    "attention_block": st.integers(1, 10),
})


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_loss_and_every_gradient_equal_autograd_on_the_reference_in_float64(s):
    config, params, rng = random_model(s["seed"], s["vocab"], s["n_layer"], s["n_head"],
                                       s["head_size"], s["block"], s["bias"], s["tie"], "float64")
    t = int(rng.integers(1, s["block"] + 1))  # any length up to the context
    ids = rng.integers(0, s["vocab"], (s["batch"], t))
    targets = rng.integers(0, s["vocab"], (s["batch"], t))
    want_loss, want = reference_loss_and_grads(params, ids, targets, config)
    with mock.patch.object(fast, "ATTENTION_BLOCK", s["attention_block"]):
        loss, grads = fast.gpt_loss_and_grads(params, ids, targets, config)
        assert fast.gpt_loss_and_grads(params, ids, targets, config, backward=False) == (loss,
                                                                                         None)
    assert abs(loss - float(want_loss)) < 1e-10
    want, got = flatten(want), flatten(grads)
    assert list(got) == list(want)  # the same tree, in the same order
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert onp.allclose(got[name], want[name], rtol=1e-8, atol=1e-11), name


def test_query_blocks_worked_example():
    """The docstring's example: causal rows in blocks of 64, each with the keys up to its last
    row; without the causal mask, one block of every row and key."""
    assert fast.query_blocks(150, causal=True) == [
        (slice(0, 64), 64), (slice(64, 128), 128), (slice(128, 150), 150)]
    assert fast.query_blocks(64, causal=True) == [(slice(0, 64), 64)]
    assert fast.query_blocks(150, causal=False) == [(slice(0, 150), 150)]


def test_a_model_big_enough_to_be_split_over_two_cores_equals_autograd():
    """Layer norms, attention, GELU and AdamW split their rows over two cores above 32k
    elements (ops.on_two_cores); at this size every one of them is split."""
    config, params, rng = random_model(5, 11, 1, 4, 32, 64, True, True, "float64")
    ids, targets = rng.integers(0, 11, (8, 64)), rng.integers(0, 11, (8, 64))
    want_loss, want = reference_loss_and_grads(params, ids, targets, config)
    loss, grads = fast.gpt_loss_and_grads(params, ids, targets, config)
    assert abs(loss - float(want_loss)) < 1e-10
    for name, value in flatten(want).items():
        assert onp.allclose(flatten(grads)[name], value, rtol=1e-8, atol=1e-11), name


@pytest.mark.parametrize("bias,tie", [(False, True), (True, False)])
def test_float32_stays_float32_and_matches_float64_to_rounding(bias, tie):
    config, params64, rng = random_model(0, 65, 2, 4, 8, 16, bias, tie, "float64")
    params32 = tree_map(lambda p: p.astype("float32"), params64)
    ids, targets = rng.integers(0, 65, (4, 16)), rng.integers(0, 65, (4, 16))
    loss64, grads64 = fast.gpt_loss_and_grads(params64, ids, targets, config)
    loss32, grads32 = fast.gpt_loss_and_grads(params32, ids, targets, config)
    assert abs(loss32 - loss64) < 1e-5 * abs(loss64)
    for name, g in flatten(grads32).items():
        assert g.dtype == onp.float32, name  # no float64 crept in
        want = flatten(grads64)[name]
        assert onp.allclose(g, want, rtol=1e-3, atol=1e-4 * onp.abs(want).max()), name


def test_inputs_are_left_unchanged():
    config, params, rng = random_model(1, 7, 2, 2, 4, 8, True, True, "float32")
    before = {k: v.copy() for k, v in flatten(params).items()}
    ids, targets = rng.integers(0, 7, (2, 8)), rng.integers(0, 7, (2, 8))
    fast.gpt_loss_and_grads(params, ids, targets, config)
    assert all(onp.array_equal(v, before[k]) for k, v in flatten(params).items())


def test_only_dropout_zero_is_supported():
    assert fast.supports(GPTConfig(dropout=0.0))
    assert not fast.supports(GPTConfig(dropout=0.1))
    with pytest.raises(ValueError):
        fast.gpt_value_and_grad(GPTConfig(dropout=0.1))


@pytest.mark.parametrize("grad_clip,weight_decay", [(0.05, 0.1), (0.0, 0.0), (100.0, 0.3)])
def test_training_steps_equal_the_reference_steps(grad_clip, weight_decay):
    """Three steps of the fast step (flat-buffer AdamW) against `train.train_step` on autograd's
    gradients, float64: the same weights, moments, losses and norms; the inputs untouched."""
    config, params, rng = random_model(3, 9, 2, 2, 3, 8, True, False, "float64")
    tc = TrainConfig(grad_clip=grad_clip, weight_decay=weight_decay, beta2=0.95)
    reference = flat_value_and_grad(lambda p, batch, r: gpt_loss(p, batch[0], batch[1], config))
    fast_step = fast.gpt_train_step(config)
    want = got = (params, adamw_init(params))
    for lr in (1e-2, 3e-2, 2e-2):
        batch = (rng.integers(0, 9, (2, 8)), rng.integers(0, 9, (2, 8)))
        got_before = got[0]
        before = {k: v.copy() for k, v in flatten(got_before).items()}
        *want, want_loss, want_norm = train_step(reference, *want, batch, lr, tc, None)
        *got, loss, norm = fast_step(*got, batch, lr, tc, None)
        assert all(onp.array_equal(v, before[k]) for k, v in flatten(got_before).items())
        assert abs(loss - want_loss) < 1e-10 and abs(norm - want_norm) < 1e-9 * want_norm
        assert got[1]["step"] == want[1]["step"]
        for name in ("params", "m", "v"):
            w = flatten(want[0] if name == "params" else want[1][name])
            g = flatten(got[0] if name == "params" else got[1][name])
            assert list(g) == list(w), name  # the same tree, in the same order
            for path in w:  # (the key bias's gradient is 0 up to rounding, whose noise Adam
                # scales up to ~lr 1e-9: hence the absolute tolerance)
                assert onp.allclose(g[path], w[path], rtol=1e-8, atol=1e-9), (name, path)


def test_a_training_step_from_a_state_it_did_not_make_reads_that_state():
    """A step handed trees other than those it returned last (a resumed checkpoint) must use
    them, not the buffers it kept."""
    config, params, rng = random_model(4, 7, 1, 2, 2, 4, False, True, "float32")
    tc = TrainConfig()
    step = fast.gpt_train_step(config)
    batch = (rng.integers(0, 7, (2, 4)), rng.integers(0, 7, (2, 4)))
    state = (params, adamw_init(params))
    first = step(*state, batch, 1e-2, tc, None)
    other = tree_map(lambda p: p * 0.5, params)  # a different state
    want = fast.gpt_train_step(config)(other, adamw_init(other), batch, 1e-2, tc, None)
    got = step(other, adamw_init(other), batch, 1e-2, tc, None)
    assert first[2] != got[2]
    for path, value in flatten(want[0]).items():
        assert onp.array_equal(flatten(got[0])[path], value), path


# ----------------------------------------------------------------------------- wiring

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 20
TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--block-size", "16", "--batch-size", "4", "--eval-iters", "1", "--max-iters", "4",
        "--eval-interval", "2", "--sample-tokens", "0"]


@pytest.fixture
def counted_fast_path(monkeypatch):
    """Records the batch rows each call to the fast path's loss and gradients gets (a step on
    two cores makes two calls, each with half of the batch), for training steps ("step") and
    evaluations (forward only, "eval") apart."""
    calls = {"step": [], "eval": []}
    real = fast.gpt_loss_and_grads

    def counting(params, ids, *args, backward=True, **kwargs):
        calls["step" if backward else "eval"].append(ids.shape[0])
        return real(params, ids, *args, backward=backward, **kwargs)

    monkeypatch.setattr(fast, "gpt_loss_and_grads", counting)
    return calls


def pretrain_losses(tmp_path, name, *flags):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / name
    result = CliRunner().invoke(main, ["pretrain", "--data", str(data), "--out", str(out), *TINY,
                                       *flags])
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)]


def test_pretrain_trains_on_the_fast_path_and_no_fast_on_the_reference(tmp_path,
                                                                       counted_fast_path):
    fast_losses = pretrain_losses(tmp_path, "fast")
    assert sum(counted_fast_path["step"]) == 4 * 4  # every row of the 4 steps' batches of 4
    # evaluations at steps 0, 2 and 4, each of one batch of 4 from each split, forward only
    assert sum(counted_fast_path["eval"]) == 3 * 2 * 4
    reference_losses = pretrain_losses(tmp_path, "reference", "--no-fast")
    assert sum(counted_fast_path["step"]) == 4 * 4  # no more calls
    assert sum(counted_fast_path["eval"]) == 3 * 2 * 4
    assert onp.allclose(fast_losses, reference_losses, rtol=1e-4)  # same training, up to rounding
    assert fast_losses[-1][0] < fast_losses[0][0]  # and it trained


def test_dropout_takes_the_reference_path(tmp_path, counted_fast_path):
    pretrain_losses(tmp_path, "dropout", "--dropout", "0.1")
    assert counted_fast_path == {"step": [], "eval": []}


def plain_softmax(s, mask):
    e = onp.exp(s + mask - (s + mask).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("gap", [0.0, 30.0, 200.0, 1e4])
def test_the_attention_softmax_equals_the_row_by_row_one_whatever_the_rows_scales(gap):
    """One shift for the whole tensor, and each row's own when a row lies far below the top:
    the weights equal softmax's row by row, with no NaN, however far apart the rows are."""
    rng = onp.random.default_rng(0)
    scores = rng.standard_normal((2, 3, 5, 5))
    scores[0, 1] -= gap  # one head's rows far below all the others
    mask = onp.triu(onp.full((5, 5), -1e9), k=1)
    weights = scores.copy()
    fast.softmax_rows(weights, mask)
    assert onp.allclose(weights, plain_softmax(scores, mask), rtol=1e-12, atol=1e-300)
    assert onp.allclose(weights.sum(axis=-1), 1.0)


# ----------------------------------------------------------------------------- two halves at once


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(1, 7))
def test_a_batch_in_two_halves_equals_autograd_on_the_whole_batch(s, batch):
    """Odd batches too: the halves' losses and gradients are weighted by their rows."""
    config, params, rng = random_model(s["seed"], s["vocab"], s["n_layer"], s["n_head"],
                                       s["head_size"], s["block"], s["bias"], s["tie"], "float64")
    t = int(rng.integers(1, s["block"] + 1))
    ids, targets = rng.integers(0, s["vocab"], (batch, t)), rng.integers(0, s["vocab"], (batch, t))
    want_loss, want = reference_loss_and_grads(params, ids, targets, config)
    with mock.patch.object(fast, "ATTENTION_BLOCK", s["attention_block"]):
        loss, grads = fast.gpt_loss_and_grads_in_halves(params, ids, targets, config)
        assert fast.gpt_loss_fn(config)(params, (ids, targets), None) == loss
    assert abs(loss - float(want_loss)) < 1e-10
    want, got = flatten(want), flatten(grads)
    assert list(got) == list(want)
    for name in want:
        assert onp.allclose(got[name], want[name], rtol=1e-8, atol=1e-11), name


def record(seen, count, name):
    seen.append((name, threading.get_ident(), count[0], ops._ON_ONE_CORE.active))
    return name


def test_run_both_runs_each_call_on_its_own_thread_with_one_blas_thread(blas_calls):
    calls, count = blas_calls
    seen = []
    assert ops.run_both(lambda: record(seen, count, "a"),
                        lambda: record(seen, count, "b")) == ("a", "b")
    assert {name for name, *_ in seen} == {"a", "b"}
    assert len({thread for _, thread, *_ in seen}) == 2  # at the same time, on two threads
    assert all(n == 1 and on_one_core for _, _, n, on_one_core in seen)
    assert calls == [1, 2] and count == [2]  # the count given back
    assert not ops._ON_ONE_CORE.active


@pytest.mark.parametrize("why", ["no thread setting", "one core asked", "more cores"])
def test_run_both_runs_the_calls_in_turn_where_it_cannot_keep_each_to_one_core(monkeypatch,
                                                                              blas_calls, why):
    calls, count = blas_calls
    if why == "no thread setting":  # MKL, Accelerate
        monkeypatch.setattr(system, "blas_threads", lambda: None)
    elif why == "one core asked":  # OPENBLAS_NUM_THREADS=1, as for each rank under mpirun
        monkeypatch.setattr(ops, "ONE_CORE", True)
    else:  # OpenBLAS runs 4 threads: they serve each product, as before
        count[0] = 4
    seen = []
    assert ops.run_both(lambda: record(seen, count, "a"),
                        lambda: record(seen, count, "b")) == ("a", "b")
    me = threading.get_ident()
    n = count[0]
    assert seen == [("a", me, n, False), ("b", me, n, False)]  # in order, here, untouched
    assert not calls


def test_inside_run_both_on_two_cores_runs_inline(blas_calls):
    """No thread inside a thread: each half's elementwise passes stay on its own core."""
    pieces = []

    def rows(x, out):
        pieces.append(x.shape[0])
        out[...] = 2 * x

    x = onp.ones((64, 1024))  # big enough to be split outside
    outs = [onp.empty_like(x) for _ in range(3)]
    ops.on_two_cores(rows, x, outs[0])
    assert pieces == [32, 32]
    pieces.clear()
    ops.run_both(lambda: ops.on_two_cores(rows, x, outs[1]),
                 lambda: ops.on_two_cores(rows, x, outs[2]))
    assert pieces == [64, 64]
    assert all(onp.array_equal(out, 2 * x) for out in outs)


def test_an_error_in_either_call_of_run_both_is_raised_after_both_ended(blas_calls):
    calls, count = blas_calls
    ended = []

    def fail():
        raise ValueError("half")

    def slow():
        time.sleep(0.05)
        ended.append(count[0])

    for pair in ((fail, slow), (slow, fail)):
        with pytest.raises(ValueError, match="half"):
            ops.run_both(*pair)
        assert ended.pop() == 1  # the other half ran to its end first, on one BLAS thread
        assert not ops._ON_ONE_CORE.active and count == [2]


def test_training_steps_run_in_halves_with_the_same_numbers_on_one_core_or_two(monkeypatch,
                                                                                blas_calls):
    """Both entry points (a whole step, and the gradients of a micro-batch) split the batch;
    the halves run at once where allowed, in turn where not, and the weights come out
    identical, so a run gives the same numbers on one core or two."""
    config, params, rng = random_model(2, 7, 1, 2, 4, 8, False, True, "float32")
    batch = (rng.integers(0, 7, (5, 8)), rng.integers(0, 7, (5, 8)))
    seen = []
    real = fast.gpt_loss_and_grads

    def recording(p, ids, *a, **kw):
        seen.append((ids.shape[0], threading.get_ident()))
        return real(p, ids, *a, **kw)

    monkeypatch.setattr(fast, "gpt_loss_and_grads", recording)
    results = []
    for one_core in (False, True):
        monkeypatch.setattr(ops, "ONE_CORE", one_core)
        seen.clear()
        new_params, *_ = fast.gpt_train_step(config)(params, adamw_init(params), batch, 1e-3,
                                                     TrainConfig(), None)
        loss, grads = fast.gpt_value_and_grad(config)(params, batch, None)
        assert sorted(rows for rows, _ in seen) == [2, 2, 3, 3]
        assert len({thread for _, thread in seen}) == (1 if one_core else 2)
        results.append((flatten(new_params), loss, flatten(grads)))
    (p2, l2, g2), (p1, l1, g1) = results
    assert l1 == l2
    assert all(onp.array_equal(p1[k], p2[k]) and onp.array_equal(g1[k], g2[k]) for k in p1)


def test_this_machines_blas_thread_count_is_one_in_run_both_and_given_back_after():
    """With real matrix products in both calls (a setter that each thread changed and gave
    back on its own left the process on one thread: this caught it)."""
    threads = system.blas_threads()
    if threads is None:
        pytest.skip("numpy's BLAS here has no thread setting: the halves run in turn")
    get, _ = threads
    before = get()
    if before != 2:
        pytest.skip(f"OpenBLAS runs {before} threads here: the halves run in turn")
    x = onp.ones((256, 256), dtype="float32")
    counts = ops.run_both(lambda: (x @ x, get())[1], lambda: (x @ x, get())[1])
    assert counts == (1, 1) and get() == before


# ----------------------------------------------------------------------------- the MLM objective


def chosen_positions(rng, batch, t):
    """A random loss mask with at least one chosen position in each row, as mlm.mask_tokens
    makes (chosen_count is at least 1)."""
    chosen = rng.random((batch, t)) < 0.3
    chosen[onp.arange(batch), rng.integers(0, t, batch)] = True
    return chosen


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(1, 5), st.booleans())
def test_the_mlm_loss_and_every_gradient_equal_autograd_on_mlm_loss(s, batch, distance_bias):
    """Bidirectional attention (with or without the distance bias) and the loss at the chosen
    positions only, whole and in halves (halves weighted by their chosen positions, not their
    rows)."""
    config, params, rng = random_model(s["seed"], s["vocab"], s["n_layer"], s["n_head"],
                                       s["head_size"], s["block"], s["bias"], s["tie"], "float64")
    config = replace(config, distance_bias=distance_bias)
    t = int(rng.integers(1, s["block"] + 1))
    inputs = rng.integers(0, s["vocab"], (batch, t))
    targets = rng.integers(0, s["vocab"], (batch, t))
    chosen = chosen_positions(rng, batch, t)
    want_loss, want = autograd.value_and_grad(
        lambda p: mlm_loss(p, inputs, targets, chosen, config))(params)
    want = flatten(want)
    for fn in (fast.gpt_loss_and_grads, fast.gpt_loss_and_grads_in_halves):
        loss, grads = fn(params, inputs, targets, config, causal=False, counted=chosen)
        assert abs(loss - float(want_loss)) < 1e-10, fn.__name__
        got = flatten(grads)
        assert list(got) == list(want)
        for name in want:
            assert onp.allclose(got[name], want[name], rtol=1e-8, atol=1e-11), (fn.__name__, name)


def test_an_mlm_training_step_equals_the_reference_step():
    config, params, rng = random_model(6, 9, 2, 2, 3, 8, False, True, "float64")
    tc = TrainConfig()
    inputs, targets = rng.integers(0, 9, (3, 8)), rng.integers(0, 9, (3, 8))
    batch = (inputs, targets, chosen_positions(rng, 3, 8))
    reference = flat_value_and_grad(lambda p, b, r: mlm_loss(p, b[0], b[1], b[2], config))
    *want, want_loss, _ = train_step(reference, params, adamw_init(params), batch, 1e-2, tc, None)
    *got, loss, _ = fast.gpt_train_step(config, "mlm")(params, adamw_init(params), batch, 1e-2,
                                                       tc, None)
    assert abs(loss - want_loss) < 1e-10
    for path, value in flatten(want[0]).items():
        assert onp.allclose(flatten(got[0])[path], value, rtol=1e-8, atol=1e-9), path


def test_pretrain_objective_mlm_trains_on_the_fast_path_and_no_fast_on_the_reference(
        tmp_path, monkeypatch):
    """The MLM run hands the fast path its corrupted batch, bidirectionally, with its chosen
    positions and the distance bias; --no-fast trains the same run through autograd, to the
    same losses."""
    seen = []
    real = fast.gpt_loss_and_grads

    def recording(params, ids, targets, config, causal=True, counted=None, backward=True):
        seen.append((ids.shape, causal, None if counted is None else counted.shape,
                     config.distance_bias, backward,
                     None if counted is None else bool((ids[counted] != targets[counted]).any())))
        return real(params, ids, targets, config, causal, counted, backward=backward)

    monkeypatch.setattr(fast, "gpt_loss_and_grads", recording)
    fast_losses = pretrain_losses(tmp_path, "fast", "--objective", "mlm")
    steps = [record[:4] for record in seen if record[4]]
    assert steps == [((2, 16), False, (2, 16), True)] * 8  # 4 steps of two halves of 4 rows
    evals = [record[:4] for record in seen if not record[4]]  # steps 0, 2, 4; two splits each
    assert evals == [((2, 16), False, (2, 16), True)] * (3 * 2 * 2)
    assert any(masked for *_, masked in seen)  # the inputs are the corrupted ids, the targets not
    seen.clear()
    reference_losses = pretrain_losses(tmp_path, "reference", "--objective", "mlm", "--no-fast")
    assert not seen
    assert onp.allclose(fast_losses, reference_losses, rtol=1e-4)
