"""Tests for tinyllm/attention.py: head splitting, multi-head attention against a per-head
reference, cross-attention, causality and padding masks. All in float64 with tight tolerances."""

import numpy as onp
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.attention import (
    cross_attention,
    merge_heads,
    multi_head_attention,
    self_attention,
    split_heads,
)
from tinyllm.ops import attention_reference, attention_weights, causal_mask, padding_mask

seeds = st.integers(0, 2**32 - 1)
TOL = dict(rtol=1e-10, atol=1e-12)


def rng_for(seed):
    return onp.random.default_rng(seed)


def projection(rng, c_in, c_out):
    """A linear layer's params {"w", "b"} with non-zero bias, so a dropped bias would show."""
    return {"w": rng.standard_normal((c_in, c_out)) / onp.sqrt(c_in), "b": rng.standard_normal(c_out)}


def heads_by_hand(q, k, v, c_proj, n_head, mask=None):
    """Multi-head attention written out: slice the channels of each head, attend with the
    reference form, concatenate the heads along the channels, then project.
    `mask` must broadcast to (B, Tq, Tk), the same for every head."""
    d = q.shape[-1] // n_head
    outs = []
    for h in range(n_head):
        cols = slice(h * d, (h + 1) * d)  # head h's channels
        outs.append(attention_reference(q[..., cols], k[..., cols], v[..., cols], mask))
    concat = onp.concatenate(outs, axis=-1)  # H x (B, Tq, D) -> (B, Tq, C)
    return concat @ c_proj["w"] + c_proj["b"]


# ============================================================================ split / merge heads


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), h=st.integers(1, 4), d=st.integers(1, 4), seed=seeds)
def test_split_and_merge_heads_round_trip(b, t, h, d, seed):
    rng = rng_for(seed)
    x = rng.standard_normal((b, t, h * d))
    heads = split_heads(x, h)
    assert heads.shape == (b, h, t, d)
    onp.testing.assert_array_equal(merge_heads(heads), x)
    y = rng.standard_normal((b, h, t, d))
    onp.testing.assert_array_equal(split_heads(merge_heads(y), h), y)
    # head j of position i is channels j*D .. (j+1)*D of x[:, i]
    j, i = rng.integers(h), rng.integers(t)
    onp.testing.assert_array_equal(heads[:, j, i], x[:, i, j * d:(j + 1) * d])


# ============================================================================ multi-head attention


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), tq=st.integers(1, 5), tk=st.integers(1, 5), h=st.integers(1, 3),
       d=st.integers(1, 3), causal=st.booleans(), seed=seeds)
def test_multi_head_attention_equals_heads_done_separately(b, tq, tk, h, d, causal, seed):
    rng = rng_for(seed)
    c = h * d
    if causal:
        tk = tq
    q, k, v = rng.standard_normal((b, tq, c)), rng.standard_normal((b, tk, c)), rng.standard_normal((b, tk, c))
    c_proj = projection(rng, c, c)
    mask = causal_mask(tq, dtype="float64") if causal else None
    out = multi_head_attention(q, k, v, c_proj, h, mask)
    assert out.shape == (b, tq, c)
    onp.testing.assert_allclose(out, heads_by_hand(q, k, v, c_proj, h, mask), **TOL)


def test_multi_head_attention_is_not_single_head_attention():
    # Guards the test above: with 2 heads the result must differ from 1 head over all channels.
    rng = rng_for(0)
    q, k, v = (rng.standard_normal((1, 4, 6)) for _ in range(3))
    c_proj = projection(rng, 6, 6)
    assert not onp.allclose(multi_head_attention(q, k, v, c_proj, 2),
                            multi_head_attention(q, k, v, c_proj, 1))


# ============================================================================ cross-attention


def cross_params(rng, c):
    return {"c_q": projection(rng, c, c), "c_kv": projection(rng, c, 2 * c),
            "c_proj": projection(rng, c, c)}


@settings(max_examples=25, deadline=None)
@given(tq=st.integers(1, 5), tk=st.integers(1, 6), h=st.integers(1, 3), seed=seeds)
def test_cross_attention_with_different_query_and_memory_lengths(tq, tk, h, seed):
    rng = rng_for(seed)
    c = 2 * h
    x, memory = rng.standard_normal((2, tq, c)), rng.standard_normal((2, tk, c))
    p = cross_params(rng, c)
    out = cross_attention(x, memory, **p, n_head=h)
    assert out.shape == (2, tq, c)
    # by hand: queries from x, keys and values from the two halves of memory's projection
    q = x @ p["c_q"]["w"] + p["c_q"]["b"]
    kv = memory @ p["c_kv"]["w"] + p["c_kv"]["b"]
    expected = heads_by_hand(q, kv[..., :c], kv[..., c:], p["c_proj"], h)
    onp.testing.assert_allclose(out, expected, **TOL)


