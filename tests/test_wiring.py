"""Tests of the wiring between tested units: what each entry point passes down, not only that it runs.

Unit tests check a layer norm or an AdamW step alone; these check that a block feeds its MLP the
right layer norm, that a training step hands the optimizer the configured settings, that
evaluation switches dropout off, that few-shot prompts never contain their own answer, and so
on. Each was written against a bug that passed every other test (see
benchmarks/mutation_check.py, which puts such bugs in one at a time).
"""

import itertools
import math
from unittest import mock

import autograd
import autograd.numpy as anp
import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import decoding
from tinyllm import fewshot as fs
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.finetune import ClassifierConfig, classifier_loss, init_classifier
from tinyllm.models import gpt_loss, init_gpt
from tinyllm.ops import attention, attention_weights
from tinyllm.optim import adamw_init
from tinyllm.seq2seq import (Seq2SeqConfig, init_seq2seq, label_smoothed_cross_entropy_reference,
                             seq2seq_forward, seq2seq_loss)
from tinyllm.seq2seq_data import SEQ2SEQ_SPECIAL_TOKENS, make_arrays
from tinyllm.tokenizers import N_BYTES, BPETokenizer, CharTokenizer, merge_pair, split_into_chunks
from tinyllm.train import estimate_loss, train_step
from tinyllm.tree import flatten, tree_map, unflatten

seeds = st.integers(0, 2**16)


def jitter(params, rng, scale=0.1):
    """Every parameter moved off its initial value: gains off 1, biases and LoRA's B off 0, so
    that no gradient is zero by the accident of a symmetric start."""
    return tree_map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def assert_every_parameter_gets_gradient(loss, params):
    """Differentiated as training does it: through the flat {path: array} dict (train.py)."""
    grads = autograd.grad(lambda flat: loss(unflatten(flat)))(flatten(params))
    dead = [path for path, g in grads.items() if not onp.any(g != 0)]
    assert not dead, f"parameters with exactly zero gradient: {dead}"


# ----------------------------------------------------------------------------- gradients reach


@settings(max_examples=20, deadline=None)
@given(n_layer=st.integers(1, 2), n_head=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       tie=st.booleans(), b=st.integers(1, 3), t=st.integers(2, 6), seed=seeds)
def test_every_gpt_parameter_gets_a_gradient(n_layer, n_head, bias, tie, b, t, seed):
    """A block that normalises its MLP input with ln_1 instead of ln_2 still trains, but ln_2
    then gets exactly zero gradient: this catches any parameter the forward pass forgets."""
    config = GPTConfig(vocab_size=7, block_size=t, n_layer=n_layer, n_head=n_head, n_embd=8,
                       bias=bias, tie_weights=tie)
    rng = onp.random.default_rng(seed)
    params = jitter(init_gpt(config, rng, dtype="float64"), rng)
    ids = rng.integers(0, 7, (b, t))
    targets = rng.integers(0, 7, (b, t))
    assert_every_parameter_gets_gradient(lambda p: gpt_loss(p, ids, targets, config), params)


@settings(max_examples=15, deadline=None)
@given(arch=st.sampled_from(["decoder", "encoder"]), lora_rank=st.sampled_from([0, 1, 2]),
       b=st.integers(1, 3), seed=seeds)
def test_every_classifier_parameter_gets_a_gradient(arch, lora_rank, b, seed):
    config = ClassifierConfig(vocab_size=7, block_size=5, n_layer=2, n_head=2, n_embd=8,
                              n_classes=3, arch=arch, pooling="mean", lora_rank=lora_rank,
                              lora_alpha=2.0 * lora_rank)
    rng = onp.random.default_rng(seed)
    params = jitter(init_classifier(config, rng, dtype="float64"), rng)
    ids = rng.integers(0, 7, (b, 5))
    valid = onp.ones((b, 5))
    labels = rng.integers(0, 3, b)
    assert_every_parameter_gets_gradient(
        lambda p: classifier_loss(p, ids, valid, labels, config), params)


@settings(max_examples=15, deadline=None)
@given(positions=st.sampled_from(["sinusoidal", "learned"]), share=st.booleans(),
       tie=st.booleans(), seed=seeds)
def test_every_seq2seq_parameter_gets_a_gradient(positions, share, tie, seed):
    config = Seq2SeqConfig(vocab_size=9, block_size=6, n_layer=2, n_head=2, n_embd=8,
                           positions=positions, share_embeddings=share, tie_weights=tie)
    rng = onp.random.default_rng(seed)
    params = jitter(init_seq2seq(config, rng, dtype="float64"), rng)
    special = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    batch = make_arrays([list(rng.integers(3, 9, 5)), list(rng.integers(3, 9, 3))],
                        [list(rng.integers(3, 9, 4)), list(rng.integers(3, 9, 2))], special)
    assert_every_parameter_gets_gradient(lambda p: seq2seq_loss(p, batch, config, 0.1), params)


