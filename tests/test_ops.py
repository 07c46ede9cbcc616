"""Tests for tinyllm/ops.py.

Three kinds of check:
1. every fused op equals its reference form in value and in gradient (float64, tight tolerance),
2. every hand-written VJP agrees with finite differences (`autograd.test_util.check_grads`),
3. the maths each op promises (softmax rows sum to 1, layer norm gives mean 0 and variance 1, ...)
   and float32 discipline (float32 in -> float32 out, float32 gradients).
"""

import math

import autograd.numpy as np
import numpy as onp
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import ops
from tinyllm.ops import (
    linear_reference,
    MASK_VALUE,
    attention,
    attention_reference,
    attention_weights,
    causal_mask,
    cross_entropy,
    cross_entropy_reference,
    dropout,
    embedding,
    gelu,
    gelu_reference,
    layer_norm,
    layer_norm_reference,
    linear,
    log_softmax,
    padding_mask,
    softmax,
)

seeds = st.integers(0, 2**32 - 1)
small = st.integers(1, 5)
F64 = dict(rtol=1e-10, atol=1e-12)  # fused vs reference in float64: only rounding differs


def rng_for(seed):
    return onp.random.default_rng(seed)


def assert_same_value_and_grads(fused, reference, args, argnums, rng, tol=F64):
    """fused(*args) == reference(*args), and so are the gradients of sum(f(*args) * w), random w."""
    y_fused, y_ref = fused(*args), reference(*args)
    onp.testing.assert_allclose(y_fused, y_ref, **tol)
    w = rng.standard_normal(onp.shape(y_ref))
    for argnum in argnums:
        g_fused = grad(lambda *a: np.sum(fused(*a) * w), argnum)(*args)
        g_ref = grad(lambda *a: np.sum(reference(*a) * w), argnum)(*args)
        onp.testing.assert_allclose(g_fused, g_ref, **tol, err_msg=f"gradient wrt arg {argnum}")


def random_mask(rng, shape, p_masked=0.3):
    """An additive mask with about p_masked of the entries at MASK_VALUE, none in column 0
    (so that no row is fully masked)."""
    masked = rng.random(shape) < p_masked
    masked[..., 0] = False
    return onp.where(masked, MASK_VALUE, 0.0)


# ============================================================================ fused == reference


@settings(max_examples=25, deadline=None)
@given(rows=small, cols=small, scale=st.floats(0.1, 6.0), seed=seeds)
def test_gelu_equals_reference(rows, cols, scale, seed):
    rng = rng_for(seed)
    x = rng.standard_normal((rows, cols)) * scale
    assert_same_value_and_grads(gelu, gelu_reference, (x,), [0], rng)


def test_gelu_equals_reference_on_the_two_thread_path():
    # Arrays of >= 2**15 elements are split into two halves done by two threads; an odd row
    # count checks that the halves cover every row exactly once.
    rng = rng_for(0)
    x = rng.standard_normal((129, 300)) * 3
    assert x.size >= 1 << 15
    assert_same_value_and_grads(gelu, gelu_reference, (x,), [0], rng)


