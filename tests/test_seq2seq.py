"""Tests of the encoder-decoder model (tinyllm/seq2seq.py) and its data (tinyllm/seq2seq_data.py):
positions, label smoothing, gradients, equivariance, padding invariance, causality, the schedule,
checkpoints, pair readers and the embedded task."""

import datetime
import math

import numpy as onp
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.checkpoint import load_checkpoint, save_checkpoint
from tinyllm.errors import TinyLLMError
from tinyllm.optim import adamw_init
from tinyllm.seq2seq import (Seq2SeqConfig, decoder_forward, encoder_forward, init_seq2seq,
                             label_smoothed_cross_entropy, label_smoothed_cross_entropy_reference,
                             seq2seq_forward, seq2seq_loss, sinusoidal_positions)
from tinyllm.seq2seq_run import noam_lr
from tinyllm.seq2seq_data import (SEQ2SEQ_SPECIAL_TOKENS, Pair, dates_task, make_arrays,
                                  read_pairs, readable_pairs, split_pairs)
from tinyllm.tokenizers import CharTokenizer

TINY = Seq2SeqConfig(vocab_size=13, block_size=10, n_layer=2, n_head=2, n_embd=16)
SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2}


def params_for(config=TINY, dtype="float64", seed=0):
    return init_seq2seq(config, onp.random.default_rng(seed), dtype=dtype)


def tiny_batch(seed=0):
    """Three pairs of different lengths, padded: exercises both padding masks."""
    rng = onp.random.default_rng(seed)
    sources = [list(rng.integers(3, 13, size=n)) for n in (5, 2, 4)]
    targets = [list(rng.integers(3, 13, size=n)) for n in (3, 4, 1)]
    return make_arrays(sources, targets, SPECIAL)


# ----------------------------------------------------------------------------- positions, init


def test_sinusoidal_positions_follow_the_paper():
    pe = sinusoidal_positions(5, 2)
    assert onp.allclose(pe[:, 0], onp.sin(onp.arange(5)), atol=1e-6)  # rate 10000^0 = 1
    assert onp.allclose(pe[:, 1], onp.cos(onp.arange(5)), atol=1e-6)
    pe = sinusoidal_positions(7, 8)
    assert pe.dtype == onp.float32
    assert onp.allclose(pe[0], [0, 1] * 4)
    assert pe[3, 2] == pytest.approx(math.sin(3 / 10000 ** (2 / 8)), abs=1e-6)


def test_init_shapes_and_options():
    p = params_for(TINY)
    assert "tgt_wte" not in p and "lm_head" not in p and "src_wpe" not in p  # shared, tied
    assert p["decoder"][0]["xattn"]["c_kv"]["w"].shape == (16, 32)
    assert len(p["encoder"]) == len(p["decoder"]) == 2
    other = Seq2SeqConfig(vocab_size=13, block_size=10, n_layer=1, n_head=2, n_embd=16,
                          positions="learned", share_embeddings=False, tie_weights=False)
    q = params_for(other)
    assert q["tgt_wte"].shape == (13, 16) and q["src_wpe"].shape == (10, 16)
    assert q["lm_head"]["w"].shape == (16, 13)


def test_bad_config_is_a_one_line_error():
    with pytest.raises(TinyLLMError, match="--positions"):
        Seq2SeqConfig(positions="rotary").validate()
    with pytest.raises(TinyLLMError, match="divisible"):
        Seq2SeqConfig(n_embd=10, n_head=4).validate()


# ----------------------------------------------------------------------------- loss


def test_label_smoothing_hand_example():
    logits = onp.zeros((1, 2))
    assert float(label_smoothed_cross_entropy(logits, onp.array([1]), onp.ones(1), 0.1)) == \
        pytest.approx(math.log(2))
    # logits [0, ln 3]: p = [1/4, 3/4]; q = [0.05, 0.95]: -(0.05 ln 1/4 + 0.95 ln 3/4)
    logits = onp.array([[0.0, math.log(3.0)]])
    want = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert float(label_smoothed_cross_entropy(logits, onp.array([1]), onp.ones(1), 0.1)) == \
        pytest.approx(want)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.1, 0.3]), st.integers(1, 8),
       st.integers(1, 8))
