"""Tests for tinyllm/mlm.py (BERT's masking, the loss over chosen positions, fill) and for
masked-language-model pretraining through `tinyllm pretrain --objective mlm`: the checkpoint's
kind, resume, and the commands that refuse an MLM model or start from one."""

import json
import math
import re
import shutil
from dataclasses import replace

import numpy as onp
import pytest
from autograd.test_util import check_grads
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import fast
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.mlm import (MASK_RATE, REPLACE_WITH_MASK, REPLACE_WITH_RANDOM, choose_positions,
                         chosen_count, encode_with_masks, fill_masks, filled_text, mask_tokens, masked_accuracy,
                         mlm_logits, mlm_loss)
from tinyllm.attention_maps import gpt_attention
from tinyllm.models import bidirectional_hidden, lm_head_weight
from tinyllm.ops import DISTANCE_BIAS_FLOOR, cross_entropy_reference, distance_bias
from tinyllm.tokenizers import MASK_TOKEN, CharTokenizer
from tinyllm.pretrain import pretrain
from tinyllm.train import read_metrics

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12
MODEL = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1, bias=False)
TRAIN = TrainConfig(batch_size=4, max_iters=6, eval_interval=3, eval_iters=2, lr=1e-2,
                    min_lr=1e-3, warmup_iters=2, seed=5)
TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--block-size", "16", "--batch-size", "4", "--eval-iters", "1"]
MASK_ID, N_ORDINARY = 1000, 1000  # a large vocabulary: a random token rarely equals the original


def quiet(_message):
    """A log function that drops the messages."""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]


# ============================================================================ masking


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(8, 64))
def test_masking_follows_the_80_10_10_rule_in_distribution(seed, t):
    rng = onp.random.default_rng(seed)
    ids = rng.integers(0, N_ORDINARY, size=(400, t))
    inputs, chosen = mask_tokens(ids, onp.ones(ids.shape), rng, MASK_ID, N_ORDINARY)
    n = chosen.sum()
    assert n == 400 * chosen_count(t)  # exactly 15% (rounded) of each row
    masked = (chosen & (inputs == MASK_ID)).sum() / n
    kept = (chosen & (inputs == ids)).sum() / n
    replaced = (chosen & (inputs != ids) & (inputs != MASK_ID)).sum() / n
    keep_share = 1 - REPLACE_WITH_MASK - REPLACE_WITH_RANDOM
    # 5 standard deviations of a binomial share: a wrong rule (say 70/20/10) is far outside
    for share, want in ((masked, REPLACE_WITH_MASK), (replaced, REPLACE_WITH_RANDOM),
                        (kept, keep_share)):
        assert abs(share - want) < 5 * math.sqrt(want * (1 - want) / n) + 1e-3, (masked, replaced, kept)
    assert (inputs[~chosen] == ids[~chosen]).all()  # nothing else is touched


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lengths=st.lists(st.integers(0, 24), min_size=1,
                                                         max_size=6))
def test_masking_never_chooses_padding_and_chooses_15_percent_of_the_real_tokens(seed, lengths):
    rng = onp.random.default_rng(seed)
    t = 24
    valid = (onp.arange(t)[None, :] < onp.asarray(lengths)[:, None]).astype("float32")  # (B, T)
    ids = rng.integers(0, N_ORDINARY, size=valid.shape)
    inputs, chosen = mask_tokens(ids, valid, rng, MASK_ID, N_ORDINARY)
    assert not chosen[valid == 0].any()
    assert (inputs[valid == 0] == ids[valid == 0]).all()  # padding stays as it was
    for row, n_real in enumerate(lengths):
        assert chosen[row].sum() == (chosen_count(n_real) if n_real else 0)


def test_chosen_count_worked_examples():
    assert chosen_count(256) == 38 and chosen_count(10) == 2 and chosen_count(3) == 1
    assert MASK_RATE == 0.15


def test_choose_positions_is_uniform_over_the_real_positions():
    rng = onp.random.default_rng(0)
    valid = onp.ones((20000, 10))
    hits = choose_positions(valid, rng).mean(axis=0)  # 2 of 10 chosen: 0.2 at every position
    onp.testing.assert_allclose(hits, 0.2, atol=0.015)


