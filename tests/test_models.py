"""Tests for tinyllm/models.py (GPT init, forward, loss), GPTConfig.validate and tinyllm/tree.py
(the parameter trees the models are made of)."""

import dataclasses
import math

import numpy as onp
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.config import GPTConfig
from tinyllm.errors import TinyLLMError
from tinyllm.models import count_params, gpt_forward, gpt_loss, init_gpt
from tinyllm.tree import flatten, tree_leaves, tree_map, unflatten

seeds = st.integers(0, 2**32 - 1)


def random_ids(rng, config, b=2, t=None):
    return rng.integers(0, config.vocab_size, size=(b, t or config.block_size))


# ============================================================================ causality


@settings(max_examples=50, deadline=None)
@given(t=st.integers(2, 8), seed=seeds, data=st.data())
def test_later_tokens_never_change_earlier_logits(tiny_config, make_params, t, seed, data):
    params = make_params(tiny_config, "float64", seed=1)
    rng = onp.random.default_rng(seed)
    ids = random_ids(rng, tiny_config, t=t)
    s = data.draw(st.integers(0, t - 2), label="last position kept")
    changed = ids.copy()
    # every token after s changes (adding 1..V-1 mod V never gives the same token back)
    changed[:, s + 1:] = (ids[:, s + 1:] + rng.integers(1, tiny_config.vocab_size, (2, t - s - 1))) % tiny_config.vocab_size
    before = gpt_forward(params, ids, tiny_config)
    after = gpt_forward(params, changed, tiny_config)
    assert before.shape == (2, t, tiny_config.vocab_size)
    onp.testing.assert_allclose(after[:, :s + 1], before[:, :s + 1], rtol=1e-10, atol=1e-12)
    assert not onp.allclose(after[:, s + 1], before[:, s + 1])  # the changed position does change


def test_earlier_tokens_do_change_later_logits(tiny_config, params64):
    # Guards the causality test: information does flow forwards.
    ids = random_ids(onp.random.default_rng(0), tiny_config, b=1)
    changed = ids.copy()
    changed[0, 0] = (ids[0, 0] + 1) % tiny_config.vocab_size
    assert not onp.allclose(gpt_forward(params64, ids, tiny_config)[0, -1],
                            gpt_forward(params64, changed, tiny_config)[0, -1])


# ============================================================================ loss


def test_fresh_model_loss_is_about_log_vocab():
    # At GPT-2 init the logits are near 0, so the prediction is near uniform: loss ~ ln V.
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
    rng = onp.random.default_rng(0)
    params = init_gpt(config, rng)
    ids = random_ids(rng, config, b=8)
    targets = random_ids(rng, config, b=8)
    loss = gpt_loss(params, ids, targets, config)
    assert abs(loss - math.log(64)) < 0.1


def test_loss_is_cross_entropy_of_the_logits(tiny_config, params64):
    rng = onp.random.default_rng(1)
    ids, targets = random_ids(rng, tiny_config), random_ids(rng, tiny_config)
    logits = gpt_forward(params64, ids, tiny_config)
    logp = logits - onp.log(onp.exp(logits).sum(-1, keepdims=True))
    picked = onp.take_along_axis(logp, targets[..., None], -1)[..., 0]  # (B, T)
    assert gpt_loss(params64, ids, targets, tiny_config) == pytest.approx(-picked.mean(), rel=1e-10)
    mask = (rng.random(targets.shape) < 0.5).astype("float64")
    mask[0, 0] = 1.0
    expected = -(picked * mask).sum() / mask.sum()
    assert gpt_loss(params64, ids, targets, tiny_config, mask=mask) == pytest.approx(expected, rel=1e-10)


# ============================================================================ gradients


GRAD_CONFIG = GPTConfig(vocab_size=7, block_size=4, n_layer=2, n_head=2, n_embd=4, bias=True)