def test_gelu_worked_values():
    # gelu(0) = 0; gelu is close to x for large x and to 0 for very negative x.
    x = onp.array([0.0, 1.0, 10.0, -10.0])
    expected = 0.5 * x * (1 + onp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    onp.testing.assert_allclose(gelu(x), expected, rtol=1e-12, atol=1e-15)
    onp.testing.assert_allclose(gelu(x), [0.0, 0.8411919906082768, 10.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
@settings(max_examples=20, deadline=None)
@given(batch=small, t=small, c=st.integers(2, 8), seed=seeds)
def test_layer_norm_equals_reference(with_bias, batch, t, c, seed):
    rng = rng_for(seed)
    x = rng.standard_normal((batch, t, c)) * rng.uniform(0.1, 5) + rng.uniform(-3, 3)
    g = rng.standard_normal(c)
    if with_bias:
        args, argnums = (x, g, rng.standard_normal(c)), [0, 1, 2]
    else:
        args, argnums = (x, g), [0, 1]
    assert_same_value_and_grads(layer_norm, layer_norm_reference, args, argnums, rng)


def test_layer_norm_keyword_params_still_get_gradients():
    # Models call layer_norm(x, **params): gradients for g and b must flow through keywords too.
    rng = rng_for(1)
    x, g, b = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4)
    w = rng.standard_normal((3, 4))

    def fused(p):
        return np.sum(layer_norm(x, **p) * w)

    def reference(p):
        return np.sum(layer_norm_reference(x, **p) * w)

    g_fused, g_ref = grad(fused)({"g": g, "b": b}), grad(reference)({"g": g, "b": b})
    for key in ("g", "b"):
        onp.testing.assert_allclose(g_fused[key], g_ref[key], **F64)


@pytest.mark.parametrize("with_mask", [False, True])
@settings(max_examples=25, deadline=None)
@given(n=small, v=st.integers(2, 7), scale=st.floats(0.1, 10.0), seed=seeds)
def test_cross_entropy_equals_reference(with_mask, n, v, scale, seed):
    rng = rng_for(seed)
    logits = rng.standard_normal((n, v)) * scale
    targets = rng.integers(0, v, size=n)
    mask = (rng.random(n) < 0.6).astype("float64") if with_mask else None

    def fused(lg):
        return cross_entropy(lg, targets, mask)

    def reference(lg):
        return cross_entropy_reference(lg, targets, mask)

    assert_same_value_and_grads(fused, reference, (logits,), [0], rng)


def _attention_case(rng, lead, tq, tk, d, mask_kind):
    q = rng.standard_normal(lead + (tq, d))
    k = rng.standard_normal(lead + (tk, d))
    v = rng.standard_normal(lead + (tk, d))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "causal":
        mask = causal_mask(tq, dtype="float64")
    else:  # a random additive mask broadcast over the leading axes
        mask = random_mask(rng, (tq, tk))
    return q, k, v, mask


@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), tq=small, tk=small, d=small, seed=seeds)
def test_attention_equals_reference(mask_kind, b, h, tq, tk, d, seed):
    rng = rng_for(seed)
    if mask_kind == "causal":
        tk = tq  # the causal mask is square
    q, k, v, mask = _attention_case(rng, (b, h), tq, tk, d, mask_kind)

    def fused(q, k, v):
        return attention(q, k, v, mask)

    def reference(q, k, v):
        return attention_reference(q, k, v, mask)

    assert_same_value_and_grads(fused, reference, (q, k, v), [0, 1, 2], rng)


def test_attention_with_padding_mask_equals_reference():
    # (B, 1, 1, Tk) padding mask on (B, H, Tq, Tk) scores, Tq != Tk.
    rng = rng_for(3)
    q, k, v = (rng.standard_normal((2, 3, n, 4)) for n in (2, 5, 5))
    mask = padding_mask(onp.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]]), dtype="float64")

    def fused(q, k, v):
        return attention(q, k, v, mask)

    def reference(q, k, v):
        return attention_reference(q, k, v, mask)

    assert_same_value_and_grads(fused, reference, (q, k, v), [0, 1, 2], rng)


@pytest.mark.parametrize("mask_kind", ["causal", "padding"])
def test_attention_split_over_two_cores_equals_reference(mask_kind):
    # Big enough (q has 32,768 numbers) that the fused op splits its rows over two threads
    # (ops.on_two_cores), with B == T so that a causal mask (T, T) has as many rows as the batch:
    # it must be passed whole, while a padding mask (B, 1, 1, T) is split with the batch.
    rng = rng_for(5)
    b, h, t, d = 16, 4, 16, 32
    assert b * h * t * d >= ops._MIN_PARALLEL_SIZE
    q, k, v = (rng.standard_normal((b, h, t, d)) for _ in range(3))
    if mask_kind == "causal":
        mask = causal_mask(t, "float64")
    else:
        valid = (rng.random((b, t)) < 0.7).astype(float)
        valid[:, 0] = 1.0
        mask = padding_mask(valid, "float64")

    def fused(q, k, v):
        return attention(q, k, v, mask)

    def reference(q, k, v):
        return attention_reference(q, k, v, mask)

    assert_same_value_and_grads(fused, reference, (q, k, v), [0, 1, 2], rng)