def test_random_replacements_are_ordinary_tokens():
    rng = onp.random.default_rng(1)
    ids = onp.zeros((500, 32), dtype=onp.int64)  # every original token is 0
    inputs, chosen = mask_tokens(ids, onp.ones(ids.shape), rng, mask_id=12, n_ordinary=10)
    replaced = inputs[chosen & (inputs != 0) & (inputs != 12)]
    assert len(replaced) > 100 and replaced.max() < 10  # never 10, 11 (special) or 12 (mask)


# ============================================================================ loss and model


def batch(config, seed=0, b=3):
    rng = onp.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size - 1, size=(b, config.block_size))
    inputs, chosen = mask_tokens(ids, onp.ones(ids.shape), rng, config.vocab_size - 1,
                                 config.vocab_size - 1, rate=0.3)
    return inputs, ids, chosen


def test_loss_is_the_mean_cross_entropy_over_the_chosen_positions_only(tiny_config, params64):
    inputs, targets, chosen = batch(tiny_config)
    # independent reference: every position's logits, then a masked mean
    hidden = bidirectional_hidden(params64, inputs, tiny_config)  # (B, T, C)
    logits = (hidden @ lm_head_weight(params64)).reshape(-1, tiny_config.vocab_size)
    want = cross_entropy_reference(logits, targets.reshape(-1), chosen.reshape(-1).astype(float))
    got = mlm_loss(params64, inputs, targets, chosen, tiny_config)
    assert got == pytest.approx(float(want), rel=1e-10)
    # a target outside the chosen positions counts for nothing; one inside does
    other = targets.copy()
    other[~chosen] = (other[~chosen] + 1) % tiny_config.vocab_size
    assert mlm_loss(params64, inputs, other, chosen, tiny_config) == pytest.approx(got, rel=1e-12)
    other = targets.copy()
    b, t = onp.argwhere(chosen)[0]
    other[b, t] = (other[b, t] + 1) % tiny_config.vocab_size
    assert mlm_loss(params64, inputs, other, chosen, tiny_config) != pytest.approx(got, rel=1e-6)


def test_loss_gradient_matches_finite_differences(tiny_config, params64):
    inputs, targets, chosen = batch(tiny_config, seed=3)

    def loss_of(wte, c_fc):
        block = {**params64["h"][0], "mlp": {**params64["h"][0]["mlp"],
                                             "c_fc": {**params64["h"][0]["mlp"]["c_fc"], "w": c_fc}}}
        params = {**params64, "wte": wte, "h": [block] + params64["h"][1:]}
        return mlm_loss(params, inputs, targets, chosen, tiny_config)

    check_grads(loss_of, modes=["rev"], order=1)(params64["wte"], params64["h"][0]["mlp"]["c_fc"]["w"])


def test_an_encoder_position_depends_on_later_tokens(tiny_config, params64):
    """The opposite of the decoder's causality test: the first position sees the last token."""
    ids = onp.random.default_rng(0).integers(0, tiny_config.vocab_size, (1, tiny_config.block_size))
    changed = ids.copy()
    changed[0, -1] = (ids[0, -1] + 1) % tiny_config.vocab_size
    rows = onp.array([0])
    before = mlm_logits(params64, ids, rows, tiny_config)
    after = mlm_logits(params64, changed, rows, tiny_config)
    assert not onp.allclose(before, after)


# ============================================================================ fill


def char_tokenizer():
    return CharTokenizer.train("abc ", special_tokens=("<|endoftext|>", MASK_TOKEN))


def test_encode_with_masks_worked_examples():
    tok = char_tokenizer()  # a=1 b=2 c=3 ' '=0, <|endoftext|>=4, <|mask|>=5
    assert encode_with_masks(tok, "a[MASK]c") == [1, 5, 3]
    assert encode_with_masks(tok, "[MASK] b [MASK]") == [5, 0, 2, 0, 5]  # char: spaces are kept
    with pytest.raises(TinyLLMError, match=r"no \[MASK\]"):
        encode_with_masks(tok, "abc")
    with pytest.raises(TinyLLMError, match="pretrain with --objective mlm"):
        encode_with_masks(CharTokenizer.train("abc"), "a[MASK]")


@pytest.mark.parametrize("text, position", [("ab [MASK] cd", 11), ("[MASK]a[MASK]d", 13),
                                             ("d", 0)])
def test_an_unknown_character_is_named_at_its_position_in_the_whole_text(text, position):
    """Not at its position in the piece between two masks (" cd" would say 2)."""
    with pytest.raises(TinyLLMError, match=f"'d' at position {position} "):
        encode_with_masks(char_tokenizer(), text + "[MASK]" * (text == "d"))


