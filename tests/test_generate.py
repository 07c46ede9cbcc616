"""Tests for tinyllm/generate.py: the filters, greedy decoding, seeds, long prompts, stop text."""

import json
import shutil

import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyllm.cli import main
from tinyllm.config import GPTConfig
from tinyllm.errors import TinyLLMError
from tinyllm import generate
from tinyllm.generate import (
    TextStream,
    generate_ids,
    generate_text,
    greedy_batch,
    next_token_distribution,
    sample_token,
    top_k_filter,
    top_p_filter,
)
from tinyllm.models import gpt_forward, init_gpt
from tinyllm.tokenizers import BPETokenizer, CharTokenizer
from tinyllm.tree import tree_map

EOT = "<|endoftext|>"
ALPHABET = "abcdefghij "


@pytest.fixture(scope="module")
def model():
    """(params, config, tokenizer): a random tiny GPT over 11 characters, no special tokens.

    Weight matrices 40 times larger than GPT-2's init make the next-token distributions uneven
    and context-dependent, so greedy continuations vary with the prompt instead of repeating the
    one token that near-uniform logits happen to favour.
    """
    tokenizer = CharTokenizer.train(ALPHABET)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                       n_embd=16)
    params = init_gpt(config, onp.random.default_rng(0))
    params = tree_map(lambda p: p * 40 if p.ndim >= 2 else p, params)
    return params, config, tokenizer


# ----------------------------------------------------------------------------- filters


def test_top_k_worked_example():
    out = top_k_filter(onp.array([1.0, 3.0, 2.0]), 2)
    onp.testing.assert_array_equal(out, [-onp.inf, 3.0, 2.0])


def test_top_k_none_or_large_k_changes_nothing():
    logits = onp.array([1.0, 3.0, 2.0])
    assert top_k_filter(logits, None) is logits
    assert top_k_filter(logits, 3) is logits


@given(arrays("float64", st.integers(1, 12), elements=st.floats(-50, 50)), st.integers(1, 12))
def test_top_k_keeps_the_k_largest(logits, k):
    out = top_k_filter(logits, k)
    kept = onp.isfinite(out)
    assert kept.sum() >= min(k, len(logits))  # ties at the k-th value are all kept
    onp.testing.assert_array_equal(out[kept], logits[kept])
    if (~kept).any():
        assert logits[kept].min() > logits[~kept].max()


def test_top_p_worked_example():
    out = top_p_filter(onp.array([0.5, 0.3, 0.2]), 0.7)
    onp.testing.assert_allclose(out, [0.625, 0.375, 0.0])


def test_top_p_boundary_cases():
    probs = onp.array([0.2, 0.5, 0.3])
    onp.testing.assert_allclose(top_p_filter(probs, 0.5), [0.0, 1.0, 0.0])  # 0.5 alone reaches p
    onp.testing.assert_allclose(top_p_filter(probs, 0.01), [0.0, 1.0, 0.0])
    assert top_p_filter(probs, 1.0) is probs and top_p_filter(probs, None) is probs


@settings(max_examples=200)
@given(arrays("float64", st.integers(1, 10), elements=st.floats(0, 1)),
       st.floats(0.001, 0.999))
def test_top_p_properties(weights, p):
    assume(weights.sum() > 1e-6)
    probs = weights / weights.sum()
    out = top_p_filter(probs, p)
    assert out.sum() == pytest.approx(1.0)
    assert out[probs == probs.max()].max() > 0  # a most likely token (ties: one of them) is kept
    kept = out > 0
    if (~kept).any() and kept.any():
        # never keeps a token less likely than one it dropped
        assert probs[kept].min() >= probs[~kept].max()
    # the kept mass reaches p, and without its least likely member it would not
    assert probs[kept].sum() >= p - 1e-9
    assert probs[kept].sum() - probs[kept].min() < p + 1e-9
    onp.testing.assert_allclose(out[kept], probs[kept] / probs[kept].sum())