def test_on_two_cores_equals_one_call(monkeypatch):
    monkeypatch.setattr(ops, "ONE_CORE", False)  # split even where the suite runs on one thread
    rng = rng_for(6)
    x = rng.standard_normal((4, ops._MIN_PARALLEL_SIZE // 4))  # just big enough to split
    shift = rng.standard_normal(x.shape[1])  # broadcast over the rows: passed whole

    def add(x, shift, out):
        onp.add(x, shift, out=out)

    out = onp.empty_like(x)
    ops.on_two_cores(add, x, shift, out)
    onp.testing.assert_array_equal(out, x + shift)


def test_on_two_cores_keeps_to_one_thread_when_asked(monkeypatch):
    """With ONE_CORE (OPENBLAS_NUM_THREADS=1), the work runs as one call in this thread."""
    calls = []
    x = onp.zeros((4, ops._MIN_PARALLEL_SIZE // 4))
    monkeypatch.setattr(ops, "ONE_CORE", True)
    ops.on_two_cores(lambda part: calls.append(len(part)), x)
    assert calls == [4]
    monkeypatch.setattr(ops, "ONE_CORE", False)
    calls.clear()
    ops.on_two_cores(lambda part: calls.append(len(part)), x)
    assert sorted(calls) == [2, 2]


@pytest.mark.parametrize("environ, expected", [
    ({}, False), ({"OPENBLAS_NUM_THREADS": "1"}, True), ({"OMP_NUM_THREADS": "1"}, True),
    ({"OPENBLAS_NUM_THREADS": "2"}, False)])
def test_one_thread_asked_reads_the_blas_variables(environ, expected):
    assert ops.one_thread_asked(environ) is expected


def test_attention_weights_equal_reference_softmax():
    rng = rng_for(4)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    expected = softmax(q @ onp.swapaxes(k, -1, -2) / 2.0)  # sqrt(D) = 2
    onp.testing.assert_allclose(attention_weights(q, k), expected, **F64)


# ============================================================================ VJPs vs finite differences


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(small, min_size=1, max_size=3).map(tuple), seed=seeds)
def test_gelu_vjp_matches_finite_differences(shape, seed):
    x = rng_for(seed).standard_normal(shape) * 2
    check_grads(gelu, modes=["rev"], order=1)(x)


@pytest.mark.parametrize("with_bias", [True, False])
@settings(max_examples=30, deadline=None)
@given(rows=small, c=st.integers(2, 6), seed=seeds)
def test_layer_norm_vjp_matches_finite_differences(with_bias, rows, c, seed):
    rng = rng_for(seed)
    x = rng.standard_normal((2, rows, c)) * 2 + 1
    g = rng.standard_normal(c)
    if with_bias:
        check_grads(layer_norm, modes=["rev"], order=1, argnum=(0, 1, 2))(x, g, rng.standard_normal(c))
    else:
        check_grads(layer_norm, modes=["rev"], order=1, argnum=(0, 1))(x, g)


@pytest.mark.parametrize("with_mask", [False, True])
@settings(max_examples=30, deadline=None)
@given(n=small, v=st.integers(2, 6), seed=seeds)
def test_cross_entropy_vjp_matches_finite_differences(with_mask, n, v, seed):
    rng = rng_for(seed)
    logits = rng.standard_normal((n, v)) * 2
    targets = rng.integers(0, v, size=n)
    mask = (rng.random(n) < 0.6).astype("float64") if with_mask else None
    check_grads(lambda lg: cross_entropy(lg, targets, mask), modes=["rev"], order=1)(logits)


@settings(max_examples=25, deadline=None)
@given(tq=small, tk=small, d=small, p=st.floats(0.1, 0.7), seed=seeds)
def test_attention_with_dropout_vjp_matches_finite_differences(tq, tk, d, p, seed):
    # A fresh Generator with a fixed seed on every call draws the same dropout mask, so the
    # function is deterministic and finite differences apply.
    rng = rng_for(seed)
    q, k, v, mask = _attention_case(rng, (2, 2), tq, tk, d, "random")
    check_grads(lambda q, k, v: attention(q, k, v, mask, p, onp.random.default_rng(seed)),
                modes=["rev"], order=1, argnum=(0, 1, 2))(q, k, v)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 5), tq=small, tk=small, d=small, seed=seeds)
def test_attention_with_per_sequence_padding_mask_vjp_matches_finite_differences(b, tq, tk, d, seed):
    rng = rng_for(seed)
    q, k, v = (rng.standard_normal((b, 2, t, d)) for t in (tq, tk, tk))
    valid = (rng.random((b, tk)) < 0.7).astype("float64")
    valid[:, 0] = 1.0  # every sequence keeps at least one key
    mask = padding_mask(valid, dtype="float64")  # (B, 1, 1, Tk)
    fused = attention(q, k, v, mask)
    onp.testing.assert_allclose(fused, attention_reference(q, k, v, mask), **F64)
    check_grads(lambda q, k, v: attention(q, k, v, mask), modes=["rev"], order=1,
                argnum=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
@settings(max_examples=25, deadline=None)
@given(tq=small, tk=small, d=small, seed=seeds)
def test_attention_vjp_matches_finite_differences(mask_kind, tq, tk, d, seed):
    rng = rng_for(seed)
    if mask_kind == "causal":
        tk = tq
    q, k, v, mask = _attention_case(rng, (2, 2), tq, tk, d, mask_kind)
    check_grads(lambda q, k, v: attention(q, k, v, mask), modes=["rev"], order=1,
                argnum=(0, 1, 2))(q, k, v)


# ============================================================================ softmax family


@settings(max_examples=30, deadline=None)
@given(rows=small, cols=small, scale=st.floats(0.1, 50.0), shift=st.floats(-100, 100), seed=seeds)
def test_softmax_rows_sum_to_one_and_ignore_a_constant_per_row(rows, cols, scale, shift, seed):
    rng = rng_for(seed)
    x = rng.standard_normal((rows, cols)) * scale
    p = softmax(x)
    assert onp.all(p >= 0)
    onp.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    row_shift = shift * rng.standard_normal((rows, 1))
    onp.testing.assert_allclose(softmax(x + row_shift), p, rtol=1e-9, atol=1e-15)


def test_softmax_along_another_axis():
    x = rng_for(5).standard_normal((3, 4))
    onp.testing.assert_allclose(softmax(x, axis=0), softmax(x.T).T, **F64)
    onp.testing.assert_allclose(softmax(x, axis=0).sum(axis=0), 1.0, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(rows=small, cols=small, scale=st.floats(0.1, 10.0), seed=seeds)
def test_log_softmax_is_log_of_softmax(rows, cols, scale, seed):
    x = rng_for(seed).standard_normal((rows, cols)) * scale
    onp.testing.assert_allclose(log_softmax(x), onp.log(softmax(x)), rtol=1e-9, atol=1e-12)


def test_log_softmax_never_takes_log_of_zero():
    # softmax([1000, 0])[1] underflows to 0, but log_softmax stays exact: -1000.
    out = log_softmax(onp.array([[1000.0, 0.0]]))
    onp.testing.assert_allclose(out, [[0.0, -1000.0]], atol=1e-12)


# ============================================================================ layer norm maths


@settings(max_examples=30, deadline=None)
@given(rows=small, c=st.integers(2, 16), scale=st.floats(0.5, 100.0),
       offset=st.floats(-100, 100), seed=seeds)
def test_layer_norm_before_affine_has_mean_zero_variance_one(rows, c, scale, offset, seed):
    z = rng_for(seed).standard_normal((rows, c))
    z = (z - z.mean(axis=-1, keepdims=True)) / z.std(axis=-1, keepdims=True)  # so var(x) = scale^2
    x = z * scale + offset
    y = layer_norm(x, onp.ones(c), onp.zeros(c))
    onp.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-9)
    # The variance is var / (var + eps), a hair under 1 because of the eps floor.
    var = x.var(axis=-1)
    onp.testing.assert_allclose(y.var(axis=-1), var / (var + 1e-5), rtol=1e-9)
    onp.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-3)


def test_layer_norm_applies_gain_then_shift():
    x = onp.array([[1.0, 2.0, 3.0]])  # mean 2, variance 2/3
    g, b = onp.array([1.0, 2.0, 3.0]), onp.array([10.0, 20.0, 30.0])
    x_hat = (x - 2.0) / math.sqrt(2.0 / 3.0 + 1e-5)
    onp.testing.assert_allclose(layer_norm(x, g, b), x_hat * g + b, **F64)
    onp.testing.assert_allclose(layer_norm(x, g), x_hat * g, **F64)


# ============================================================================ cross-entropy maths


def test_cross_entropy_worked_example():
    # logits [0, 0] -> p = [0.5, 0.5]; -log 0.5 = ln 2.
    assert cross_entropy(onp.array([[0.0, 0.0]]), onp.array([1])) == pytest.approx(math.log(2))


@settings(max_examples=30, deadline=None)
@given(n=small, v=st.integers(2, 7), scale=st.floats(0.1, 10.0), seed=seeds)
def test_cross_entropy_is_mean_minus_log_softmax_at_target(n, v, scale, seed):
    rng = rng_for(seed)
    logits = rng.standard_normal((n, v)) * scale
    targets = rng.integers(0, v, size=n)
    p = onp.exp(logits) / onp.exp(logits).sum(axis=1, keepdims=True)
    per_row = -onp.log(p[onp.arange(n), targets])
    assert cross_entropy(logits, targets) == pytest.approx(per_row.mean(), rel=1e-10)

    mask = (rng.random(n) < 0.5).astype("float64")
    mask[rng.integers(0, n)] = 1.0  # at least one row counts
    expected = per_row[mask == 1].mean()
    assert cross_entropy(logits, targets, mask) == pytest.approx(expected, rel=1e-10)

    # Masked rows do not affect the value, nor receive gradient.
    changed = logits.copy()
    changed[mask == 0] = rng.standard_normal((int((mask == 0).sum()), v)) * 10
    assert cross_entropy(changed, targets, mask) == pytest.approx(expected, rel=1e-10)
    g = grad(lambda lg: cross_entropy(lg, targets, mask))(logits)
    assert onp.all(g[mask == 0] == 0)


def test_cross_entropy_with_everything_masked_is_zero_not_nan():
    logits, targets = onp.zeros((2, 3)), onp.array([0, 1])
    mask = onp.zeros(2)
    assert cross_entropy(logits, targets, mask) == 0.0
    assert onp.all(grad(lambda lg: cross_entropy(lg, targets, mask))(logits) == 0.0)


# ============================================================================ masks


def test_causal_mask_exact_values():
    m = causal_mask(3)
    assert m.shape == (3, 3) and m.dtype == onp.float32
    onp.testing.assert_array_equal(
        m, [[0.0, -1e9, -1e9], [0.0, 0.0, -1e9], [0.0, 0.0, 0.0]]
    )
    assert causal_mask(3, dtype="float64").dtype == onp.float64


def test_padding_mask_shape_and_values():
    valid = onp.array([[1, 1, 0], [1, 0, 0]])
    m = padding_mask(valid)
    assert m.shape == (2, 1, 1, 3) and m.dtype == onp.float32
    onp.testing.assert_array_equal(
        m[:, 0, 0, :], [[0.0, 0.0, -1e9], [0.0, -1e9, -1e9]]
    )


# ============================================================================ dropout


@pytest.mark.parametrize("p, rng", [(0.0, onp.random.default_rng(0)), (0.5, None)])
def test_dropout_is_identity_when_off(p, rng):
    x = rng_for(1).standard_normal((4, 5))
    onp.testing.assert_array_equal(dropout(x, p, rng), x)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.05, 0.9), seed=seeds)