@settings(max_examples=20, deadline=None)
@given(tq=st.integers(2, 5), tk=st.integers(2, 6), seed=seeds, data=st.data())
def test_cross_attention_output_at_a_query_ignores_other_queries(tq, tk, seed, data):
    # (tk >= 2: with a single key every query gets the same output, and the check below is moot)
    rng = rng_for(seed)
    x, memory = rng.standard_normal((1, tq, 4)), rng.standard_normal((1, tk, 4))
    p = cross_params(rng, 4)
    i = data.draw(st.integers(0, tq - 1), label="query kept")
    changed = rng.standard_normal(x.shape)
    changed[:, i] = x[:, i]  # every query but i changes
    before = cross_attention(x, memory, **p, n_head=2)
    after = cross_attention(changed, memory, **p, n_head=2)
    onp.testing.assert_allclose(after[:, i], before[:, i], **TOL)
    assert not onp.allclose(onp.delete(after, i, axis=1), onp.delete(before, i, axis=1))


# ============================================================================ causality


def self_params(rng, c):
    return {"c_attn": projection(rng, c, 3 * c), "c_proj": projection(rng, c, c)}


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 6), seed=seeds, data=st.data())
def test_causal_self_attention_does_not_look_ahead(t, seed, data):
    rng = rng_for(seed)
    x = rng.standard_normal((2, t, 6))
    p = self_params(rng, 6)
    s = data.draw(st.integers(0, t - 1), label="first changed position")
    changed = x.copy()
    changed[:, s:] = rng.standard_normal(changed[:, s:].shape)
    mask = causal_mask(t, dtype="float64")
    before = self_attention(x, **p, n_head=3, mask=mask)
    after = self_attention(changed, **p, n_head=3, mask=mask)
    onp.testing.assert_allclose(after[:, :s], before[:, :s], **TOL)  # the past is untouched
    assert not onp.allclose(after[:, s], before[:, s])  # position s sees its own change


def test_self_attention_without_a_mask_looks_both_ways():
    # Guards the causality test: unmasked, a change at the last position reaches the first.
    rng = rng_for(1)
    x = rng.standard_normal((1, 4, 6))
    p = self_params(rng, 6)
    changed = x.copy()
    changed[:, -1] += 1.0
    assert not onp.allclose(self_attention(x, **p, n_head=3)[:, 0],
                            self_attention(changed, **p, n_head=3)[:, 0])


# ============================================================================ padding


def random_valid(rng, b, t):
    """0/1 (B, T) with at least one valid key per row (position 0 always valid)."""
    valid = (rng.random((b, t)) < 0.6).astype("float64")
    valid[:, 0] = 1.0
    return valid


@settings(max_examples=25, deadline=None)
@given(tq=st.integers(1, 4), tk=st.integers(1, 6), h=st.integers(1, 3), seed=seeds)
def test_padding_keys_get_zero_weight_and_do_not_change_the_output(tq, tk, h, seed):
    rng = rng_for(seed)
    c = 2 * h
    q, k, v = rng.standard_normal((2, tq, c)), rng.standard_normal((2, tk, c)), rng.standard_normal((2, tk, c))
    valid = random_valid(rng, 2, tk)
    mask = padding_mask(valid, dtype="float64")  # (B, 1, 1, Tk)
    c_proj = projection(rng, c, c)

    weights = attention_weights(split_heads(q, h), split_heads(k, h), mask)  # (B, H, Tq, Tk)
    onp.testing.assert_array_equal(weights[onp.broadcast_to(valid[:, None, None, :] == 0, weights.shape)], 0.0)
    onp.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-12)

    pad = valid == 0  # (B, Tk)
    k2, v2 = k.copy(), v.copy()
    k2[pad] = rng.standard_normal((int(pad.sum()), c)) * 10
    v2[pad] = rng.standard_normal((int(pad.sum()), c)) * 10
    before = multi_head_attention(q, k, v, c_proj, h, mask)
    after = multi_head_attention(q, k2, v2, c_proj, h, mask)
    onp.testing.assert_allclose(after, before, **TOL)
    # ... and it equals attending to the valid keys only, one sequence at a time
    for i in range(2):
        keep = valid[i] == 1
        alone = multi_head_attention(q[i:i + 1], k[i:i + 1, keep], v[i:i + 1, keep], c_proj, h)
        onp.testing.assert_allclose(before[i:i + 1], alone, **TOL)


def test_cross_attention_ignores_padded_memory():
    rng = rng_for(2)
    x, memory = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    valid = onp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    p = cross_params(rng, 4)
    mask = padding_mask(valid, dtype="float64")
    changed = memory.copy()
    changed[valid == 0] = 100.0
    onp.testing.assert_allclose(cross_attention(x, changed, **p, n_head=2, mask=mask),
                                cross_attention(x, memory, **p, n_head=2, mask=mask), **TOL)
    assert not onp.allclose(cross_attention(x, changed, **p, n_head=2),
                            cross_attention(x, memory, **p, n_head=2))