# ----------------------------------------------------------------------------- training step


def textbook_adamw(params, grads, m, v, step, lr, tc):
    """AdamW as Loshchilov & Hutter write it, with clipping by global norm before it: plain
    dicts of float64 arrays, written independently of tinyllm.optim."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = tc.grad_clip / (norm + 1e-6) if 0 < tc.grad_clip < norm else 1.0
    new_p, new_m, new_v = {}, {}, {}
    for key, p in params.items():
        g = grads[key] * scale
        new_m[key] = tc.beta1 * m[key] + (1 - tc.beta1) * g
        new_v[key] = tc.beta2 * v[key] + (1 - tc.beta2) * g * g
        m_hat = new_m[key] / (1 - tc.beta1**step)
        v_hat = new_v[key] / (1 - tc.beta2**step)
        decay = tc.weight_decay * p if p.ndim >= 2 else 0.0  # matrices only
        new_p[key] = p - lr * (m_hat / (onp.sqrt(v_hat) + 1e-8) + decay)
    return new_p, new_m, new_v


@settings(max_examples=30, deadline=None)
@given(beta1=st.sampled_from([0.5, 0.8, 0.9]), beta2=st.sampled_from([0.95, 0.99, 0.999]),
       weight_decay=st.sampled_from([0.0, 0.03, 0.5]), grad_clip=st.sampled_from([0.0, 0.05, 1e3]),
       lr=st.floats(1e-3, 0.1), seed=seeds)
def test_train_step_is_an_explicit_adamw_step_with_the_configured_settings(
        beta1, beta2, weight_decay, grad_clip, lr, seed):
    """Three steps of train_step against textbook AdamW for a config whose every optimizer
    setting differs from the defaults (clipping active at 0.05, off at 0 and at 1e3)."""
    tc = TrainConfig(beta1=beta1, beta2=beta2, weight_decay=weight_decay, grad_clip=grad_clip)
    rng = onp.random.default_rng(seed)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))

    def loss_fn(p, batch, rng_):
        xb, yb = batch
        return anp.sum((xb @ p["w"] + p["b"] - yb) ** 2)

    state = adamw_init(params)
    want_p = dict(params)
    want_m = {k: onp.zeros_like(p) for k, p in params.items()}
    want_v = {k: onp.zeros_like(p) for k, p in params.items()}
    got = params
    for step in range(1, 4):
        want_loss = float(loss_fn(want_p, (x, y), None))
        grads = autograd.grad(loss_fn)(want_p, (x, y), None)
        want_p, want_m, want_v = textbook_adamw(want_p, grads, want_m, want_v, step, lr, tc)
        got, state, loss, _ = train_step(autograd.value_and_grad(loss_fn), got, state, (x, y),
                                         lr, tc, None)
        assert loss == pytest.approx(want_loss, rel=1e-9)
    for key in params:
        onp.testing.assert_allclose(got[key], want_p[key], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_runs_without_dropout():
    """estimate_loss must call the loss without a Generator (dropout off): with dropout 0.5 its
    figure equals the deterministic loss of the same batches."""
    config = GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    params = init_gpt(config, onp.random.default_rng(0))
    data = onp.random.default_rng(1).integers(0, 7, 200)

    def sample(split, rng):
        starts = rng.integers(0, len(data) - 7, 4)
        window = data[starts[:, None] + onp.arange(7)]  # (4, 7)
        return window[:, :-1], window[:, 1:]

    def loss_fn(p, batch, rng):
        return gpt_loss(p, batch[0], batch[1], config, rng)

    got = estimate_loss(loss_fn, params, sample, 6, onp.random.default_rng(5))
    replay = onp.random.default_rng(5)
    for split in ("train", "val"):
        batches = [sample(split, replay) for _ in range(6)]
        want = onp.mean([float(loss_fn(params, b, None)) for b in batches])
        assert got[split] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- attention dropout


@settings(deadline=None)
@given(h=st.integers(1, 3), tq=st.integers(1, 5), tk=st.integers(1, 5),
       p=st.floats(0.1, 0.9), seed=seeds)
def test_attention_dropout_rescales_the_weights_it_keeps(h, tq, tk, p, seed):
    """With v = identity the output is the dropped attention weights themselves: every weight is
    either 0 or its undropped value / (1 - p), so the expected output is unchanged."""
    rng = onp.random.default_rng(seed)
    q = rng.standard_normal((1, h, tq, 3))
    k = rng.standard_normal((1, h, tk, 3))
    v = onp.broadcast_to(onp.eye(tk), (1, h, tk, tk))
    weights = attention_weights(q, k)  # (1, H, Tq, Tk)
    out = onp.asarray(attention(q, k, v, dropout_p=p, rng=onp.random.default_rng(seed)))
    kept = out != 0
    onp.testing.assert_allclose(out[kept], weights[kept] / (1.0 - p), rtol=1e-10)


# ----------------------------------------------------------------------------- in-context learning


TOKENIZER = CharTokenizer.train("abc0123\n")
ICL_CONFIG = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=12, n_layer=1, n_head=2,
                       n_embd=8)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 4), seed=seeds)
def test_icl_position_losses_are_next_token_losses(b, seed):
    """The loss at position t is -log p(token t + 1 | tokens <= t), as gpt_loss computes it when
    only position t counts."""
    rng = onp.random.default_rng(seed)
    params = init_gpt(ICL_CONFIG, rng, dtype="float64")
    windows = rng.integers(0, ICL_CONFIG.vocab_size, (b, ICL_CONFIG.block_size + 1))
    got = fs.position_losses(params, ICL_CONFIG, windows)  # (B, T)
    x, y = windows[:, :-1], windows[:, 1:]
    for t in range(ICL_CONFIG.block_size):
        mask = onp.zeros(x.shape)
        mask[:, t] = 1.0
        want = float(gpt_loss(params, x, y, ICL_CONFIG, mask=mask))
        assert got[:, t].mean() == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- few-shot prompts


FEWSHOT_TOKENIZER = CharTokenizer.train("abcdefghijmp0123456789\n")


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 10), shots=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
       seed=seeds)
def test_fewshot_never_shows_a_query_its_own_record(n, shots, seed):
    """evaluate_task's prompts, captured on their way to the scorer: k demonstrations, none of
    them the query's own record (the records here are all distinct, so a line identifies one)."""
    shots = [k for k in shots if k < n] or [0]
    lines = [f'{{"input": "{chr(97 + i)}", "output": "{i % 10}"}}' for i in range(n)]
    task = fs.parse_task(['{"instruction": "map"}', *lines], "distinct.jsonl")
    seen = []

    def spy(params, config, tokenizer, task_, prompts, records, k, use_cache=True, on_query=None):
        seen.extend((prompt, record, k) for prompt, record in zip(prompts, records))
        return [1] * len(prompts)

    with mock.patch.object(fs, "score_queries", spy):
        fs.evaluate_task(None, GPTConfig(block_size=64), FEWSHOT_TOKENIZER, task, shots, seed=seed)
    assert len(seen) == n * len(shots)
    for prompt, record, k in seen:
        demos = prompt.split("\n")[1:-1]  # the instruction first, the query input last
        assert len(demos) == k and prompt.endswith("\n" + record["input"])
        assert record["input"] + record["output"] not in demos