def test_dropout_zeroes_about_p_and_keeps_the_expectation(p, seed):
    n = 40_000
    x = onp.ones((200, 200), dtype="float32")
    y = dropout(x, p, rng_for(seed))
    assert y.shape == x.shape and y.dtype == onp.float32
    zeroed = y == 0
    # 6 standard deviations of a binomial fraction / of the mean of the kept-and-scaled values.
    assert abs(zeroed.mean() - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert abs(y.mean() - 1.0) < 6 * math.sqrt(p / (1 - p) / n)
    onp.testing.assert_allclose(y[~zeroed], 1.0 / (1.0 - p), rtol=1e-6)


def test_dropout_is_reproducible_from_the_seed():
    x = rng_for(2).standard_normal((8, 8))
    a = dropout(x, 0.3, onp.random.default_rng(7))
    b = dropout(x, 0.3, onp.random.default_rng(7))
    c = dropout(x, 0.3, onp.random.default_rng(8))
    onp.testing.assert_array_equal(a, b)
    assert not onp.array_equal(a, c)


# ============================================================================ linear, embedding


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_is_x_w_plus_b(lead, with_bias):
    rng = rng_for(6)
    x, w = rng.standard_normal(lead + (4,)), rng.standard_normal((4, 7))
    b = rng.standard_normal(7) if with_bias else None
    expected = onp.einsum("...i,io->...o", x, w) + (b if with_bias else 0.0)
    y = linear(x, w, b)
    assert y.shape == lead + (7,)
    onp.testing.assert_allclose(y, expected, **F64)


def test_embedding_looks_up_rows_and_scatters_gradient_back():
    table = onp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    onp.testing.assert_array_equal(embedding(table, onp.array([2, 0])), [[2, 2], [0, 0]])
    ids = onp.array([[1, 1], [0, 2]])
    assert embedding(table, ids).shape == (2, 2, 2)
    onp.testing.assert_array_equal(embedding(table, ids)[1, 1], table[2])
    # Row 1 is used twice: its gradient is the sum of both incoming rows.
    w = rng_for(7).standard_normal((2, 2, 2))
    g = grad(lambda t: np.sum(embedding(t, ids) * w))(table)
    onp.testing.assert_allclose(g, [w[1, 0], w[0, 0] + w[0, 1], w[1, 1]], **F64)


# ============================================================================ float32 discipline


def _f32(rng, shape):
    return rng.standard_normal(shape).astype("float32")


def _assert_f32(value, name):
    assert onp.asarray(value).dtype == onp.float32, f"{name}: {onp.asarray(value).dtype}"


def test_float32_in_float32_out_and_float32_gradients():
    rng = rng_for(8)
    x, g, b = _f32(rng, (2, 3, 4)), _f32(rng, 4), _f32(rng, 4)
    q, k, v = _f32(rng, (2, 2, 3, 4)), _f32(rng, (2, 2, 5, 4)), _f32(rng, (2, 2, 5, 4))
    mask = padding_mask(onp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))  # float32
    c_mask = causal_mask(3)  # float32
    logits, targets = _f32(rng, (6, 5)), rng.integers(0, 5, size=6)
    loss_mask = onp.array([1, 1, 0, 1, 0, 1], dtype="float32")

    cases = {  # name -> (function, its float32 arguments, argnums to differentiate)
        "gelu": (gelu, (x,), [0]),
        "layer_norm": (layer_norm, (x, g, b), [0, 1, 2]),
        "layer_norm without b": (layer_norm, (x, g), [0, 1]),
        "softmax": (softmax, (x,), [0]),
        "log_softmax": (log_softmax, (x,), [0]),
        "attention": (lambda q, k, v: attention(q, k, v, mask), (q, k, v), [0, 1, 2]),
        "causal attention": (lambda q, v: attention(q, q, v, c_mask), (q, q * 2), [0, 1]),
        "cross_entropy": (lambda lg: cross_entropy(lg, targets), (logits,), [0]),
        "masked cross_entropy": (lambda lg: cross_entropy(lg, targets, loss_mask), (logits,), [0]),
    }
    for name, (f, args, argnums) in cases.items():
        out = f(*args)
        _assert_f32(out, name)
        # ... and the float32 result is the float64 one, rounded.
        out64 = f(*(a.astype("float64") for a in args))
        onp.testing.assert_allclose(out, out64, rtol=1e-4, atol=1e-5, err_msg=name)
        w = _f32(rng, onp.shape(out))
        for argnum in argnums:
            gr = grad(lambda *a: np.sum(f(*a) * w), argnum)(*args)
            _assert_f32(gr, f"d {name} / d arg {argnum}")