def test_label_smoothing_fused_equals_reference(seed, eps, n, v):
    rng = onp.random.default_rng(seed)
    logits = rng.standard_normal((n, v))
    targets = rng.integers(0, v, size=n)
    mask = (rng.random(n) < 0.7).astype(float)
    fused = lambda x: label_smoothed_cross_entropy(x, targets, mask, eps)  # noqa: E731
    ref = lambda x: label_smoothed_cross_entropy_reference(x, targets, mask, eps)  # noqa: E731
    assert float(fused(logits)) == pytest.approx(float(ref(logits)), rel=1e-10, abs=1e-12)
    assert onp.allclose(grad(fused)(logits), grad(ref)(logits), atol=1e-10)


def test_full_loss_gradients_match_finite_differences():
    params = params_for(TINY)
    batch = tiny_batch()
    check_grads(lambda p: seq2seq_loss(p, batch, TINY, smoothing=0.1), modes=["rev"], order=1)(params)


def test_learned_positions_untied_gradients():
    config = Seq2SeqConfig(vocab_size=13, block_size=10, n_layer=1, n_head=2, n_embd=8,
                           positions="learned", share_embeddings=False, tie_weights=False)
    batch = tiny_batch(1)
    check_grads(lambda p: seq2seq_loss(p, batch, config, smoothing=0.2), modes=["rev"],
                order=1)(params_for(config))


def test_loss_stays_float32():
    loss = seq2seq_loss(params_for(dtype="float32"), tiny_batch(), TINY, smoothing=0.1)
    assert onp.asarray(loss).dtype == onp.float32
    assert 1.5 < float(loss) < 4.0  # about ln 13 = 2.56 at initialisation


# ----------------------------------------------------------------------------- structure


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 10), st.sampled_from([1, 2, 4]))
def test_encoder_without_positions_is_permutation_equivariant(seed, b, s, n_head):
    config = Seq2SeqConfig(vocab_size=13, block_size=10, n_layer=2, n_head=n_head, n_embd=16,
                           positions="none")
    rng = onp.random.default_rng(seed)
    params = params_for(config, seed=seed % 7)
    src = rng.integers(0, 13, size=(b, s))
    perm = rng.permutation(s)
    out = encoder_forward(params, src, config)
    assert onp.allclose(encoder_forward(params, src[:, perm], config), out[:, perm], atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from(["sinusoidal", "learned"]),
       st.integers(1, 6), st.integers(1, 10), st.sampled_from([1, 2, 4]))
def test_source_padding_never_changes_decoder_outputs(seed, extra, positions, s, t, n_head):
    config = Seq2SeqConfig(vocab_size=13, block_size=10, n_layer=2, n_head=n_head, n_embd=16,
                           positions=positions)
    rng = onp.random.default_rng(seed)
    params = params_for(config, seed=seed % 5)
    src = rng.integers(3, 13, size=(1, s))
    tgt = rng.integers(3, 13, size=(1, t))
    plain = seq2seq_forward(params, src, tgt, config, onp.ones((1, s)))
    junk = rng.integers(0, 13, size=(1, extra))  # whatever sits in the padding must not matter
    padded_src = onp.concatenate([src, junk], axis=1)
    valid = onp.concatenate([onp.ones((1, s)), onp.zeros((1, extra))], axis=1)
    assert onp.allclose(seq2seq_forward(params, padded_src, tgt, config, valid), plain, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 10), st.integers(1, 10),
       st.data())