# ----------------------------------------------------------------------------- seq2seq


SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2}


@settings(max_examples=15, deadline=None)
@given(smoothing=st.floats(0.01, 0.5), seed=seeds)
def test_seq2seq_loss_is_label_smoothed_cross_entropy_of_its_logits(smoothing, seed):
    config = Seq2SeqConfig(vocab_size=9, block_size=6, n_layer=1, n_head=2, n_embd=8)
    rng = onp.random.default_rng(seed)
    params = init_seq2seq(config, rng, dtype="float64")
    batch = make_arrays([list(rng.integers(3, 9, 4)), list(rng.integers(3, 9, 2))],
                        [list(rng.integers(3, 9, 3)), list(rng.integers(3, 9, 1))], SPECIAL)
    src, src_valid, tgt_in, tgt_out, tgt_mask = batch
    logits = seq2seq_forward(params, src, tgt_in, config, src_valid)  # (B, T, V)
    want = label_smoothed_cross_entropy_reference(logits.reshape(-1, 9), tgt_out.reshape(-1),
                                                  tgt_mask.reshape(-1), smoothing)
    assert float(seq2seq_loss(params, batch, config, smoothing)) == pytest.approx(float(want))


def test_translate_texts_uses_beam_search_for_every_beam_size_above_one(monkeypatch):
    tok = CharTokenizer.train("abcdef", SEQ2SEQ_SPECIAL_TOKENS)
    config = Seq2SeqConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = init_seq2seq(config, onp.random.default_rng(0))
    calls = []
    real = decoding.beam_search

    def spy(params_, config_, src_ids, bos, eos, max_len, beam_size=4, alpha=0.6, use_cache=True):
        calls.append((beam_size, alpha))
        return real(params_, config_, src_ids, bos, eos, max_len, beam_size, alpha, use_cache)

    monkeypatch.setattr(decoding, "beam_search", spy)
    for k in (2, 3, 5):
        calls.clear()
        decoding.translate_texts(params, config, tok, ["abc", "fed"], beam_size=k, alpha=0.3,
                                 max_len=4)
        assert calls == [(k, 0.3), (k, 0.3)]
    calls.clear()
    decoding.translate_texts(params, config, tok, ["abc"], beam_size=1, max_len=4)
    assert calls == []  # beam 1 is greedy search, batched