def test_a_byte_that_is_not_utf8_is_named_at_its_position_in_the_whole_text():
    from tinyllm.tokenizers import BPETokenizer

    tok = BPETokenizer.train(TEXT, 300, special_tokens=("<|endoftext|>", MASK_TOKEN))
    with pytest.raises(TinyLLMError, match="byte 0xff at position 9,"):
        encode_with_masks(tok, "a [MASK] \udcff")  # how Python reads byte 0xff of argv


def test_bpe_puts_the_space_before_a_mask_into_the_masked_token():
    from tinyllm.tokenizers import BPETokenizer

    tok = BPETokenizer.train(TEXT, 300, special_tokens=("<|endoftext|>", MASK_TOKEN))
    mask = tok.special_tokens[MASK_TOKEN]
    assert encode_with_masks(tok, "The [MASK] fox") == tok.encode("The") + [mask] + tok.encode(" fox")


def test_filled_text_puts_the_tokens_back_where_the_masks_were():
    from tinyllm.tokenizers import BPETokenizer

    bpe = BPETokenizer.train(TEXT, 300, special_tokens=("<|endoftext|>", MASK_TOKEN))
    assert filled_text(bpe, "The [MASK] fox [MASK].", [" red", " ran"]) == "The red fox ran."
    assert filled_text(char_tokenizer(), "a [MASK]c", ["b"]) == "a bc"  # char: spaces stay


def test_filled_text_keeps_a_space_that_ends_the_token_before_a_mask():
    """Only a space of the text goes into a masked token: one that ends a predicted token (BPE
    has tokens such as "\\n  ") stays, and "[MASK][MASK]" printed "\\n x" for "\\n  " and "x"."""
    from tinyllm.tokenizers import BPETokenizer

    bpe = BPETokenizer.train(TEXT, 300, special_tokens=("<|endoftext|>", MASK_TOKEN))
    assert filled_text(bpe, "[MASK][MASK]", ["\n  ", "x"]) == "\n  x"
    assert filled_text(bpe, "a [MASK] [MASK]!", [" b ", " c"]) == "a b  c!"


@pytest.mark.parametrize("text, written, position", [
    ("a [mask] b", "[mask]", 2), ("a [MASK] b [Mask]", "[Mask]", 11), ("<|mask|> a", "<|mask|>", 0),
])
def test_a_mask_written_another_way_is_refused_not_read_as_text(text, written, position):
    """"[mask]" beside a "[MASK]" was encoded as six characters of text, and filled nothing."""
    with pytest.raises(TinyLLMError, match=f"'{re.escape(written)}' at position {position} is read"
                                           r" as text, not as a mask: write the mask as \[MASK\]"):
        encode_with_masks(char_tokenizer(), text)


def test_fill_gives_top_k_probabilities_per_mask(make_params):
    tok = char_tokenizer()
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = make_params(config)
    out = fill_masks(params, config, tok, "a[MASK]c[MASK]", top_k=3)
    assert len(out) == 2 and all(len(options) == 3 for options in out)
    probs = [p for _, p in out[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    with pytest.raises(TinyLLMError, match="context"):
        fill_masks(params, config, tok, "abcabcab[MASK]")


def test_fill_predicts_at_each_mask_position_from_the_whole_text(make_params):
    """Against an independent reference: the softmax of every position's logits (the encoder's
    final states times the tied embedding), read at the masks, with the mask token left out."""
    tok = char_tokenizer()  # a=1 b=2 c=3 ' '=0, <|mask|>=5
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = make_params(config, dtype="float64", seed=3)
    out = fill_masks(params, config, tok, "[MASK]ab[MASK] c[MASK]", top_k=tok.vocab_size)
    ids = onp.asarray([[5, 1, 2, 5, 0, 3, 5]])
    logits = bidirectional_hidden(params, ids, config)[0] @ lm_head_weight(params)  # (T, V)
    logits[:, 5] = -onp.inf
    probs = onp.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)  # (T, V)
    assert len(out) == 3
    for options, position in zip(out, (0, 3, 6)):
        id_of = {tok.decode([i]): i for i in range(tok.vocab_size)}
        got = {id_of[text]: p for text, p in options}
        want = {i: probs[position, i] for i in range(tok.vocab_size) if i != 5}
        assert got == pytest.approx(want, rel=1e-9)


def test_fill_never_offers_the_mask_token(make_params):
    tok = char_tokenizer()
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    options = fill_masks(make_params(config), config, tok, "a[MASK]c", top_k=tok.vocab_size)[0]
    assert MASK_TOKEN not in [text for text, _ in options]
    assert sum(p for _, p in options) == pytest.approx(1.0)  # the others share all of it


# ============================================================================ pretraining


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, data_file):
    """An MLM run made by the documented command (6 steps); treat as read-only."""
    out = tmp_path_factory.mktemp("runs") / "mlm"
    result = invoke("pretrain", "--objective", "mlm", "--data", data_file, "--out", out, *TINY,
                    "--max-iters", 6, "--eval-interval", 3)
    assert result.exit_code == 0, result.output
    return out, result