def jittered(params, rng, scale=0.3):
    """Params moved away from init (gains not 1, biases not 0) so every gradient term matters."""
    return tree_map(lambda a: a + scale * rng.standard_normal(a.shape), params)


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_gradient_matches_finite_differences(tie_weights, bias):
    config = dataclasses.replace(GRAD_CONFIG, tie_weights=tie_weights, bias=bias)
    rng = onp.random.default_rng(2)
    params = jittered(init_gpt(config, rng, dtype="float64"), rng)
    ids, targets = random_ids(rng, config, b=2), random_ids(rng, config, b=2)
    mask = onp.array([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    check_grads(lambda p: gpt_loss(p, ids, targets, config), modes=["rev"], order=1)(params)
    check_grads(lambda p: gpt_loss(p, ids, targets, config, mask=mask), modes=["rev"], order=1)(params)


# ============================================================================ float32 discipline


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_params_give_float32_loss_logits_and_gradients(tiny_config, make_params, dropout):
    config = dataclasses.replace(tiny_config, dropout=dropout)
    params = make_params(config, "float32")
    rng = onp.random.default_rng(3)
    ids, targets = random_ids(rng, config), random_ids(rng, config)
    mask = onp.ones(ids.shape, dtype="float32")
    assert gpt_forward(params, ids, config, rng).dtype == onp.float32
    for m in (None, mask):
        loss = gpt_loss(params, ids, targets, config, onp.random.default_rng(4), m)
        assert onp.asarray(loss).dtype == onp.float32
        grads = grad(gpt_loss)(params, ids, targets, config, onp.random.default_rng(4), m)
        bad = {k: v.dtype for k, v in flatten(grads).items() if v.dtype != onp.float32}
        assert not bad, f"gradient leaves not float32: {bad}"
        assert flatten(grads).keys() == flatten(params).keys()


# ============================================================================ init


def expected_param_count(config):
    """Parameter count written out layer by layer (with B = 1 if config.bias else 0)."""
    v, t, c, n_layer = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    bias = 1 if config.bias else 0
    per_block = (
        (c + bias * c)  # ln_1: gain, shift
        + (c * 3 * c + bias * 3 * c)  # attn.c_attn: C -> 3C
        + (c * c + bias * c)  # attn.c_proj: C -> C
        + (c + bias * c)  # ln_2
        + (c * 4 * c + bias * 4 * c)  # mlp.c_fc: C -> 4C
        + (4 * c * c + bias * c)  # mlp.c_proj: 4C -> C
    )  # = 12 C^2 + (13 if bias else 2) C
    head = 0 if config.tie_weights else c * v
    return v * c + t * c + n_layer * per_block + (c + bias * c) + head


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_parameter_count(tiny_config, make_params, bias, tie_weights):
    config = dataclasses.replace(tiny_config, bias=bias, tie_weights=tie_weights)
    n = count_params(make_params(config))
    assert n == expected_param_count(config)
    # the same sum, once more as the closed form for the case with biases and a tied head
    if bias and tie_weights:
        v, t, c, n_layer = 11, 8, 16, 2
        assert n == v * c + t * c + n_layer * (12 * c * c + 13 * c) + 2 * c == 6896


def test_gpt2_init_statistics():
    config = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128,
                       tie_weights=False)
    params = init_gpt(config, onp.random.default_rng(5))
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's residual projection scale
    expected_std = {"wte": 0.02, "wpe": 0.02, "lm_head.w": 0.02}
    for i in range(config.n_layer):
        expected_std.update({
            f"h.{i}.attn.c_attn.w": 0.02, f"h.{i}.mlp.c_fc.w": 0.02,
            f"h.{i}.attn.c_proj.w": proj_std, f"h.{i}.mlp.c_proj.w": proj_std,
        })
    flat = flatten(params)
    for path, leaf in flat.items():
        assert leaf.dtype == onp.float32, path
        if path in expected_std:
            # the sample std of n >= 16k normals is within ~1% of the true std (5% is > 8 sigma)
            assert leaf.std() == pytest.approx(expected_std[path], rel=0.05), path
            assert abs(leaf.mean()) < 5 * expected_std[path] / math.sqrt(leaf.size), path
        elif path.endswith(".g"):
            onp.testing.assert_array_equal(leaf, 1.0, err_msg=path)
        else:
            assert path.endswith(".b"), f"unexpected parameter {path}"
            onp.testing.assert_array_equal(leaf, 0.0, err_msg=path)


def test_init_structure_follows_the_config(tiny_config, make_params):
    c, v = tiny_config.n_embd, tiny_config.vocab_size
    tied = make_params(tiny_config)
    untied = make_params(dataclasses.replace(tiny_config, tie_weights=False))
    assert "lm_head" not in tied
    assert set(flatten(untied)) - set(flatten(tied)) == {"lm_head.w"}
    assert untied["lm_head"]["w"].shape == (c, v)
    assert len(tied["h"]) == tiny_config.n_layer
    assert tied["h"][0]["attn"]["c_attn"]["w"].shape == (c, 3 * c)
    assert tied["h"][0]["mlp"]["c_proj"]["w"].shape == (4 * c, c)
    no_bias = make_params(dataclasses.replace(tiny_config, bias=False))
    assert not [p for p in flatten(no_bias) if p.endswith(".b")]
    assert {leaf.dtype for leaf in tree_leaves(make_params(tiny_config, "float64"))} == {onp.dtype("float64")}
    # same seed, same params
    for a, b in zip(tree_leaves(make_params(tiny_config, seed=3)), tree_leaves(make_params(tiny_config, seed=3))):
        onp.testing.assert_array_equal(a, b)


def test_untied_head_is_used_for_the_logits(tiny_config, make_params):
    config = dataclasses.replace(tiny_config, tie_weights=False)
    params = make_params(config, "float64")
    ids = random_ids(onp.random.default_rng(6), config)
    before = gpt_forward(params, ids, config)
    params["lm_head"]["w"] = params["lm_head"]["w"] * 2.0
    onp.testing.assert_allclose(gpt_forward(params, ids, config), 2.0 * before, rtol=1e-10)


# ============================================================================ dropout


def test_dropout_uses_the_rng_and_is_off_without_one(tiny_config, make_params):
    config = dataclasses.replace(tiny_config, dropout=0.2)
    params = make_params(config, "float64")
    ids = random_ids(onp.random.default_rng(7), config)

    def run(rng, cfg=config):
        return gpt_forward(params, ids, cfg, rng)

    first, second = run(onp.random.default_rng(1)), run(onp.random.default_rng(2))
    assert not onp.allclose(first, second)
    onp.testing.assert_array_equal(run(onp.random.default_rng(1)), first)  # reproducible
    no_dropout = run(None, dataclasses.replace(config, dropout=0.0))
    onp.testing.assert_array_equal(run(None), no_dropout)
    onp.testing.assert_array_equal(run(None), run(None))
    assert not onp.allclose(first, no_dropout)


# ============================================================================ errors


def test_sequence_longer_than_block_size_is_an_error(tiny_config, params32):
    ids = onp.zeros((1, tiny_config.block_size + 1), dtype=int)
    with pytest.raises(TinyLLMError, match="block_size"):
        gpt_forward(params32, ids, tiny_config)
    with pytest.raises(TinyLLMError, match="block_size"):
        gpt_loss(params32, ids, ids, tiny_config)
    assert gpt_forward(params32, ids[:, :-1], tiny_config).shape == (1, 8, 11)  # exactly T is fine


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -3])
def test_validate_rejects_non_positive_sizes(tiny_config, field, value):
    config = dataclasses.replace(tiny_config, **{field: value})
    with pytest.raises(TinyLLMError, match="--" + field.replace("_", "-")):
        config.validate()
    with pytest.raises(TinyLLMError):
        init_gpt(config, onp.random.default_rng(0))


