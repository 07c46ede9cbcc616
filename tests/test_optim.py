"""Tests for tinyllm/optim.py: AdamW against hand-computed steps, clipping, the lr schedule."""

import math

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyllm.optim import adamw_init, adamw_step, clip_by_global_norm, global_norm, lr_at
from tinyllm.tree import flatten

B1, B2, WD, EPS = 0.9, 0.99, 0.1, 1e-8


def reference_adamw(p, grads, lrs, decay):
    """AdamW written out one scalar at a time in Python floats, straight from the paper."""
    m = v = 0.0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat = m / (1 - B1**t)
        v_hat = v / (1 - B2**t)
        p = p - lr * (m_hat / (math.sqrt(v_hat) + EPS) + (WD * p if decay else 0.0))
    return p, m, v


def small_tree():
    """A matrix (decays), a bias vector (does not) and a nested list, all float32."""
    rng = onp.random.default_rng(0)
    return {
        "w": rng.standard_normal((2, 3)).astype("float32"),
        "h": [{"b": rng.standard_normal(3).astype("float32")}],
    }


def test_adamw_matches_hand_computed_updates_for_three_steps():
    params = small_tree()
    rng = onp.random.default_rng(1)
    grads = [{"w": rng.standard_normal((2, 3)).astype("float32"),
              "h": [{"b": rng.standard_normal(3).astype("float32")}]} for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    state = adamw_init(params)
    p = params
    for g, lr in zip(grads, lrs):
        p, state = adamw_step(p, g, state, lr, B1, B2, WD)
    assert state["step"] == 3
    for key, decay in (("w", True), ("h.0.b", False)):
        start = flatten(params)[key]
        got_p, got_m, got_v = flatten(p)[key], flatten(state["m"])[key], flatten(state["v"])[key]
        for idx in onp.ndindex(start.shape):
            want_p, want_m, want_v = reference_adamw(
                float(start[idx]), [float(flatten(g)[key][idx]) for g in grads], lrs, decay)
            assert got_p[idx] == pytest.approx(want_p, rel=1e-5, abs=1e-6)
            assert got_m[idx] == pytest.approx(want_m, rel=1e-5, abs=1e-7)
            assert got_v[idx] == pytest.approx(want_v, rel=1e-5, abs=1e-9)


def test_adamw_docstring_example():
    one = {"b": onp.array([1.0], "float32")}  # 1-D: no weight decay
    params, state = adamw_step(one, {"b": onp.array([0.5], "float32")}, adamw_init(one), 0.1)
    assert params["b"][0] == pytest.approx(0.9, abs=1e-6)
    assert state["m"]["b"][0] == pytest.approx(0.05)
    assert state["v"]["b"][0] == pytest.approx(0.0025)


def test_weight_decay_is_decoupled_and_only_on_matrices():
    """With zero gradients Adam's part of the step is 0: only decay moves p, by 1 - lr * wd."""
    params = small_tree()
    zero = {"w": onp.zeros((2, 3), "float32"), "h": [{"b": onp.zeros(3, "float32")}]}
    new, _ = adamw_step(params, zero, adamw_init(params), lr=0.5, weight_decay=0.2)
    onp.testing.assert_allclose(new["w"], params["w"] * (1 - 0.5 * 0.2), rtol=1e-6)
    onp.testing.assert_array_equal(new["h"][0]["b"], params["h"][0]["b"])


def test_adamw_keeps_float32_and_does_not_mutate_inputs():
    params = small_tree()
    grads = {"w": onp.ones((2, 3), "float32"), "h": [{"b": onp.ones(3, "float32")}]}
    state = adamw_init(params)
    _, state = adamw_step(params, grads, state, 0.1)  # non-zero moments, step 1
    before = {k: a.copy() for k, a in flatten({"p": params, "g": grads, "s": state}).items()
              if isinstance(a, onp.ndarray)}
    step_before = state["step"]
    new_params, new_state = adamw_step(params, grads, state, onp.float64(0.1))
    after = flatten({"p": params, "g": grads, "s": state})
    for key, array in before.items():
        onp.testing.assert_array_equal(after[key], array, err_msg=key)
    assert state["step"] == step_before == 1
    assert new_state["step"] == 2
    for tree in (new_params, new_state["m"], new_state["v"]):
        assert {a.dtype for a in flatten(tree).values()} == {onp.dtype("float32")}


# ----------------------------------------------------------------------------- clipping


def grad_tree(scale):
    rng = onp.random.default_rng(3)
    return {"w": (rng.standard_normal((3, 4)) * scale).astype("float32"),
            "h": [{"b": (rng.standard_normal(4) * scale).astype("float32")}]}


def test_clip_scales_to_max_norm_and_keeps_direction():
    grads = grad_tree(10.0)
    norm = global_norm(grads)
    assert norm > 5
    clipped, reported = clip_by_global_norm(grads, 1.0)
    assert reported == pytest.approx(norm)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    ratio = clipped["w"] / grads["w"]
    onp.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    onp.testing.assert_allclose(clipped["h"][0]["b"] / grads["h"][0]["b"], ratio.flat[0], rtol=1e-5)
    assert 0 < ratio.flat[0] < 1


def test_clip_leaves_small_gradients_alone_and_zero_disables():
    small = grad_tree(0.01)
    out, norm = clip_by_global_norm(small, 1.0)
    assert out is small and norm == pytest.approx(global_norm(small))
    big = grad_tree(100.0)
    out, norm = clip_by_global_norm(big, 0.0)
    assert out is big and norm == pytest.approx(global_norm(big))


def test_global_norm_is_the_norm_of_all_leaves_together():
    grads = {"a": onp.array([3.0]), "b": [onp.array([[4.0, 12.0]])]}
    assert global_norm(grads) == pytest.approx(13.0)


@settings(max_examples=50, deadline=None)
@given(arrays("float64", st.integers(1, 6), elements=st.floats(-1e3, 1e3)),
       st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_max_norm(g, max_norm):
    clipped, norm = clip_by_global_norm({"g": g}, max_norm)
    assert norm == pytest.approx(float(onp.linalg.norm(g)))
    assert global_norm(clipped) <= max_norm * (1 + 1e-9)
    if norm > max_norm:  # the scale is max_norm / (norm + 1e-6), as in PyTorch: the clipped
        # norm is max_norm - max_norm 1e-6 / (norm + 1e-6), off by at most 1e-6 (plus rounding:
        # Hypothesis found max_norm 180.125 clipped to 1.0000000259e-6 short of it)
        assert global_norm(clipped) == pytest.approx(max_norm, rel=1e-9, abs=1.001e-6)


# ----------------------------------------------------------------------------- schedule

SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000)


@pytest.mark.parametrize("it, want", [
    (0, 1e-5),  # first warm-up step: 1/100 of the peak
    (49, 5e-4),  # half-way up
    (99, 1e-3),  # end of warm-up: the peak
    (100, 1e-3),  # start of the cosine: cos(0) = 1
    (1050, 5.5e-4),  # half-way down the cosine: the mean of lr and min_lr
    (2000, 1e-4),  # end of decay
    (10_000, 1e-4),  # beyond: min_lr
])
def test_lr_at_worked_values(it, want):
    assert lr_at(it, **SCHEDULE) == pytest.approx(want, rel=1e-9)


def test_lr_at_quarter_way_down_the_cosine():
    it = 100 + 1900 // 4  # progress 0.25
    want = 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4
    assert lr_at(it, **SCHEDULE) == pytest.approx(want)


@given(st.integers(0, 3000), st.integers(0, 3000))
def test_lr_rises_then_falls_and_stays_in_range(a, b):
    """Warm-up climbs from lr/warmup_iters; after it the rate never leaves [min_lr, lr]."""
    a, b = sorted((a, b))
    la, lb = lr_at(a, **SCHEDULE), lr_at(b, **SCHEDULE)
    assert 0 < la <= SCHEDULE["lr"] * (1 + 1e-12)
    if a >= SCHEDULE["warmup_iters"]:
        assert la >= SCHEDULE["min_lr"] * (1 - 1e-12)
    if b < SCHEDULE["warmup_iters"]:
        assert la <= lb
    if a >= SCHEDULE["warmup_iters"] - 1:
        assert la >= lb - 1e-15


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 1.0), rows=st.integers(1, 5), cols=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_adamw_grad_scale_equals_stepping_on_scaled_gradients(scale, rows, cols, seed):
    """Clipping is applied inside AdamW as grad_scale; it must equal scaling the gradients first."""
    rng = onp.random.default_rng(seed)
    params = {"w": rng.standard_normal((rows, cols)).astype("float32"),
              "b": rng.standard_normal(cols).astype("float32")}
    state = adamw_init(params)
    for _ in range(3):
        grads = {k: rng.standard_normal(p.shape).astype("float32") for k, p in params.items()}
        scaled = {k: g * onp.float32(scale) for k, g in grads.items()}
        p1, s1 = adamw_step(params, grads, state, 1e-2, grad_scale=scale)
        p2, s2 = adamw_step(params, scaled, state, 1e-2)
        for k in params:
            onp.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-7)
            onp.testing.assert_allclose(s1["v"][k], s2["v"][k], rtol=1e-5, atol=1e-12)
        params, state = p1, s1