def test_mlm_pretraining_writes_an_mlm_checkpoint_with_a_mask_token(mlm_run):
    out, result = mlm_run
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert meta["kind"] == "mlm"
    ckpt = load_checkpoint(str(out), kind="mlm")
    assert MASK_TOKEN in ckpt.tokenizer.special_tokens
    assert ckpt.model_config.vocab_size == ckpt.tokenizer.vocab_size
    assert "masked-token accuracy on the validation split" in result.output


def test_mlm_resume_continues_bit_for_bit(tmp_path, data_file):
    whole = pretrain(MODEL, TRAIN, str(tmp_path / "whole"), data=data_file, tokenizer_kind="char",
                     objective="mlm", log=quiet)
    pretrain(MODEL, TRAIN, str(tmp_path / "parts"), data=data_file, tokenizer_kind="char",
             objective="mlm", max_iters=3, log=quiet)
    resumed = pretrain(MODEL, TRAIN, str(tmp_path / "parts"), resume=True, max_iters=6, log=quiet)
    assert resumed["objective"] == "mlm"
    def curve(run):
        return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_metrics(str(run))]

    assert curve(tmp_path / "parts") == curve(tmp_path / "whole")
    assert [it for it, _, _ in curve(tmp_path / "whole")] == [0, 3, 6]
    onp.testing.assert_array_equal(whole["params"]["wte"], resumed["params"]["wte"])


def test_mlm_needs_windows_of_block_size_tokens_not_one_more(tmp_path):
    # a masked window is its own target: a validation split of exactly block_size tokens is
    # enough, where next-token prediction needs one token more
    text = tmp_path / "160.txt"
    text.write_text(("abcdefgh" * 20)[:160], encoding="utf-8")  # splits of 144 and 16 tokens
    args = ["pretrain", "--data", text, *TINY, "--max-iters", 2, "--eval-interval", 2]
    result = invoke(*args, "--objective", "mlm", "--out", tmp_path / "mlm")
    assert result.exit_code == 0, result.output
    assert "masked-token accuracy on the validation split" in result.output
    result = invoke(*args, "--out", tmp_path / "clm")
    assert_one_line_error(result, "val split", "has 16 tokens, fewer than block_size + 1 = 17")


def test_resume_refuses_another_objective(mlm_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(mlm_run[0], out)
    result = invoke("pretrain", "--out", out, "--resume", "--objective", "clm")
    assert_one_line_error(result, "--objective mlm", "not clm")
    result = invoke("pretrain", "--out", out, "--resume", "--max-iters", 7, "--sample-tokens", 0,
                    "--distance-bias")
    assert result.exit_code == 0, result.output  # without --objective: the run's own, and its bias
    resumed = load_checkpoint(str(out), kind="mlm")
    assert resumed.iter == 7 and resumed.model_config.distance_bias  # the run's own bias kept


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "The"],
    ["fewshot", "--task", "examples/tasks/phone_keypad.jsonl"],
    ["finetune", "instruct", "--out", "{tmp}/instruct", "--max-iters", "1"],
])
def test_commands_that_need_a_causal_model_refuse_an_mlm_checkpoint(mlm_run, tmp_path, command):
    from pathlib import Path

    command = [c.replace("{tmp}", str(tmp_path)) for c in command]
    if command[0] == "fewshot":
        command[2] = str(Path(__file__).resolve().parent.parent / command[2])
    result = invoke(*command, "--checkpoint", mlm_run[0])
    assert_one_line_error(result, "masked language model", "--objective clm")


def test_fill_on_the_command_line(mlm_run):
    result = invoke("fill", "--checkpoint", mlm_run[0], "--top-k", 2, "The qu[MASK]ck fox")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("[MASK] 1: ") and lines[0].count(", ") == 1
    assert lines[1].startswith("The qu") and lines[1].endswith("ck fox") and "[MASK]" not in lines[1]


