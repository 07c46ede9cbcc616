"""Attention maps (tinyllm/attention_maps.py): the weights collected per layer and head are the
ones the forward pass uses; the induction score on hand-made patterns; tokens as axis labels;
one-line errors. None of this needs matplotlib."""

import numpy as onp
import pytest

from tinyllm import attention_maps as am
from tinyllm.attention import cross_attention, merge_heads, self_attention, split_heads
from tinyllm.blocks import encoder_block, gpt_block
from tinyllm.checkpoint import save_checkpoint
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.models import embed, init_gpt
from tinyllm.ops import causal_mask, layer_norm, linear
from tinyllm.optim import adamw_init
from tinyllm.seq2seq import (Seq2SeqConfig, cross_decoder_block, embed_tokens, init_seq2seq,
                             target_table)
from tinyllm.tokenizers import BPETokenizer, CharTokenizer

F32 = dict(rtol=1e-4, atol=1e-5)


def jittered(params, seed=1):
    """Random weights everywhere (fresh layer norms are the identity and biases zero, which would
    hide a mix-up between two of them)."""
    rng = onp.random.default_rng(seed)
    if isinstance(params, dict):
        return {k: jittered(v, rng) for k, v in params.items()}
    if isinstance(params, list):
        return [jittered(v, rng) for v in params]
    return (params + rng.standard_normal(params.shape) * 0.3).astype(params.dtype)


def attend_with(weights, x, c_attn, c_proj, n_head):
    """Multi-head self-attention output rebuilt from given weights (H, T, T): (1, T, C)."""
    v = onp.split(linear(x, **c_attn), 3, axis=-1)[2]  # (1, T, C)
    return linear(merge_heads(weights[None] @ split_heads(v, n_head)), **c_proj)


@pytest.fixture(scope="module")
def gpt():
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True)
    return config, jittered(init_gpt(config, onp.random.default_rng(0)))


@pytest.mark.parametrize("causal", [True, False])
def test_gpt_maps_are_the_weights_each_block_uses(gpt, causal):
    config, params = gpt
    ids = [1, 4, 2, 9, 4, 2, 7]
    maps = am.gpt_attention(params, config, ids, causal=causal)
    assert maps.shape == (2, 2, 7, 7)
    onp.testing.assert_allclose(maps.sum(-1), 1.0, **F32)
    above = maps[..., onp.triu_indices(7, k=1)[0], onp.triu_indices(7, k=1)[1]]
    assert (onp.abs(above).max() < 1e-6) == causal  # the future is hidden only when causal
    x = embed(params, onp.array([ids]), config)
    mask = causal_mask(7) if causal else None
    for layer, block in enumerate(params["h"]):
        h = layer_norm(x, **block["ln_1"])
        rebuilt = attend_with(maps[layer], h, **block["attn"], n_head=2)
        onp.testing.assert_allclose(rebuilt, self_attention(h, **block["attn"], n_head=2, mask=mask),
                                    **F32)
        x = gpt_block(x, **block, n_head=2, mask=mask) if causal else \
            encoder_block(x, **block, n_head=2)


def test_seq2seq_maps_are_the_weights_each_block_uses():
    config = Seq2SeqConfig(vocab_size=12, block_size=10, n_layer=2, n_head=2, n_embd=16)
    params = jittered(init_seq2seq(config, onp.random.default_rng(0)))
    src, tgt = [3, 5, 7, 5, 9], [1, 4, 6]
    maps = am.seq2seq_attention(params, config, src, tgt)
    assert maps["encoder"].shape == (2, 2, 5, 5) and maps["decoder"].shape == (2, 2, 3, 3)
    assert maps["cross"].shape == (2, 2, 3, 5)
    assert maps["encoder"][0, 0, 0, 4] > 0  # the encoder sees the future; the decoder does not
    assert maps["decoder"][0, 0, 0, 2] < 1e-6
    x = embed_tokens(params["src_wte"], onp.array([src]), None, config)
    for layer, block in enumerate(params["encoder"]):
        h = layer_norm(x, **block["ln_1"])
        onp.testing.assert_allclose(attend_with(maps["encoder"][layer], h, **block["attn"], n_head=2),
                                    self_attention(h, **block["attn"], n_head=2), **F32)
        x = encoder_block(x, **block, n_head=2)
    memory = layer_norm(x, **params["enc_ln_f"])
    y = embed_tokens(target_table(params), onp.array([tgt]), None, config)
    mask = causal_mask(3)
    for layer, block in enumerate(params["decoder"]):
        h = layer_norm(y, **block["ln_1"])
        after_self = y + self_attention(h, **block["attn"], n_head=2, mask=mask)
        q_in = layer_norm(after_self, **block["ln_2"])
        xa = block["xattn"]
        v = onp.split(linear(memory, **xa["c_kv"]), 2, axis=-1)[1]
        rebuilt = linear(merge_heads(maps["cross"][layer][None] @ split_heads(v, 2)), **xa["c_proj"])
        onp.testing.assert_allclose(rebuilt, cross_attention(q_in, memory, **xa, n_head=2), **F32)
        y = cross_decoder_block(y, memory, **block, n_head=2, self_mask=mask)