def test_decoder_is_causal(seed, batch, s, t, data):
    changed = data.draw(st.integers(0, t - 1))
    rng = onp.random.default_rng(seed)
    params = params_for(seed=seed % 5)
    memory = encoder_forward(params, rng.integers(0, 13, size=(batch, s)), TINY)
    tgt = rng.integers(0, 13, size=(batch, t))
    other = tgt.copy()
    other[0, changed] = (tgt[0, changed] + 1) % 13
    a, b = decoder_forward(params, tgt, memory, TINY), decoder_forward(params, other, memory, TINY)
    assert onp.allclose(a[:, :changed], b[:, :changed], atol=1e-12)  # the past does not see it
    assert not onp.allclose(a[:, changed], b[:, changed])  # the position itself does


# ----------------------------------------------------------------------------- schedule, checkpoint


def test_noam_schedule_worked_example():
    peak = noam_lr(399, 128, 400)
    assert peak == pytest.approx(128**-0.5 * 400**-0.5)
    assert noam_lr(0, 128, 400) == pytest.approx(peak / 400)  # linear warm-up from step 1
    assert noam_lr(1599, 128, 400) == pytest.approx(peak / 2)  # 1/sqrt(step) decay
    assert max(noam_lr(i, 128, 400) for i in range(2000)) == pytest.approx(peak)


def test_checkpoint_round_trip(tmp_path):
    from tinyllm.config import TrainConfig

    params = params_for(dtype="float32")
    tok = CharTokenizer.train("abcdefghij", SEQ2SEQ_SPECIAL_TOKENS)
    config = Seq2SeqConfig(vocab_size=tok.vocab_size, block_size=10, n_layer=2, n_head=2, n_embd=16)
    params = init_seq2seq(config, onp.random.default_rng(0))
    save_checkpoint(tmp_path, params, adamw_init(params), {}, config, TrainConfig(), tok, 3,
                    kind="seq2seq")
    ckpt = load_checkpoint(tmp_path, kind="seq2seq")
    assert ckpt.model_config == config
    assert onp.array_equal(ckpt.params["decoder"][1]["xattn"]["c_q"]["w"],
                           params["decoder"][1]["xattn"]["c_q"]["w"])
    with pytest.raises(TinyLLMError, match="seq2seq"):
        load_checkpoint(tmp_path)  # a GPT loader refuses it with a clear message


# ----------------------------------------------------------------------------- data