# ============================================================================ known bugs


def test_cross_entropy_with_an_integer_mask_stays_float32():
    rng = rng_for(9)
    logits, targets = _f32(rng, (4, 3)), onp.array([0, 1, 2, 0])
    mask = onp.array([1, 0, 1, 1])  # int64, e.g. from (ids != pad).astype(int)
    _assert_f32(cross_entropy(logits, targets, mask), "loss")
    _assert_f32(grad(lambda lg: cross_entropy(lg, targets, mask))(logits), "d loss / d logits")


@pytest.mark.parametrize("x", [0.5, onp.array(0.5)])
def test_gelu_of_a_scalar_equals_reference(x):
    onp.testing.assert_allclose(gelu(x), gelu_reference(x), **F64)


# ============================================================================ the two-halves path

@pytest.mark.parametrize("b", [2, 3, 7])
def test_ops_split_across_two_threads_equal_reference(monkeypatch, b):
    """Large inputs are processed as two halves of the batch in two threads; force that path on
    small inputs (odd batch sizes too) and compare values and gradients with the references."""
    monkeypatch.setattr(ops, "_MIN_PARALLEL_SIZE", 1)
    rng = rng_for(b)
    x = rng.standard_normal((b, 3, 4))
    assert_same_value_and_grads(gelu, gelu_reference, (x,), [0], rng)
    q, k, v = (rng.standard_normal((b, 2, t, 4)) for t in (3, 5, 5))
    valid = (rng.random((b, 5)) < 0.7).astype("float64")
    valid[:, 0] = 1.0
    for mask in (None, padding_mask(valid, dtype="float64"), rng.standard_normal((3, 5))):
        assert_same_value_and_grads(lambda q, k, v: attention(q, k, v, mask),
                                    lambda q, k, v: attention_reference(q, k, v, mask),
                                    (q, k, v), [0, 1, 2], rng)
    check_grads(lambda q, k, v: attention(q, k, v, None, 0.5, onp.random.default_rng(0)),
                modes=["rev"], order=1, argnum=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("with_bias", [True, False])
@settings(max_examples=25, deadline=None)
@given(lead=st.lists(small, min_size=1, max_size=3).map(tuple), c_in=small, c_out=small, seed=seeds)
def test_fused_linear_equals_reference_and_its_vjp_matches_finite_differences(
        with_bias, lead, c_in, c_out, seed):
    rng = rng_for(seed)
    x, w = rng.standard_normal(lead + (c_in,)), rng.standard_normal((c_in, c_out))
    if with_bias:
        b = rng.standard_normal(c_out)
        assert_same_value_and_grads(linear, linear_reference, (x, w, b), [0, 1, 2], rng)
        check_grads(linear, modes=["rev"], order=1, argnum=(0, 1, 2))(x, w, b)
    else:
        assert_same_value_and_grads(linear, linear_reference, (x, w), [0, 1], rng)
        check_grads(linear, modes=["rev"], order=1, argnum=(0, 1))(x, w)