def test_validate_rejects_n_embd_not_divisible_by_n_head(tiny_config):
    config = dataclasses.replace(tiny_config, n_embd=10, n_head=3)
    with pytest.raises(TinyLLMError, match="--n-embd") as err:
        config.validate()
    assert "--n-head" in str(err.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_validate_rejects_dropout_outside_zero_one(tiny_config, dropout):
    with pytest.raises(TinyLLMError, match="--dropout"):
        dataclasses.replace(tiny_config, dropout=dropout).validate()


def test_validate_returns_the_config(tiny_config):
    assert tiny_config.validate() is tiny_config
    assert GPTConfig().validate() == GPTConfig()


# ============================================================================ parameter trees

names = st.text("abcdefghij_", min_size=1, max_size=4)  # no dots, not all digits
leaves = st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False)
trees = st.recursive(
    leaves,
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(names, children, min_size=1, max_size=3),
    max_leaves=12,
)
containers = st.lists(trees, min_size=1, max_size=3) | st.dictionaries(names, trees, min_size=1, max_size=3)


@settings(max_examples=100, deadline=None)
@given(tree=containers)
def test_flatten_unflatten_round_trip(tree):
    flat = flatten(tree)
    assert all(isinstance(k, str) for k in flat)
    assert unflatten(flat) == tree
    assert tree_leaves(tree) == list(flat.values())