# ----------------------------------------------------------------------------- induction score


def test_induction_targets_worked_example():
    a, b, two = 0, 1, 2
    assert am.induction_targets([a, b, two, a, b]) == {3: [1], 4: [2]}
    assert am.induction_targets([a, b, two, a, b], queries=[4]) == {4: [2]}
    assert am.induction_targets([a, a, b]) == {}  # the token after position 0 is the query itself
    assert am.induction_targets([a, b, a, b, a]) == {2: [1], 3: [2], 4: [1, 3]}


def test_induction_score_on_hand_made_patterns():
    ids = [0, 1, 2, 0, 1]  # a b c a b
    w = onp.eye(5)  # every query attends to itself: no induction
    assert am.induction_score(w, ids) == 0.0
    w = onp.zeros((5, 5))
    w[:3, 0] = 1.0
    w[3, [1, 3]] = [0.8, 0.2]  # the second a: 0.8 on the b after the first a
    w[4, [2, 0]] = [0.5, 0.5]  # the second b: 0.5 on the c after the first b
    assert am.induction_score(w, ids) == pytest.approx((0.8 + 0.5) / 2)
    assert am.induction_score(w, ids, queries=[3]) == pytest.approx(0.8)
    twice = onp.zeros((5, 5))
    twice[4, [1, 3, 4]] = [0.3, 0.4, 0.3]  # a b a b a: the last a follows two earlier a's
    assert am.induction_score(twice, [0, 1, 0, 1, 0], queries=[4]) == pytest.approx(0.7)
    perfect = onp.zeros((5, 5))
    perfect[:3, 0], perfect[3, 1], perfect[4, 2] = 1.0, 1.0, 1.0
    previous_token = onp.eye(5, k=-1)  # attends to the token before: the other common head
    previous_token[0, 0] = 1.0
    maps = onp.stack([onp.stack([previous_token, w]), onp.stack([onp.eye(5), perfect])])
    scores = am.induction_scores(maps, ids)
    assert scores.shape == (2, 2) and scores[1, 1] == 1.0 and scores[0, 0] == 0.0
    assert am.best_induction_head(maps, ids) == (1, 1, 1.0)
    assert onp.isnan(am.induction_score(perfect, [0, 1, 2, 3, 4]))  # nothing repeats
    with pytest.raises(TinyLLMError, match="occurs twice"):
        am.best_induction_head(maps, [0, 1, 2, 3, 4])


def test_kshot_prompt_queries_are_the_inputs():
    tok = CharTokenizer.train("abxy\nmap it")
    demos = [{"input": "a", "output": "x"}, {"input": "b", "output": "y"}]
    ids, queries = am.kshot_prompt(tok, None, demos, "a")
    assert tok.decode(ids) == "ax\nby\na" and queries == [0, 3, 6]
    assert am.induction_targets(ids, queries) == {6: [1]}  # the second a -> the x after the first
    ids, queries = am.kshot_prompt(tok, "map it", demos, "b")
    assert queries == [7, 10, 13]  # the instruction line comes first; its "a" counts as earlier
    assert am.induction_targets(ids, queries) == {7: [2], 13: [11]}


# ----------------------------------------------------------------------------- labels


def test_char_labels_show_white_space():
    tok = CharTokenizer.train("ab c\n\t", special_tokens=["<|endoftext|>"])
    ids = tok.encode("a b\n\tc") + [tok.special_tokens["<|endoftext|>"]]
    assert am.token_labels(tok, ids) == ["a", "\u2423", "b", "\u21b5", "\u21e5", "c", "<|endoftext|>"]
    assert am.visible("\x07x") == "\\x07x"


def test_bpe_labels_are_whole_tokens_and_show_partial_characters():
    tok = BPETokenizer.train("the cat the hat the mat " * 20 + "€", 262, ["<|endoftext|>"])
    ids = tok.encode(" the cat")
    labels = am.token_labels(tok, ids)
    assert "".join(labels).replace("\u2423", " ") == " the cat" and len(labels) < 8
    assert labels[0].startswith("\u2423")  # the space of " the" is shown
    euro = am.token_texts(tok, tok.encode("€"))  # three byte tokens, each part of one character
    assert euro == ["\\xe2", "\\x82", "\\xac"]


# ----------------------------------------------------------------------------- errors