def test_next_token_distribution_applies_temperature_then_filters():
    logits = onp.log(onp.array([0.1, 0.2, 0.7]))
    onp.testing.assert_allclose(next_token_distribution(logits), [0.1, 0.2, 0.7])
    sharp = next_token_distribution(logits, temperature=0.5)  # p^2, renormalised
    onp.testing.assert_allclose(sharp, onp.array([0.01, 0.04, 0.49]) / 0.54)
    onp.testing.assert_allclose(next_token_distribution(logits, top_k=2), [0, 2 / 9, 7 / 9])
    onp.testing.assert_allclose(next_token_distribution(logits, top_p=0.6), [0, 0, 1])


@pytest.mark.parametrize("temperature", [1e-300, 1e-320, 5e-324])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    """5 / 1e-320 overflows to inf, and inf - inf in softmax was NaN: a traceback from numpy."""
    logits = onp.array([1.0, 5.0, -3.0, 5.0 - 1e-9])
    onp.testing.assert_array_equal(next_token_distribution(logits, temperature), [0, 1, 0, 0])
    assert sample_token(logits, onp.random.default_rng(0), temperature) == 1


def test_sample_token_follows_the_distribution():
    logits = onp.log(onp.array([0.25, 0.75, 1e-12]))
    rng = onp.random.default_rng(0)
    draws = onp.array([sample_token(logits, rng) for _ in range(4000)])
    assert abs((draws == 1).mean() - 0.75) < 0.03 and not (draws == 2).any()
    assert {sample_token(logits, rng, top_k=1) for _ in range(50)} == {1}


# ----------------------------------------------------------------------------- generation


def greedy_reference(params, config, ids, n):
    """Greedy decoding written out: argmax of the last position's logits, n times."""
    ids = list(ids)
    for _ in range(n):
        logits = gpt_forward(params, onp.array([ids[-config.block_size:]], dtype=onp.int32), config)
        ids.append(int(onp.argmax(logits[0, -1])))
    return ids


def test_temperature_zero_is_greedy_and_ignores_the_seed(model):
    params, config, _ = model
    prompt = [1, 2, 3]
    want = greedy_reference(params, config, prompt, 12)[3:]
    assert len(set(want)) > 1  # a varied continuation, not one repeated token
    for seed in (0, 1, 2):
        assert generate_ids(params, config, prompt, 12, onp.random.default_rng(seed),
                            temperature=0) == want