def test_fill_refuses_a_causal_checkpoint(tmp_path, data_file):
    out = tmp_path / "clm"
    assert invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 1,
                  "--sample-tokens", 0).exit_code == 0
    assert_one_line_error(invoke("fill", "--checkpoint", out, "a [MASK]"), "'gpt' model",
                          "fill needs a masked language model", "--objective mlm")


def test_masked_accuracy_reports_the_most_frequent_token_baseline(mlm_run):
    ckpt = load_checkpoint(str(mlm_run[0]), kind="mlm")
    ids = onp.asarray(ckpt.tokenizer.encode(TEXT), dtype=onp.int32)
    acc = masked_accuracy(ckpt.params, ckpt.model_config, ckpt.tokenizer, ids, n_batches=3)
    assert acc["baseline_token"] == " "  # the commonest character of TEXT
    assert 0.1 < acc["baseline"] < 0.3 and 0 <= acc["accuracy"] <= 1 and acc["positions"] > 0


def test_the_learning_rate_and_warm_up_a_classify_run_trains_with_follow_its_base(
        mlm_run, tmp_path, data_file):
    """From an MLM checkpoint 1e-3 with 50 warm-up steps, from a causal one 5e-4 with 20, unless
    the flags say otherwise: what the run stores is what its training loop was given."""
    clm = tmp_path / "clm"
    assert invoke("pretrain", "--data", data_file, "--out", clm, *TINY, "--max-iters", 1,
                  "--sample-tokens", 0).exit_code == 0

    def trained_with(base, name, *flags):
        result = invoke("finetune", "classify", "--checkpoint", base,
                        "--out", tmp_path / "ft" / name, "--max-iters", 1, *flags)
        assert result.exit_code == 0, result.output
        meta = json.loads((tmp_path / "ft" / name / "config.json").read_text(encoding="utf-8"))
        stored = (meta["finetune"]["lr"], meta["finetune"]["warmup_iters"])
        assert stored == (meta["train"]["lr"], meta["train"]["warmup_iters"])
        return stored

    assert trained_with(mlm_run[0], "mlm") == (1e-3, 50)
    assert trained_with(clm, "clm") == (5e-4, 20)
    assert trained_with(clm, "clm-encoder", "--arch", "encoder") == (5e-4, 20)  # a causal base
    assert trained_with(mlm_run[0], "mlm-lr", "--lr", "2e-4") == (2e-4, 50)
    assert trained_with(mlm_run[0], "mlm-warmup", "--warmup-iters", "0") == (1e-3, 0)


def test_classify_from_an_mlm_checkpoint_runs_the_encoder(mlm_run, tmp_path):
    result = invoke("finetune", "classify", "--checkpoint", mlm_run[0], "--out", tmp_path / "c",
                    "--max-iters", 2, "--eval-interval", 1)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "c" / "metrics.json").read_text(encoding="utf-8"))
    assert (report["arch"], report["pooling"]) == ("encoder", "meanmax")
    result = invoke("finetune", "classify", "--checkpoint", mlm_run[0], "--out", tmp_path / "d",
                    "--max-iters", 1, "--arch", "decoder")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "metrics.json").read_text(encoding="utf-8"))
    assert report["arch"] == "decoder"


