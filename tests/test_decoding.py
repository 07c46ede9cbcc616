"""Tests of greedy and beam-search decoding (tinyllm/decoding.py)."""

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.decoding import (Output, Translation, _strip, beam_search, greedy_decode,
                              length_penalty, translate, translate_texts)
from tinyllm.errors import TinyLLMError
from tinyllm.seq2seq import Seq2SeqConfig, init_seq2seq
from tinyllm.seq2seq_data import SEQ2SEQ_SPECIAL_TOKENS, make_arrays
from tinyllm.tokenizers import CharTokenizer

CONFIG = Seq2SeqConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=16,
                       tie_weights=False)
PAD, BOS, EOS = 0, 1, 2


def random_params(seed):
    """Random weights with a sharper output head, so that outputs vary with seed and source."""
    params = init_seq2seq(CONFIG, onp.random.default_rng(seed))
    params["lm_head"]["w"] = params["lm_head"]["w"] * 100.0
    return params


def test_worked_helpers():
    assert length_penalty(7, 1.0) == 2.0 and length_penalty(3, 0.0) == 1.0
    assert _strip([5, 6, EOS, EOS], EOS) == [5, 6] and _strip([5, 6], EOS) == [5, 6]
    assert not _strip([5, 6, EOS, EOS], EOS).cut and _strip([5, 6], EOS).cut


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(3, 8), min_size=1, max_size=6))
def test_beam_size_one_is_greedy(seed, src):
    params = random_params(seed % 50)
    greedy = greedy_decode(params, CONFIG, onp.asarray([src]), onp.ones((1, len(src))), BOS, EOS, 7)
    assert beam_search(params, CONFIG, src, BOS, EOS, 7, beam_size=1) == greedy[0]


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 7), min_size=1, max_size=4))
def test_batched_greedy_equals_one_at_a_time(seed, lengths):
    rng = onp.random.default_rng(seed)
    params = random_params(seed % 50)
    sources = [list(rng.integers(3, 9, size=n)) for n in lengths]
    src, valid = make_arrays(sources, [[]] * len(sources),
                             {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS})[:2]
    batched = greedy_decode(params, CONFIG, src, valid, BOS, EOS, 7)
    for source, out in zip(sources, batched):
        assert greedy_decode(params, CONFIG, onp.asarray([source]), None, BOS, EOS, 7)[0] == out


def token_loving_params(token=EOS):
    """A model whose output is `token` at every step, whatever the input: the final norm's output
    is a constant (gain 0, shift e_0) and the untied head maps e_0 to a large `token` logit."""
    config = Seq2SeqConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=16,
                           tie_weights=False)
    params = init_seq2seq(config, onp.random.default_rng(0))
    params["dec_ln_f"]["g"][:] = 0.0
    params["dec_ln_f"]["b"][:] = onp.eye(16)[0]
    params["lm_head"]["w"][0, token] = 10.0
    return params, config


@pytest.mark.parametrize("beam_size", [0, -1, 2.0])
def test_beam_search_refuses_a_width_below_one(beam_size):
    # beam 0 kept no hypothesis and ended in max() of an empty list (a ValueError traceback)
    with pytest.raises(TinyLLMError, match="--beam-size must be a whole number of 1 or more"):
        beam_search(random_params(0), CONFIG, [3, 4], BOS, EOS, 7, beam_size=beam_size)


def test_decoding_stops_at_eos():
    params, config = token_loving_params(EOS)
    greedy = greedy_decode(params, config, onp.asarray([[3, 4]]), None, BOS, EOS, 7)
    beam = beam_search(params, config, [3, 4], BOS, EOS, 7, beam_size=3)
    assert greedy == [[]] and beam == []
    assert not greedy[0].cut and not beam.cut