def test_flatten_worked_example_and_params_round_trip(params32):
    a, b = object(), object()
    assert flatten({"wte": a, "h": [{"g": b}]}) == {"wte": a, "h.0.g": b}
    assert unflatten({"wte": a, "h.0.g": b}) == {"wte": a, "h": [{"g": b}]}
    flat = flatten(params32)
    assert "h.1.attn.c_attn.w" in flat and "ln_f.g" in flat
    back = unflatten(flat)
    assert flatten(back).keys() == flat.keys()
    assert all(back_leaf is leaf for back_leaf, leaf in zip(tree_leaves(back), tree_leaves(params32)))


@settings(max_examples=50, deadline=None)
@given(tree=containers)
def test_tree_map_applies_f_to_every_leaf_and_keeps_the_structure(tree):
    doubled = tree_map(lambda x: 2 * x, tree)
    assert list(flatten(doubled)) == list(flatten(tree))
    assert tree_leaves(doubled) == [2 * x for x in tree_leaves(tree)]
    summed = tree_map(lambda x, y: x + y, tree, doubled)
    assert tree_leaves(summed) == [x + 2 * x for x in tree_leaves(tree)]


def test_tree_map_worked_example():
    out = tree_map(lambda a, b: a + b, {"w": 1, "h": [2]}, {"w": 10, "h": [20]})
    assert out == {"w": 11, "h": [22]}


# ============================================================================ the encoder


@settings(max_examples=25, deadline=None)
@given(perm_seed=st.integers(0, 2**16), b=st.integers(1, 3), t=st.integers(1, 8),
       n_head=st.sampled_from([1, 2, 4]), vocab=st.integers(1, 11))
def test_encoder_without_positions_is_permutation_equivariant(perm_seed, b, t, n_head, vocab):
    """Self-attention without a causal mask treats the input as a set: with the position
    embedding zeroed, permuting the tokens permutes the outputs the same way."""
    from tinyllm.models import bidirectional_hidden

    config = GPTConfig(vocab_size=vocab, block_size=8, n_layer=2, n_head=n_head, n_embd=16,
                       bias=True)
    params = init_gpt(config, onp.random.default_rng(0), dtype="float64")
    params["wpe"] = onp.zeros_like(params["wpe"])
    rng = onp.random.default_rng(perm_seed)
    ids = rng.integers(0, vocab, (b, t))
    perm = rng.permutation(t)
    out = bidirectional_hidden(params, ids, config)
    out_perm = bidirectional_hidden(params, ids[:, perm], config)
    onp.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n_real=st.integers(1, 8), n_pad=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_encoder_padding_never_changes_the_real_positions(n_real, n_pad, seed):
    from tinyllm.models import bidirectional_hidden

    config = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16, bias=True)
    params = init_gpt(config, onp.random.default_rng(1), dtype="float64")
    rng = onp.random.default_rng(seed)
    ids = rng.integers(0, 11, (1, n_real))
    padded = onp.concatenate([ids, rng.integers(0, 11, (1, n_pad))], axis=1)
    valid = onp.concatenate([onp.ones((1, n_real)), onp.zeros((1, n_pad))], axis=1)
    alone = bidirectional_hidden(params, ids, config)
    with_padding = bidirectional_hidden(params, padded, config, valid=valid)
    onp.testing.assert_allclose(with_padding[:, :n_real], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias,tie_weights", [(True, True), (False, False)])
def test_gpt_reference_equals_gpt_forward_in_value_and_gradient(bias, tie_weights):
    # The one-screen model of plain reference ops and the fused forward pass are the same function.
    import autograd.numpy as np

    from tinyllm.models import gpt_reference

    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=bias,
                       tie_weights=tie_weights)
    rng = onp.random.default_rng(7)
    params = jittered(init_gpt(config, rng, dtype="float64"), rng, 0.1)  # non-zero biases
    ids = rng.integers(0, 11, size=(3, 8))
    onp.testing.assert_allclose(gpt_reference(params, ids, config),
                                gpt_forward(params, ids, config), rtol=1e-10, atol=1e-12)
    w = rng.standard_normal((3, 8, 11))
    g_ref = flatten(grad(lambda p: np.sum(gpt_reference(p, ids, config) * w))(params))
    g_fused = flatten(grad(lambda p: np.sum(gpt_forward(p, ids, config) * w))(params))
    assert g_ref.keys() == g_fused.keys()
    for name in g_ref:
        onp.testing.assert_allclose(g_ref[name], g_fused[name], rtol=1e-9, atol=1e-11,
                                    err_msg=name)