def test_select_heads_ranges():
    maps = onp.zeros((2, 4, 3, 3))
    assert [t for t, _ in am.select_heads(maps)] == [f"layer 1, head {h}" for h in range(4)]
    assert [t for t, _ in am.select_heads(maps, 0, 3)] == ["layer 0, head 3"]
    with pytest.raises(TinyLLMError, match=r"--layer 2 is out of range: the model has 2 layers \(0 to 1\)"):
        am.select_heads(maps, 2)
    with pytest.raises(TinyLLMError, match=r"--head -1 is out of range"):
        am.select_heads(maps, 0, -1)


def test_a_layer_of_many_heads_is_drawn_up_to_max_panels():
    # before, every head was a panel: 64 heads of 256 tokens took 95 s to draw, and a run
    # directory claiming 1,024 heads asked for a picture taller than matplotlib can make
    maps = onp.zeros((1, am.MAX_PANELS + 8, 3, 3))
    assert [t for t, _ in am.select_heads(maps)] == [f"layer 0, head {h}"
                                                      for h in range(am.MAX_PANELS)]
    assert [t for t, _ in am.select_heads(maps, 0, am.MAX_PANELS + 7)] == [
        f"layer 0, head {am.MAX_PANELS + 7}"]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, gpt):
    config, params = gpt
    tok = CharTokenizer.train("abcdefghij ")
    out = str(tmp_path_factory.mktemp("run"))
    rng = onp.random.default_rng(0)
    save_checkpoint(out, params, adamw_init(params), rng.bit_generator.state, config, TrainConfig(),
                    tok, 0)
    return out


def test_checkpoint_attention_and_its_errors(gpt_run):
    maps = am.checkpoint_attention(gpt_run, "abc abc")
    assert maps.weights.shape == (2, 2, 7, 7) and maps.query_labels[3] == "\u2423"
    assert "causal" in maps.what
    with pytest.raises(TinyLLMError, match="--prompt has 9 tokens, more than the model's context of 8"):
        am.checkpoint_attention(gpt_run, "abcdefghi")
    with pytest.raises(TinyLLMError, match="--prompt: .*'z'"):
        am.checkpoint_attention(gpt_run, "abz")
    with pytest.raises(TinyLLMError, match="--prompt is empty"):
        am.checkpoint_attention(gpt_run, "")
    with pytest.raises(TinyLLMError, match="--part and --target apply to seq2seq runs"):
        am.checkpoint_attention(gpt_run, "abc", part="cross")


def test_lora_adapters_are_merged_before_the_maps_are_taken(tmp_path, gpt):
    from tinyllm.lora import LoRAGPTConfig, init_lora_gpt, merge_lora

    base, _ = gpt
    config = LoRAGPTConfig(**{**base.__dict__, "lora_rank": 2, "lora_alpha": 4.0})
    params = jittered(init_lora_gpt(config, onp.random.default_rng(0)))  # b != 0: adapters matter
    tok = CharTokenizer.train("abcdefghij ")
    save_checkpoint(str(tmp_path), params, adamw_init(params), {}, config, TrainConfig(), tok, 0,
                    kind="gpt-lora")
    maps = am.checkpoint_attention(str(tmp_path), "abc ab")
    merged = am.gpt_attention(merge_lora(params, 4.0, 2), base, tok.encode("abc ab"))
    onp.testing.assert_allclose(maps.weights, merged, **F32)
    plain = {k: v for k, v in params.items() if k != "lora"}
    assert not onp.allclose(maps.weights, am.gpt_attention(plain, base, tok.encode("abc ab")))


def test_a_model_with_an_unknown_token_reads_unseen_characters_as_it(tmp_path, gpt):
    # before, a char model fine-tuned with <|unk|> (as `finetune instruct` and `classify` make it)
    # refused a prompt with a character it never saw, which `generate` reads as <|unk|>
    from tinyllm.labelled_data import UNK_TOKEN

    config, params = gpt
    tok = CharTokenizer.train("abcdefghi ", special_tokens=(UNK_TOKEN,))  # 10 chars + unk = 11
    save_checkpoint(str(tmp_path), params, adamw_init(params), {}, config, TrainConfig(), tok, 0)
    maps = am.checkpoint_attention(str(tmp_path), "abé é")
    assert maps.unknown == 2 and maps.query_labels == ["a", "b", UNK_TOKEN, "\u2423", UNK_TOKEN]
    a, b, space, unk = tok.encode("a")[0], tok.encode("b")[0], tok.encode(" ")[0], 10
    onp.testing.assert_allclose(maps.weights,
                                am.gpt_attention(params, config, [a, b, unk, space, unk]), **F32)
    with pytest.raises(TinyLLMError, match="--prompt has 9 tokens"):
        am.checkpoint_attention(str(tmp_path), "ééééééééé")