BEAM_CONFIG = Seq2SeqConfig(vocab_size=5, block_size=6, n_layer=1, n_head=2, n_embd=8,
                            tie_weights=False)


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.0, 6.0), seed=seeds)
def test_an_exhaustive_beam_picks_the_best_length_penalised_hypothesis(alpha, seed):
    """With a beam wider than every possible prefix, beam search keeps them all: its answer must
    be the hypothesis with the best log p / lp(length), lp(n) = ((5 + n) / 6) ^ alpha (Wu et al.
    2016), found here by scoring every sequence of up to 2 tokens plus <eos> with the model."""
    rng = onp.random.default_rng(seed)
    params = init_seq2seq(BEAM_CONFIG, rng, dtype="float64")
    params["lm_head"]["w"] = params["lm_head"]["w"] * 50.0  # a peaked, input-dependent model
    src = [int(i) for i in rng.integers(3, 5, 3)]
    tokens = [t for t in range(5) if t != SPECIAL["<eos>"]]

    def score(content):
        tgt = onp.asarray([[SPECIAL["<bos>"], *content]])
        logits = seq2seq_forward(params, onp.asarray([src]), tgt, BEAM_CONFIG)[0]  # (T, V)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - onp.log(onp.exp(logp).sum(-1, keepdims=True))
        total = sum(logp[i, t] for i, t in enumerate([*content, SPECIAL["<eos>"]]))
        return total / ((5 + len(content) + 1) / 6) ** alpha

    every = [list(c) for n in range(3) for c in itertools.product(tokens, repeat=n)]
    best = max(score(c) for c in every)
    got = decoding.beam_search(params, BEAM_CONFIG, src, SPECIAL["<bos>"], SPECIAL["<eos>"],
                               max_len=3, beam_size=200, alpha=alpha)
    assert score(got) == pytest.approx(best, rel=1e-9)


# ----------------------------------------------------------------------------- BPE


@settings(max_examples=30, deadline=None)
@given(train_text=st.text(alphabet="ab c", min_size=20, max_size=120),
       text=st.text(alphabet="ab cd", max_size=60), extra=st.integers(1, 30))
def test_bpe_encoding_replays_the_merges_in_the_order_they_were_learned(train_text, text, extra):
    """Encoding must equal applying merge 0 to the whole chunk, then merge 1, and so on: what
    training did. Merging the leftmost known pair instead gives other (and more) tokens."""
    tok = BPETokenizer.train(train_text, N_BYTES + extra)
    for sample in (text, train_text):
        want = []
        for chunk in split_into_chunks(sample):
            ids = list(chunk.encode("utf-8"))
            for rank, pair in enumerate(tok.merges):
                ids = merge_pair(ids, pair, N_BYTES + rank)
            want += ids
        assert tok.encode(sample) == want


def test_batched_greedy_decoding_hides_source_padding_from_the_encoder(monkeypatch):
    """Sources of different lengths are padded into one batch: the encoder must get the padding
    mask (greedy tokens alone rarely show it, as attention to padding shifts logits only a little)."""
    config = Seq2SeqConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = init_seq2seq(config, onp.random.default_rng(0))
    src, valid = make_arrays([[3, 4, 5, 6], [7]], [[], []], SPECIAL)[:2]
    seen = []
    real = decoding.encoder_forward

    def spy(params_, src_, config_, src_valid=None, rng=None):
        seen.append(src_valid)
        return real(params_, src_, config_, src_valid, rng)

    monkeypatch.setattr(decoding, "encoder_forward", spy)
    decoding.greedy_decode(params, config, src, valid, SPECIAL["<bos>"], SPECIAL["<eos>"], 3)
    assert len(seen) == 1 and seen[0] is not None
    onp.testing.assert_array_equal(seen[0], valid)