@pytest.mark.parametrize("token", [PAD, BOS, 5])
def test_an_output_without_eos_is_reported_cut_at_the_length_limit(token):
    """Whatever the tokens, <pad> and <bos> too (which the text of a translation drops)."""
    params, config = token_loving_params(token)
    greedy = greedy_decode(params, config, onp.asarray([[3, 4], [5, 0]]),
                           onp.asarray([[1, 1], [1, 0]]), BOS, EOS, 6)
    beam = beam_search(params, config, [3, 4], BOS, EOS, 6, beam_size=3)
    for out in greedy + [beam]:
        assert out == [token] * 6 and out.cut


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.lists(st.integers(0, 8), min_size=1, max_size=7))
def test_beam_output_is_a_valid_sequence(seed, k, src):
    params = random_params(seed % 50)
    out = beam_search(params, CONFIG, src, BOS, EOS, 7, beam_size=k, alpha=0.6)
    assert len(out) <= 7 and all(0 <= t < 9 and t != EOS for t in out)


TEXT_TOKENIZER = CharTokenizer.train("abcdef", SEQ2SEQ_SPECIAL_TOKENS)  # 6 chars + 3 special = 9


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4),
       texts=st.lists(st.text(alphabet="abcdef", min_size=1, max_size=6), min_size=1, max_size=3))
def test_translate_texts_is_the_search_it_names_decoded(seed, k, texts):
    """beam_size 1 is batched greedy search, any larger beam is beam search with that beam; the
    ids each returns come back as text without special tokens."""
    tok = TEXT_TOKENIZER
    bos, eos = tok.special_tokens["<bos>"], tok.special_tokens["<eos>"]
    params = random_params(seed % 50)
    got = translate_texts(params, CONFIG, tok, texts, beam_size=k, alpha=0.6, max_len=5)
    hidden = set(tok.special_tokens.values())
    for text, out in zip(texts, got):
        src = tok.encode(text)
        if k == 1:
            ids = greedy_decode(params, CONFIG, onp.asarray([src]), None, bos, eos, 5)[0]
        else:
            ids = beam_search(params, CONFIG, src, bos, eos, 5, beam_size=k, alpha=0.6)
        assert out == tok.decode([i for i in ids if i not in hidden])
        assert len(out) <= 5 and not any(name in out for name in SEQ2SEQ_SPECIAL_TOKENS)


def test_translate_says_which_translations_were_cut():
    tok = TEXT_TOKENIZER
    special = tok.special_tokens
    for token, want in ((special["<eos>"], Translation("", False)),
                        (special["<pad>"], Translation("", True)),
                        (tok.encode("c")[0], Translation("ccccc", True))):
        params, config = token_loving_params(token)
        for k in (1, 2):
            assert translate(params, config, tok, ["ab", "fed"], beam_size=k, max_len=5) == \
                [want, want]
            assert translate_texts(params, config, tok, ["ab"], beam_size=k, max_len=5) == \
                [want.text]


def test_without_max_len_a_translation_stops_at_twice_its_source_plus_50(monkeypatch):
    """A model that never says <eos> must not decode a huge context's every step."""
    from tinyllm import decoding

    asked = []
    monkeypatch.setattr(decoding, "greedy_decode", lambda *args, **kw: asked.append(args[6])
                        or [Output([5], cut=False)] * len(args[2]))
    monkeypatch.setattr(decoding, "beam_search",
                        lambda *args, **kw: asked.append(args[5]) or Output([5], cut=False))
    tok = TEXT_TOKENIZER
    for block_size, beam, max_len, want in [(1 << 20, 1, None, 2 * 4 + 50),
                                            (1 << 20, 3, None, 2 * 4 + 50),
                                            (8, 1, None, 7), (1 << 20, 1, 500, 500)]:
        config = Seq2SeqConfig(**{**CONFIG.__dict__, "block_size": block_size})
        translate_texts(None, config, tok, ["ab", "abcd"], beam_size=beam, max_len=max_len)
        assert set(asked) == {want}, (block_size, beam, asked)
        asked.clear()