def test_make_arrays_worked_example():
    src, valid, tgt_in, tgt_out, mask = make_arrays([[5, 6], [7]], [[8], [9, 10]], SPECIAL)
    assert src.tolist() == [[5, 6], [7, 0]] and valid.tolist() == [[1, 1], [1, 0]]
    assert tgt_in.tolist() == [[1, 8, 0], [1, 9, 10]]
    assert tgt_out.tolist() == [[8, 2, 0], [9, 10, 2]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_tsv_splits_on_first_tab_and_keeps_quotes(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('"Open" file\tOuvrir « fichier »\twith\ttabs\n\nsay "hi"\t"salut"\r\n',
                    encoding="utf-8")
    pairs = read_pairs(str(path))
    assert [(p.source, p.target) for p in pairs] == [
        ('"Open" file', "Ouvrir « fichier »\twith\ttabs"), ('say "hi"', '"salut"')]
    assert pairs[1].where.endswith("line 3")


def test_jsonl_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"source": "a\\tb", "target": "c"}\n{"source": "d", "target": "e"}\n')
    assert [(p.source, p.target) for p in read_pairs(str(path))] == [("a\tb", "c"), ("d", "e")]


@pytest.mark.parametrize("content, words", [
    ("a\tb\nno tab here\n", ["line 2", "no tab"]),
    ("a\tb\n\tb\n", ["line 2", "source is empty"]),
    ("a\t \n", ["line 1", "target is empty"]),
    ("source,target\nOpen,Ouvrir\n", ["line 1", "no tab", "TSV or JSONL, not CSV"]),
])
def test_bad_tsv_lines_name_file_and_line(tmp_path, content, words):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(TinyLLMError) as err:
        read_pairs(str(path))
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.jsonl"])
def test_a_byte_order_mark_is_no_part_of_the_first_source(tmp_path, name):
    # a Windows editor writes one: it made a JSONL file 'not valid JSON' at line 1, and a TSV
    # file's first source start with an invisible character that entered the vocabulary
    path = tmp_path / name
    lines = ('{"source": "a", "target": "b"}', '{"source": "c", "target": "d"}') if name.endswith(
        "jsonl") else ("a\tb", "c\td")
    path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert [(p.source, p.target) for p in read_pairs(str(path))] == [("a", "b"), ("c", "d")]


def test_a_json_array_of_pairs_is_named_as_such(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n{"source": "a", "target": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(TinyLLMError, match=r"pairs\.json line 1: a JSON array; .* per line"):
        read_pairs(str(path))


def test_bad_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    with pytest.raises(TinyLLMError, match="line 2"):
        read_pairs(str(path))


@pytest.mark.parametrize("line, words", [
    ('{"source": "a\\ud800", "target": "b"}', ["line 2", "source", "unpaired surrogate"]),
    ('{"source": "a", "target": "\\udfff"}', ["line 2", "target", "unpaired surrogate"]),
    ("[" * 100_000 + "]" * 100_000, ["line 2", "nested too deeply"]),
])
def test_jsonl_lines_python_cannot_take_are_one_line_errors(tmp_path, line, words):
    # a lone surrogate escape passes json.loads and then broke the sha256 of the data (and the
    # tokenizer); nesting past the stack raised RecursionError: both were tracebacks
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "a", "target": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TinyLLMError) as err:
        read_pairs(str(path))
    assert all(word in str(err.value) for word in [str(path), *words]), str(err.value)


def test_readable_pairs_worked_example():
    tok = CharTokenizer.train("abc", SEQ2SEQ_SPECIAL_TOKENS)
    pairs = [Pair("ab", "é", "f line 1"), Pair("aé", "b", "f line 2"),
             Pair("abca", "b", "f line 3")]
    readable, reasons = readable_pairs(tok, pairs, block_size=3)
    assert readable == pairs[:1]  # an unknown character in a target is no reason: it is not read
    assert reasons[0].startswith("f line 2: text has character 'é' at position 1")
    assert reasons[1] == ("f line 3: the source has 4 tokens, more than the context of 3"
                          " (--block-size)")


def test_split_holds_out_every_tenth():
    pairs = [Pair(str(i), str(i), "") for i in range(1, 26)]
    train, held = split_pairs(pairs)
    assert [p.source for p in held] == ["10", "20"] and len(train) == 23


def test_dates_task_is_reproducible_and_held_out_dates_are_unseen():
    train, held = dates_task(seed=0, n_train=3000, n_held_out=200)
    again, _ = dates_task(seed=0, n_train=3000, n_held_out=200)
    assert train == again
    assert not {p.target for p in held} & {p.target for p in train}
    # every source is one of the six documented ways to write its target's date, and each way
    # occurs; the month names come from datetime here, not from calendar as in the package
    seen_styles = set()
    for pair in train + held:
        date = datetime.date.fromisoformat(pair.target)
        y, d, month, abbr = date.year, date.day, date.strftime("%B"), date.strftime("%b")
        styles = [f"{d} {month} {y}", f"{month} {d}, {y}", f"{d} {abbr} {y}", f"{abbr} {d}, {y}",
                  date.strftime("%d/%m/%Y"), date.strftime("%Y.%m.%d")]
        assert pair.source in styles, pair
        seen_styles.add(styles.index(pair.source))
    assert seen_styles == set(range(6))
    assert all(len(p.target) == 10 and p.target[4] == "-" for p in held)


def test_every_bad_line_of_a_pairs_file_is_named_in_one_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("source\ttarget\na\tb\nno tab\n\n\tb\nc\td\n", encoding="utf-8")
    with pytest.raises(TinyLLMError) as err:
        read_pairs(str(path))
    assert str(err.value) == (
        f"{path} line 3: no tab between source and target (expected source<TAB>target)"
        f" (and 1 more bad record: {path} line 5: the source is empty)")