def test_mask_rate_is_stored_and_kept_by_resume(tmp_path, data_file, monkeypatch):
    import tinyllm.mlm as mlm

    out = tmp_path / "run"
    result = invoke("pretrain", "--objective", "mlm", "--mask-rate", 0.4, "--data", data_file,
                    "--out", out, *TINY, "--max-iters", 2, "--eval-interval", 1,
                    "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["mask_rate"] == 0.4
    seen, real = [], mlm.mask_tokens
    monkeypatch.setattr(mlm, "mask_tokens", lambda *args: seen.append(args[5]) or real(*args))
    result = invoke("pretrain", "--out", out, "--resume", "--max-iters", 3, "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {0.4}
    result = invoke("pretrain", "--objective", "mlm", "--mask-rate", 1, "--data", data_file,
                    "--out", tmp_path / "all", *TINY)  # passes the flag, refused by the run
    assert_one_line_error(result, "--mask-rate must be between 0 and 1")
    assert not (tmp_path / "all").exists()


# ============================================================================ the distance bias


@pytest.mark.parametrize("stored", ['"x"', "true", "7", "-1", "0"])
def test_a_mask_rate_in_config_json_that_is_no_rate_is_a_one_line_error(mlm_run, tmp_path, stored):
    # config.json is untrusted: a string crashed with a traceback, 7 or -1 trained on, and 0
    # became 15% without a word
    out = tmp_path / "run"
    shutil.copytree(mlm_run[0], out)
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    meta["mask_rate"] = json.loads(stored)
    (out / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    result = invoke("pretrain", "--out", out, "--resume", "--max-iters", 8, "--sample-tokens", 0)
    assert_one_line_error(result, "config.json", "mask_rate", "between 0 and 1")


def test_distance_bias_worked_example():
    bias = distance_bias(2, 3, "float64")  # (H, T, T): slopes 1 and 1/2
    onp.testing.assert_array_equal(bias[0], [[0, -1, -2], [-1, 0, -1], [-2, -1, 0]])
    onp.testing.assert_array_equal(bias[1], [[0, -0.5, -1], [-0.5, 0, -0.5], [-1, -0.5, 0]])


def test_distance_bias_goes_no_lower_than_its_floor():
    bias = distance_bias(2, 100, "float64")  # head 0 (slope 1) meets the floor 40 keys away
    onp.testing.assert_array_equal(bias[0, 0, :41], -onp.arange(41.0))
    onp.testing.assert_array_equal(bias[0, 0, 41:], DISTANCE_BIAS_FLOOR)
    onp.testing.assert_array_equal(bias[1, 0, :81], -0.5 * onp.arange(81.0))
    assert bias.min() == DISTANCE_BIAS_FLOOR == -40.0


def test_a_biased_encoders_attention_weights_hold_no_subnormal_floats():
    """Subnormal floats (below 1.2e-38 in float32) are computed dozens of times slower than
    normal ones on Intel processors, and exp() of a score biased 255 below its row's top makes
    them: the floor keeps every weight either normal or exactly 0. The scores here are those of
    a trained encoder's size (q k^T / sqrt(D) of a few units)."""
    b, t, n_head, d = 2, 256, 4, 8
    rng = onp.random.default_rng(0)
    qkv = rng.standard_normal((b * t, 3 * n_head * d)).astype("float32")
    mask = distance_bias(n_head, t, "float32")
    _, (_, _, _, weights, _) = fast.attention_forward(qkv, b, t, n_head, mask,
                                                      fast.query_blocks(t, causal=False))
    smallest_normal = onp.finfo("float32").tiny
    assert not ((weights > 0) & (weights < smallest_normal)).any()
    assert weights.min() > 0  # at the floor a key keeps a little weight, never exactly 0


def test_with_no_query_or_key_weights_an_encoder_attends_by_the_distance_bias_alone(make_params):
    """Attention maps of a biased encoder whose scores q k^T are all 0: each head's weights are
    the softmax of its bias row, so head 0 gives a token's neighbours e^-1 of its own weight."""
    config = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8,
                       distance_bias=True)
    params = make_params(config, dtype="float64")
    for block in params["h"]:
        block["attn"]["c_attn"]["w"][:, :2 * config.n_embd] = 0.0  # q = k = 0
    maps = gpt_attention(params, config, [1, 2, 3, 4, 5, 6], causal=False)  # (L, H, T, T)
    bias = distance_bias(2, 6, "float64")
    want = onp.exp(bias) / onp.exp(bias).sum(axis=-1, keepdims=True)
    for layer in maps:
        onp.testing.assert_allclose(layer, want, rtol=1e-12)
    unbiased = gpt_attention(params, replace(config, distance_bias=False), [1, 2, 3, 4, 5, 6],
                             causal=False)
    onp.testing.assert_allclose(unbiased, 1 / 6)  # uniform: the plateau the bias avoids


@pytest.fixture
def encoder_masks(monkeypatch):
    """Every attention mask an encoder block is given, as a list of arrays (or None)."""
    import tinyllm.models as models

    seen, real = [], models.encoder_block
    monkeypatch.setattr(models, "encoder_block",
                        lambda x, *a, mask=None, **k: seen.append(
                            None if mask is None else onp.asarray(mask)) or real(
                            x, *a, mask=mask, **k))
    return seen


def real_scores(mask):
    """The mask's values between real tokens (the padding keys dropped), per head: (H, T, T')."""
    mask = onp.broadcast_to(mask, mask.shape[:-3] + (2,) + mask.shape[-2:])
    return mask.reshape(-1, *mask.shape[-3:])[0]


def test_mlm_runs_record_the_distance_bias_and_pass_it_to_every_encoder_command(
        mlm_run, tmp_path, data_file, encoder_masks, monkeypatch):
    """pretrain --objective mlm stores it; fill, embed and classify from the run apply it in
    every block; --no-distance-bias and --arch encoder on causal weights do not."""
    fast_configs = []  # the model settings pretraining's steps and evaluations hand the fast path
    real = fast.gpt_loss_and_grads

    def recording(params, ids, targets, config, *args, **kwargs):
        fast_configs.append(config.distance_bias)
        return real(params, ids, targets, config, *args, **kwargs)

    monkeypatch.setattr(fast, "gpt_loss_and_grads", recording)
    out = mlm_run[0]
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["model"][
        "distance_bias"] is True
    assert invoke("fill", "--checkpoint", out, "The qu[MASK]ck fox").exit_code == 0
    # 12 characters and a mask, one block
    assert len(encoder_masks) == 1 and encoder_masks[0].shape == (2, 13, 13)
    onp.testing.assert_array_equal(encoder_masks[0], distance_bias(2, 13))
    encoder_masks.clear()
    lines = tmp_path / "lines.txt"
    lines.write_text("The quick fox\nHow\n", encoding="utf-8")
    result = invoke("embed", "--checkpoint", out, "--data", lines, "--out", tmp_path / "v.npy")
    assert result.exit_code == 0, result.output
    assert encoder_masks and all(m.shape == (2, 2, 13, 13) for m in encoder_masks)
    onp.testing.assert_array_equal(encoder_masks[0][1, :, :3, :3], distance_bias(2, 3))  # "How"
    assert (encoder_masks[0][1, :, :, 3:] < -1e8).all()  # and its padding hidden
    encoder_masks.clear()
    result = invoke("finetune", "classify", "--checkpoint", out, "--out", tmp_path / "c",
                    "--max-iters", 1, "--eval-interval", 1)
    assert result.exit_code == 0, result.output
    t = encoder_masks[0].shape[-1]
    assert encoder_masks and all(m.shape[1:] == (2, t, t) for m in encoder_masks)
    onp.testing.assert_array_equal(encoder_masks[0][:, :, :1, :1].reshape(-1), 0.0)
    onp.testing.assert_array_equal(encoder_masks[0][0, 0, 0, 1], -1.0)  # head 0, one apart
    encoder_masks.clear()
    off = tmp_path / "off"
    result = invoke("pretrain", "--objective", "mlm", "--no-distance-bias", "--data", data_file,
                    "--out", off, *TINY, "--max-iters", 1, "--sample-tokens", 0)
    assert result.exit_code == 0, result.output
    assert json.loads((off / "config.json").read_text(encoding="utf-8"))["model"][
        "distance_bias"] is False
    assert fast_configs and not any(fast_configs)  # its steps and evaluations
    assert encoder_masks == []  # (which take the fast path, not the reference model)
    assert invoke("fill", "--checkpoint", off, "The qu[MASK]ck fox").exit_code == 0
    assert encoder_masks == [None]


def test_a_causal_run_has_no_distance_bias_and_refuses_the_flag(tmp_path, data_file,
                                                                encoder_masks):
    out = tmp_path / "clm"
    assert invoke("pretrain", "--data", data_file, "--out", out, *TINY, "--max-iters", 1,
                  "--sample-tokens", 0).exit_code == 0
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["model"][
        "distance_bias"] is False
    result = invoke("finetune", "classify", "--checkpoint", out, "--out", tmp_path / "c",
                    "--max-iters", 1, "--eval-interval", 1, "--arch", "encoder")
    assert result.exit_code == 0, result.output
    assert encoder_masks and all(m.shape[1:3] == (1, 1) for m in encoder_masks)  # padding only
    result = invoke("pretrain", "--distance-bias", "--data", data_file, "--out", tmp_path / "x",
                    *TINY)
    assert_one_line_error(result, "--distance-bias", "--objective mlm")


def test_a_checkpoint_from_before_the_distance_bias_loads_without_it(mlm_run, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(mlm_run[0], out)
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    del meta["model"]["distance_bias"]
    (out / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    assert load_checkpoint(str(out), kind="mlm").model_config.distance_bias is False