def test_same_seed_same_text_and_another_seed_differs(model):
    params, config, tokenizer = model
    texts = [generate_text(params, config, tokenizer, "abc", 40, temperature=1.0, seed=s)
             for s in (5, 5, 6)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert set(texts[0]) <= set(ALPHABET)


def test_prompt_longer_than_block_size_keeps_its_last_block(model):
    params, config, tokenizer = model
    prompt = "abcdefghij abcdefghij"  # 21 characters, block_size is 8
    assert len(prompt) > config.block_size
    long = generate_text(params, config, tokenizer, prompt, 10, temperature=0)
    tail = generate_text(params, config, tokenizer, prompt[-config.block_size:], 10, temperature=0)
    assert long == tail and len(long) == 10
    # ...and the comparison can fail: another context gives another continuation.
    assert generate_text(params, config, tokenizer, "abc", 10, temperature=0) != long


@pytest.mark.parametrize("n", [0, 1, 7, 25])
def test_max_new_tokens_is_respected(model, n):
    params, config, tokenizer = model
    assert len(generate_ids(params, config, [0], n, onp.random.default_rng(0))) == n
    assert len(generate_text(params, config, tokenizer, "a", n, seed=0)) == n


def test_stop_text_cuts_the_output_before_it(model):
    params, config, tokenizer = model
    full = generate_text(params, config, tokenizer, "abc", 60, temperature=1.0, seed=3)
    stop = full[10:12]
    cut = full.index(stop)
    got = generate_text(params, config, tokenizer, "abc", 60, temperature=1.0, seed=3,
                        stop_text=stop)
    assert got == full[:cut]
    assert stop not in got


class CountingDecodes:
    """A tokenizer that records how many ids each decode call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []
        self.special_tokens, self.encode = tokenizer.special_tokens, tokenizer.encode

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids)


def test_a_stop_text_that_never_comes_costs_the_same_at_every_step(model):
    """Each step decoded all the new text to look for the stop text: 1 + 2 + ... + n tokens,
    hours at --max-new-tokens 100000. Now a step decodes its own token (a character that BPE
    split over tokens, a few)."""
    params, config, tokenizer = model
    counting = CountingDecodes(tokenizer)
    text = generate_text(params, config, counting, "abc", 300, seed=0, stop_text="zz")
    assert len(text) == 300 and max(counting.sizes) == 1


BPE = BPETokenizer.train("caf\u00e9 \u2603 snow\n\n" * 20, 262)
STOP_TEXTS = st.sampled_from(["", "\n", "\n\n", "\u00e9", " \u2603", "ow\n", "\ufffd"])


@settings(max_examples=200)
@given(ids=st.lists(st.integers(0, BPE.vocab_size - 1), max_size=30), stop=STOP_TEXTS)
def test_the_streamed_pieces_are_the_text_cut_before_the_stop_text(ids, stop):
    """Whatever the tokens (bytes that split a character among them too), the pieces passed on
    add up to the completion, which is the decoded text cut before the first stop text; a piece
    never ends in the U+FFFD of a character still unfinished."""
    pieces = []
    stream = TextStream(BPE, stop, pieces.append)
    for n, token in enumerate(ids, 1):
        if stream.add(token):
            break
    full = BPE.decode(ids[:n] if ids else [])
    want = full[:full.index(stop)] if stop and stop in full else full
    if not (stop and stop in full):  # it ran to the end: the last step may have ended anywhere
        assert stream.finish() == "".join(pieces) == want
    else:
        assert stream.finish() == "".join(pieces) == want and stream.stopped
    assert all(piece for piece in pieces)


def test_a_character_split_over_tokens_is_passed_on_whole():
    snowman = list("\u2603".encode("utf-8"))  # three byte tokens
    pieces = []
    stream = TextStream(BPE, None, pieces.append)
    seen = []
    for token in snowman + [ord("a")]:
        assert not stream.add(token)
        seen.append(list(pieces))
    assert seen == [[], [], ["\u2603"], ["\u2603", "a"]] and stream.finish() == "\u2603a"


def test_generation_ends_at_end_of_text_without_printing_it():
    tokenizer = CharTokenizer.train("ab", special_tokens=[EOT])  # ids: a=0, b=1, EOT=2
    config = GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=4,
                       tie_weights=False)
    params = init_gpt(config, onp.random.default_rng(0))
    # Final layer norm outputs all ones, so logits are the column sums of the LM head.
    params["ln_f"] = {"g": onp.zeros(4, "float32"), "b": onp.ones(4, "float32")}
    params["lm_head"]["w"] = onp.array([[0, 1, 2]] * 4, dtype="float32")
    assert generate_text(params, config, tokenizer, "ab", 10, temperature=0) == ""
    params["lm_head"]["w"] = onp.array([[0, 2, 1]] * 4, dtype="float32")
    assert generate_text(params, config, tokenizer, "ab", 5, temperature=0) == "bbbbb"


def test_empty_prompt_starts_from_a_newline():
    tokenizer = CharTokenizer.train("ab\n")
    config = GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=4)
    params = init_gpt(config, onp.random.default_rng(0))
    assert len(generate_text(params, config, tokenizer, "", 3, seed=0)) == 3
    no_newline = CharTokenizer.train("ab")
    config2 = GPTConfig(vocab_size=2, block_size=4, n_layer=1, n_head=1, n_embd=4)
    with pytest.raises(TinyLLMError, match="empty"):
        generate_text(init_gpt(config2, onp.random.default_rng(0)), config2, no_newline, "", 3)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),  # NaN < 0 is False: it passed the check
    (dict(top_k=0), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(max_new_tokens=-1), "--max-new-tokens"),
])
def test_bad_sampling_arguments(model, kwargs, flag):
    params, config, tokenizer = model
    with pytest.raises(TinyLLMError, match=flag):
        generate_text(params, config, tokenizer, "a", **{"max_new_tokens": 3, **kwargs})


def test_generate_ids_needs_context(model):
    params, config, _ = model
    with pytest.raises(TinyLLMError, match="at least one token"):
        generate_ids(params, config, [], 3, onp.random.default_rng(0))


def test_prompt_with_unknown_character_is_a_user_error(model):
    params, config, tokenizer = model
    with pytest.raises(TinyLLMError, match="'Z'"):
        generate_text(params, config, tokenizer, "abZ", 3)


def test_batched_greedy_decoding_equals_one_at_a_time(tiny_config, params32):
    prompts, limits, eot = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 1]], [4, 6, 5], 10
    batched = greedy_batch(params32, tiny_config, prompts, limits, eot)
    for prompt, limit, got in zip(prompts, limits, batched):
        want = generate_ids(params32, tiny_config, prompt, min(limit, 8 - len(prompt)),
                            onp.random.default_rng(0), temperature=0, stop=lambda ids: ids[-1] == eot)
        assert got == [i for i in want if i != eot]


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, save_char_base):
    """A saved char-level base (random weights) with a newline and <|endoftext|>, context 8."""
    config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)
    return save_char_base(tmp_path_factory.mktemp("gen"), ALPHABET + "\n", config)


def invoke(*args):
    return CliRunner().invoke(main, ["generate", *[str(a) for a in args]])


def test_an_empty_stop_text_is_refused_not_ignored(run_dir):
    result = invoke("--checkpoint", run_dir, "--stop", "", "--max-new-tokens", 3)
    assert result.exit_code == 1 and "Error: --stop is empty" in result.output, result.output


def test_a_prompt_longer_than_the_context_is_noted(run_dir):
    """The model reads only the last 8 of its 21 tokens: said on stderr, not silently."""
    result = invoke("--checkpoint", run_dir, "--prompt", "abcdefghij abcdefghij", "--seed", 1,
                    "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert "note: --prompt is 21 tokens, more than the model's context of 8" in result.stderr
    fits = invoke("--checkpoint", run_dir, "--prompt", "abcdefgh", "--max-new-tokens", 3)
    assert fits.exit_code == 0 and "note" not in fits.stderr, fits.output


def test_ctrl_c_keeps_the_text_printed_so_far(run_dir, monkeypatch):
    """The completion is printed as it is made: Ctrl-C after 20 tokens leaves them on stdout
    (the whole text was printed at the end, so an interrupt lost all of it), exit code 130."""
    drawn = []

    def interrupted_after_20(logits, rng, *args):
        if len(drawn) == 20:
            raise KeyboardInterrupt
        drawn.append(int(onp.argmax(logits)))
        return drawn[-1]

    monkeypatch.setattr(generate, "sample_token", interrupted_after_20)
    result = invoke("--checkpoint", run_dir, "--prompt", "abc", "--max-new-tokens", 100)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    tokenizer = CharTokenizer.train(ALPHABET + "\n", special_tokens=[EOT])
    assert result.stdout == "abc" + tokenizer.decode(drawn)


def test_a_run_whose_special_token_name_would_command_the_terminal_is_refused(run_dir, tmp_path):
    # before, `generate` printed the name "\x1b]0;PWNED\x07\x1b[2J" raw each time it was sampled
    crafted = tmp_path / "crafted"
    shutil.copytree(run_dir, crafted)
    path = crafted / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["special_tokens"] = {"\x1b]0;PWNED\x07\x1b[2J": data["special_tokens"][EOT]}
    path.write_text(json.dumps(data), encoding="utf-8")
    result = invoke("--checkpoint", crafted, "--prompt", "abc", "--max-new-tokens", 50,
                    "--temperature", 2, "--seed", 1)
    assert result.exit_code == 1 and "\x1b" not in result.output, repr(result.output)
    assert result.output.count("\n") == 1 and "tokenizer.json" in result.output, result.output
    assert "special token '\\x1b]0;PWNED\\x07\\x1b[2J'" in result.output


def test_a_control_character_the_model_writes_is_printed_as_its_escape(run_dir, monkeypatch):
    # A model learns the characters of its data: one trained on a file holding "\x1b[2J" can
    # sample it, and printed raw it would clear the screen. Lines and tabs stay as they are.
    written = "ok\x1b[2J\tdone\n"

    def writes(*args, on_text=None, **kwargs):
        on_text(written)
        return written

    monkeypatch.setattr(generate, "generate_text", writes)
    result = invoke("--checkpoint", run_dir, "--prompt", "abc", "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert result.stdout == "abcok\\x1b[2J\tdone\n\n"
