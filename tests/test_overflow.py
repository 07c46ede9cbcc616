"""Every guard against exp() overflow, reached: inputs large enough that the unguarded form is NaN.

exp(x) overflows at x > 709 in float64 and x > 88 in float32, and inf / inf is NaN. Each softmax
in tinyllm subtracts the row maximum first (softmax is unchanged by adding a constant to a row),
so logits of 1000 (float64) or 100 (float32) must give finite, correct results. Random test
inputs of ordinary size never get there, which is why these tests use large ones on purpose:
each expected value is the same function at the same inputs shifted down to a safe range.
"""

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import ops
from tinyllm.decoding import _next_log_probs
from tinyllm.finetune import ClassifierConfig, init_classifier, predict_proba
from tinyllm.generate import next_token_distribution
from tinyllm.seq2seq import Seq2SeqConfig, encoder_forward, init_seq2seq

# dtype -> a logit level at which exp() overflows in that dtype
HUGE = {"float64": 1000.0, "float32": 100.0}

dtypes = st.sampled_from(sorted(HUGE))
small = st.integers(1, 5)


def large_logits(rows, cols, dtype, seed):
    """(rows, cols) logits near HUGE[dtype], spread by a few units so the softmax is not flat."""
    rng = onp.random.default_rng(seed)
    return (HUGE[dtype] + 3.0 * rng.standard_normal((rows, cols))).astype(dtype)


@settings(deadline=None)
@given(rows=small, cols=small, dtype=dtypes, seed=st.integers(0, 2**16))
def test_softmax_and_log_softmax_at_overflowing_logits(rows, cols, dtype, seed):
    x = large_logits(rows, cols, dtype, seed)
    safe = x - HUGE[dtype]  # the same rows shifted to where exp() is harmless
    onp.testing.assert_allclose(ops.softmax(x), ops.softmax(safe), rtol=1e-4, atol=1e-6)
    onp.testing.assert_allclose(ops.log_softmax(x), ops.log_softmax(safe), rtol=1e-4, atol=1e-4)


@settings(deadline=None)
@given(rows=small, cols=st.integers(2, 6), dtype=dtypes, seed=st.integers(0, 2**16))
def test_cross_entropy_at_overflowing_logits(rows, cols, dtype, seed):
    x = large_logits(rows, cols, dtype, seed)
    targets = onp.random.default_rng(seed).integers(0, cols, rows)
    want = float(ops.cross_entropy_reference(x - HUGE[dtype], targets))
    assert onp.isfinite(want)
    assert float(ops.cross_entropy(x, targets)) == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert float(ops.cross_entropy_reference(x, targets)) == pytest.approx(want, rel=1e-4, abs=1e-4)


@settings(deadline=None)
@given(h=small, tq=small, tk=small, d=small, seed=st.integers(0, 2**16))
def test_fused_attention_at_scores_beyond_float32_exp(h, tq, tk, d, seed):
    """Every score lifted past 88 in float32 (where exp overflows): the fused weights must equal a
    float64 softmax computed here, and the output must be finite and right.

    The lift: one extra channel holding the same constant c in every q and k adds c^2 / sqrt(D)
    to every score, which changes no softmax row but takes every score to about 200.
    """
    rng = onp.random.default_rng(seed)
    big_d = d + 1
    c = onp.sqrt(200.0 * onp.sqrt(big_d))
    q = onp.concatenate([rng.standard_normal((1, h, tq, d)), onp.full((1, h, tq, 1), c)], -1)
    k = onp.concatenate([rng.standard_normal((1, h, tk, d)), onp.full((1, h, tk, 1), c)], -1)
    v = rng.standard_normal((1, h, tk, big_d))
    scores = q @ onp.swapaxes(k, -1, -2) / onp.sqrt(big_d)  # (1, H, Tq, Tk), float64
    assert scores.min() > 88.0
    want = onp.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    q32, k32, v32 = (a.astype("float32") for a in (q, k, v))
    onp.testing.assert_allclose(ops.attention_weights(q32, k32), want, rtol=1e-3, atol=1e-4)
    onp.testing.assert_allclose(ops.attention(q32, k32, v32), want @ v, rtol=1e-3, atol=1e-3)


@given(v=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_sampling_distribution_at_overflowing_logits(v, seed):
    logits = large_logits(1, v, "float64", seed)[0]
    got = next_token_distribution(logits, temperature=1.0)
    want = next_token_distribution(logits - HUGE["float64"], temperature=1.0)
    onp.testing.assert_allclose(got, want, atol=1e-9)


def test_beam_search_log_probs_at_overflowing_logits():
    """Decoding's log-probabilities, with an output head scaled until logits pass 1000."""
    config = Seq2SeqConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=16,
                           tie_weights=False)
    params = init_seq2seq(config, onp.random.default_rng(0))
    params["lm_head"]["w"] = params["lm_head"]["w"] * 1e5  # float32 weights, float64 log-probs
    memory = encoder_forward(params, onp.asarray([[3, 4, 5]]), config)
    logp = _next_log_probs(params, config, memory, None, onp.asarray([[1, 6]], dtype=onp.int32))
    assert onp.isfinite(logp).all()
    onp.testing.assert_allclose(onp.exp(logp).sum(-1), 1.0, rtol=1e-9)


def test_classifier_probabilities_at_overflowing_logits():
    config = ClassifierConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                              n_classes=3)
    params = init_classifier(config, onp.random.default_rng(0))
    params["cls_head"]["w"] = params["cls_head"]["w"] * 1e5  # logits in the thousands, float32
    ids = onp.random.default_rng(1).integers(0, 11, (4, 8))
    probs = predict_proba(params, ids, onp.ones((4, 8)), config)
    assert onp.isfinite(probs).all()
    onp.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
