"""Tests of the key/value cache (tinyllm/kv_cache.py): the cached loops give the tokens of the
plain ones, and logits equal to float32 rounding at every step, for every model kind.

Token identity is checked on float64 weights: there the two paths differ by about 1e-15, so two
candidate tokens never tie within the difference. (In float32 they differ by the rounding of
matmuls of another shape, about 1e-6, which could swap two tokens whose logits are that close;
the float32 tests compare the logits themselves, step by step.)
"""

import json
from types import SimpleNamespace

import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import (cli_finetune, cli_seq2seq, decoding, fewshot, generate, instruct_run,
                     kv_cache, pretrain, seq2seq_run)
from tinyllm.checkpoint import save_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.generate import generate_ids, generate_text, greedy_batch, last_logits
from tinyllm.lora import init_lora, merge_lora
from tinyllm.models import gpt_hidden, init_gpt
from tinyllm.optim import adamw_init
from tinyllm.seq2seq import Seq2SeqConfig, encoder_forward, init_seq2seq
from tinyllm.tokenizers import CharTokenizer
from tinyllm.pretrain import SPECIAL_TOKENS
from tinyllm.tree import tree_map

seeds = st.integers(0, 2**16)
FLOAT32 = dict(rtol=1e-4, atol=1e-5)  # logits are O(1): float32 keeps about 7 digits


def varied(params, seed, scale=0.5):
    """Weights moved well off their small initial values, so that outputs vary with the input
    (fresh GPT-2 weights give near-uniform logits)."""
    rng = onp.random.default_rng(seed)
    return tree_map(lambda p: p + (scale * rng.standard_normal(p.shape)).astype(p.dtype), params)


@st.composite
def gpt_models(draw, dtype="float64"):
    """A small GPT of any kind (bias or not, tied head or not, plain or with merged LoRA)."""
    config = GPTConfig(vocab_size=draw(st.integers(5, 13)), block_size=draw(st.integers(2, 9)),
                       n_layer=draw(st.integers(1, 2)), n_head=draw(st.sampled_from([1, 2, 4])),
                       n_embd=8, bias=draw(st.booleans()), tie_weights=draw(st.booleans()))
    seed = draw(seeds)
    params = varied(init_gpt(config, onp.random.default_rng(seed), dtype=dtype), seed)
    if draw(st.booleans()):  # an instruction-tuned model generates with its adapters merged
        params["lora"] = varied(init_lora(params, 2, onp.random.default_rng(seed + 1)), seed + 2)
        params = merge_lora(params, 4.0, 2)
    return params, config


# ----------------------------------------------------------------------------- GPT: generate


@settings(max_examples=40, deadline=None)
@given(model=gpt_models(), data=st.data(), temperature=st.sampled_from([0.0, 0.7, 1.5]),
       top_k=st.sampled_from([None, 1, 3]), top_p=st.sampled_from([None, 0.8]), seed=seeds)
def test_cached_generation_gives_the_plain_tokens(model, data, temperature, top_k, top_p, seed):
    """Greedy and seeded sampling; the prompt plus the new tokens often run past block_size,
    where the window slides."""
    params, config = model
    prompt = data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=1,
                                max_size=2 * config.block_size))
    n = data.draw(st.integers(0, 2 * config.block_size))
    args = (params, config, prompt, n)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    plain = generate_ids(*args, onp.random.default_rng(seed), **kwargs, use_cache=False)
    cached = generate_ids(*args, onp.random.default_rng(seed), **kwargs, use_cache=True)
    assert cached == plain and len(plain) == n


def windows_of(ids, block_size):
    """The windows generation feeds the model: after each token, the last block_size ids."""
    return [ids[max(0, end - block_size):end] for end in range(1, len(ids) + 1)]


@settings(max_examples=30, deadline=None)
@given(model=gpt_models(dtype="float32"), data=st.data())
def test_cached_logits_equal_the_plain_ones_at_every_step_in_float32(model, data):
    params, config = model
    ids = data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=1,
                             max_size=3 * config.block_size))
    start = data.draw(st.integers(1, len(ids)))  # the prompt; the rest arrive one at a time
    cache = kv_cache.GPTCache(params, config)
    for window in [ids[max(0, start - config.block_size):start]] + \
            windows_of(ids, config.block_size)[start:]:
        got = cache.next_logits(window)
        assert got.dtype == onp.float32
        onp.testing.assert_allclose(got, last_logits(params, config, window), **FLOAT32)


def test_the_cache_is_read_whole_only_when_the_window_slides(tiny_config, params32):
    """block_size 8: a 3-token prompt grows to 8 tokens on the cache (one read of the prompt),
    and each step after that slides the window, so the cache is rebuilt, every step."""
    cache = kv_cache.GPTCache(params32, tiny_config)
    calls = []
    real = cache.next_logits

    def spy(window):
        calls.append(len(window))
        return real(window)

    cache.next_logits = spy
    ids = [1, 2, 3]
    for _ in range(10):
        ids.append(int(onp.argmax(cache.next_logits(ids[-8:]))))
    assert calls == [3, 4, 5, 6, 7, 8, 8, 8, 8, 8]
    assert cache.rebuilds == 1 + 4  # the prompt, then the four windows that had slid


def test_a_window_that_does_not_extend_the_last_one_is_read_whole(tiny_config, params32):
    cache = kv_cache.GPTCache(params32, tiny_config)
    cache.next_logits([1, 2, 3])
    # each longer than the last, but only the last one extends the one before it
    for window in ([4, 5, 6, 7], [1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6], [1, 2, 9, 4, 5, 6, 7]):
        onp.testing.assert_allclose(cache.next_logits(window),
                                    last_logits(params32, tiny_config, window), **FLOAT32)
    assert cache.rebuilds == 4  # the first window and the three that were not extensions


def test_prefill_is_the_plain_forward_pass_exactly(tiny_config, params32):
    """Reading a prompt into an empty cache is `gpt_hidden` itself: same ops, same shapes."""
    ids = onp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=onp.int32)
    cache = kv_cache.new_cache(2, 2, 8, 16, "float32")
    positions = onp.broadcast_to(onp.arange(5), ids.shape)
    got = kv_cache.gpt_extend(params32, tiny_config, cache, ids, positions)
    onp.testing.assert_array_equal(got, gpt_hidden(params32, ids, tiny_config))
    assert not cache["k"][0][:, 5:].any()  # nothing written past the prompt


@settings(max_examples=25, deadline=None)
@given(model=gpt_models(dtype="float32"), data=st.data())
def test_rows_at_different_positions_share_one_batch(model, data):
    """One step for a batch whose rows sit at different positions (as in batched greedy
    decoding): each row's logits are those of its own sequence run alone."""
    params, config = model
    sequences = data.draw(st.lists(st.lists(st.integers(0, config.vocab_size - 1), min_size=2,
                                            max_size=config.block_size), min_size=1, max_size=4))
    width = max(len(s) for s in sequences) - 1
    prompts = onp.zeros((len(sequences), width), dtype=onp.int32)  # all but each last token
    for row, s in enumerate(sequences):
        prompts[row, :len(s) - 1] = s[:-1]
    cache = kv_cache.new_cache(config.n_layer, len(sequences), config.block_size, config.n_embd,
                               "float32")
    kv_cache.gpt_extend(params, config, cache, prompts,
                        onp.broadcast_to(onp.arange(width), prompts.shape))
    last = onp.array([[s[-1]] for s in sequences], dtype=onp.int32)  # (B, 1)
    positions = onp.array([[len(s) - 1] for s in sequences])  # (B, 1) each row's own
    logits = kv_cache.gpt_logits(params, kv_cache.gpt_extend(params, config, cache, last,
                                                             positions))[:, 0]  # (B, V)
    for row, s in enumerate(sequences):
        onp.testing.assert_allclose(logits[row], last_logits(params, config, s), **FLOAT32)


@settings(max_examples=40, deadline=None)
@given(model=gpt_models(), data=st.data())
def test_cached_greedy_batch_gives_the_plain_tokens(model, data):
    """Prompts of different lengths, limits and a stop token, as few-shot and instruction
    evaluation use it; rows that finish early leave the batch."""
    params, config = model
    v, t = config.vocab_size, config.block_size
    prompts = data.draw(st.lists(st.lists(st.integers(0, v - 1), min_size=1, max_size=t),
                                 min_size=1, max_size=5))
    limits = data.draw(st.lists(st.integers(0, t + 2), min_size=len(prompts),
                                max_size=len(prompts)))
    stop_id = data.draw(st.integers(0, v - 1))
    batch_size = data.draw(st.integers(1, 5))
    plain = greedy_batch(params, config, prompts, limits, stop_id, batch_size, use_cache=False)
    assert greedy_batch(params, config, prompts, limits, stop_id, batch_size, use_cache=True) == plain


def test_cached_greedy_batch_drops_finished_rows(tiny_config, params32, monkeypatch):
    """A row that is done leaves the cache: later steps run only the rows still going."""
    widths = []
    real = kv_cache.gpt_extend

    def spy(params, config, cache, ids, positions):
        widths.append(ids.shape[0])
        return real(params, config, cache, ids, positions)

    monkeypatch.setattr(kv_cache, "gpt_extend", spy)
    greedy_batch(params32, tiny_config, [[1], [2], [3]], [1, 3, 5], stop_id=-1)
    assert widths == [3, 2, 2, 1, 1]  # prompts, then 2 rows, 2 rows, 1 row, 1 row


# ----------------------------------------------------------------------------- encoder-decoder


@st.composite
def seq2seq_models(draw, dtype="float64"):
    """A small encoder-decoder of any kind (positions, shared embeddings, tied head, bias)."""
    config = Seq2SeqConfig(vocab_size=draw(st.integers(5, 11)), block_size=draw(st.integers(3, 8)),
                           n_layer=draw(st.integers(1, 2)), n_head=draw(st.sampled_from([1, 2])),
                           n_embd=8, bias=draw(st.booleans()),
                           positions=draw(st.sampled_from(["sinusoidal", "learned", "none"])),
                           share_embeddings=draw(st.booleans()), tie_weights=draw(st.booleans()))
    seed = draw(seeds)
    params = varied(init_seq2seq(config, onp.random.default_rng(seed), dtype=dtype), seed)
    return params, config


BOS, EOS = 1, 2


def sources(data, config, n):
    """n source rows of ids and their 0/1 validity (padding at the end of shorter rows)."""
    lengths = data.draw(st.lists(st.integers(1, config.block_size), min_size=n, max_size=n))
    src = onp.zeros((n, max(lengths)), dtype=onp.int32)
    for row, length in enumerate(lengths):
        src[row, :length] = data.draw(st.lists(st.integers(3, config.vocab_size - 1),
                                               min_size=length, max_size=length))
    valid = (onp.arange(src.shape[1])[None, :] < onp.array(lengths)[:, None]).astype("float32")
    return src, valid


@settings(max_examples=30, deadline=None)
@given(model=seq2seq_models(), data=st.data())
def test_cached_greedy_decoding_gives_the_plain_tokens(model, data):
    params, config = model
    src, valid = sources(data, config, data.draw(st.integers(1, 4)))
    max_len = data.draw(st.integers(1, config.block_size))
    plain = decoding.greedy_decode(params, config, src, valid, BOS, EOS, max_len, use_cache=False)
    assert decoding.greedy_decode(params, config, src, valid, BOS, EOS, max_len) == plain


@settings(max_examples=30, deadline=None)
@given(model=seq2seq_models(), data=st.data(), beam_size=st.integers(1, 4),
       alpha=st.sampled_from([0.0, 0.6, 2.0]))
def test_cached_beam_search_gives_the_plain_tokens(model, data, beam_size, alpha):
    """Beam search reorders its hypotheses every step: the cache follows them by parent."""
    params, config = model
    src = list(sources(data, config, 1)[0][0])
    max_len = data.draw(st.integers(1, config.block_size))
    args = (params, config, src, BOS, EOS, max_len, beam_size, alpha)
    assert decoding.beam_search(*args, use_cache=True) == decoding.beam_search(*args, use_cache=False)


@settings(max_examples=30, deadline=None)
@given(model=seq2seq_models(dtype="float32"), data=st.data())
def test_cached_decoder_log_probs_equal_the_plain_ones_at_every_step_in_float32(model, data):
    """Random prefixes, one row per source or many rows on one source (as beam search), rows
    reordered by random parents between steps."""
    params, config = model
    src, valid = sources(data, config, data.draw(st.integers(1, 3)))
    shared = data.draw(st.booleans()) and len(src) == 1  # beam search: memory (1, S, C) for all rows
    memory = encoder_forward(params, src, config, valid)  # (B, S, C)
    rows = data.draw(st.integers(1, 4)) if shared else len(src)
    cache = kv_cache.DecoderCache(params, config, memory, None if shared else valid)
    prefixes = onp.full((rows, 1), BOS, dtype=onp.int32)
    parents = None
    for _ in range(data.draw(st.integers(1, config.block_size))):
        got = cache.next_log_probs(prefixes, parents)  # (R, V)
        mem = onp.repeat(memory, rows, axis=0) if shared else memory
        want = decoding._next_log_probs(params, config, mem, None if shared else valid, prefixes)
        onp.testing.assert_allclose(got, want, **FLOAT32)
        if shared:  # a new generation of hypotheses, each extending some earlier row
            parents = data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=4))
            prefixes, rows = prefixes[parents], len(parents)
        token = data.draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=rows,
                                   max_size=rows))
        prefixes = onp.concatenate([prefixes, onp.array(token, dtype=onp.int32)[:, None]], axis=1)


def test_decoder_cache_refuses_a_prefix_that_does_not_extend_the_last():
    config = Seq2SeqConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, n_embd=8)
    params = init_seq2seq(config, onp.random.default_rng(0))
    memory = encoder_forward(params, onp.array([[3, 4]]), config)
    cache = kv_cache.DecoderCache(params, config, memory)
    cache.next_log_probs(onp.array([[BOS]]))
    with pytest.raises(Exception, match="must add one"):
        cache.next_log_probs(onp.array([[BOS, 3, 4]]))


# ----------------------------------------------------------------------------- wiring


def test_generation_uses_the_cache_by_default_and_not_with_use_cache_false(monkeypatch):
    config = GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8)
    params = init_gpt(config, onp.random.default_rng(0))
    tokenizer = CharTokenizer.train("abcd\n", ("<|endoftext|>",))
    made = []
    real = kv_cache.GPTCache.__init__

    def spy(self, *args):
        made.append(1)
        real(self, *args)

    monkeypatch.setattr(kv_cache.GPTCache, "__init__", spy)
    generate_text(params, config, tokenizer, "ab", 3, seed=0)
    assert made == [1]
    generate_text(params, config, tokenizer, "ab", 3, seed=0, use_cache=False)
    assert made == [1]


class Spied(Exception):
    """Raised by a spy once it has seen its arguments: the command need not go further."""


def spy_on(monkeypatch, module, name, seen):
    """Replace module.name by a function that records its use_cache argument and stops."""

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_cache", "not passed"))
        raise Spied(name)

    monkeypatch.setattr(module, name, spy)


def cli_use_cache(monkeypatch, args, module, name):
    """What use_cache a command passes to module.name, run without and with --no-cache."""
    seen = []
    spy_on(monkeypatch, module, name, seen)
    for extra in ([], ["--no-cache"]):
        result = CliRunner().invoke(main, args + extra)
        assert isinstance(result.exception, Spied), result.output
    return seen


def tiny_generator():
    tokenizer = CharTokenizer.train("abcd\n", ("<|endoftext|>",))
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)
    return init_gpt(config, onp.random.default_rng(0)), config, tokenizer


def test_every_generating_command_passes_no_cache_down(monkeypatch, tmp_path):
    """The cache is the default (use_cache=True) and --no-cache turns it off, for each command."""
    monkeypatch.setattr(instruct_run, "load_generator", lambda checkpoint: tiny_generator())
    assert cli_use_cache(monkeypatch, ["generate", "--prompt", "ab"], generate,
                         "generate_text") == [True, False]
    assert cli_use_cache(monkeypatch, ["generate", "--instruction", "x"], instruct_run,
                         "generate_instruction") == [True, False]
    params, config, tokenizer = tiny_generator()
    monkeypatch.setattr(pretrain, "pretrain", lambda *args, **kwargs: {
        "final": {"iter": 1, "train_loss": 1.0, "val_loss": 1.0}, "seconds": 0.0,
        "train_seconds": 0.0, "objective": "clm",
        "params": params, "model_config": config, "tokenizer": tokenizer})
    assert cli_use_cache(monkeypatch, ["pretrain", "--out", str(tmp_path / "p")], generate,
                         "generate_text") == [True, False]
    assert cli_use_cache(monkeypatch, ["fewshot", "--task", "t.jsonl"], fewshot,
                         "run_fewshot") == [True, False]
    assert cli_use_cache(monkeypatch, ["finetune", "instruct", "--out", str(tmp_path / "i")],
                         cli_finetune, "run_instruct") == [True, False]
    assert cli_use_cache(monkeypatch, ["seq2seq", "train", "--out", str(tmp_path / "s")],
                         cli_seq2seq, "train_seq2seq") == [True, False]
    monkeypatch.setattr(cli_seq2seq, "load_checkpoint", lambda *args, **kwargs: mock_ckpt())
    assert cli_use_cache(monkeypatch, ["seq2seq", "translate", "abc"], cli_seq2seq,
                         "translate_texts") == [True, False]


def mock_ckpt():
    return SimpleNamespace(params=None, model_config=None, tokenizer=None)


def test_the_library_passes_use_cache_down_to_the_decoding_loops(monkeypatch):
    """generate_ids, greedy_batch, few-shot scoring, instruction scoring and instruction
    generation, each with its default and with use_cache=False: the cached loop runs only by
    default."""
    params, config, tokenizer = tiny_generator()
    used = []
    for module, name in ((generate, "greedy_batch_cached"), (generate, "_greedy_chunk"),
                         (generate, "GPTCache")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                            used.append(_name) or _real(*a, **k))

    def runs(call):
        used.clear()
        for use_cache in (None, False):
            call(**({} if use_cache is None else {"use_cache": use_cache}))
        return used[:]

    rng = onp.random.default_rng
    assert runs(lambda **k: generate_ids(params, config, [1], 2, rng(0), **k)) == \
        ["GPTCache"]
    assert runs(lambda **k: greedy_batch(params, config, [[1]], [2], 0, **k)) == \
        ["greedy_batch_cached", "_greedy_chunk"]
    task = fewshot.parse_task(['{"input": "a", "output": "b"}', '{"input": "c", "output": "d"}'],
                              "t.jsonl")
    assert runs(lambda **k: fewshot.score_query(params, config, tokenizer, task, "a",
                                                task.records[0], 0, **k)) == \
        ["greedy_batch_cached", "_greedy_chunk"]
    assert runs(lambda **k: fewshot.evaluate_task(params, config, tokenizer, task, [0], **k)) == \
        ["greedy_batch_cached", "_greedy_chunk"]  # both queries decoded in one batch
    records = [{"instruction": "say", "input": "", "output": "ab"}]
    tokenizer_eot = CharTokenizer.train("abcdINRstrucionpyse:\n ", ("<|endoftext|>",))
    config_eot = GPTConfig(vocab_size=tokenizer_eot.vocab_size, block_size=32, n_layer=1,
                           n_head=1, n_embd=8)
    params_eot = init_gpt(config_eot, rng(0))
    assert runs(lambda **k: instruct_run.score_responses(params_eot, config_eot, tokenizer_eot,
                                                         records, 4, **k)) == \
        ["greedy_batch_cached", "_greedy_chunk"]
    monkeypatch.setattr(instruct_run, "load_generator",
                        lambda checkpoint: (params_eot, config_eot, tokenizer_eot))
    assert runs(lambda **k: instruct_run.generate_instruction("run", "say", max_new_tokens=3,
                                                              **k)) == ["GPTCache"]


def test_seq2seq_translation_and_training_pass_use_cache_down(monkeypatch, tmp_path):
    tokenizer = CharTokenizer.train("abcdef", ("<pad>", "<bos>", "<eos>"))
    config = Seq2SeqConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2,
                           n_embd=8)
    params = init_seq2seq(config, onp.random.default_rng(0))
    made = []
    real = kv_cache.DecoderCache.__init__
    monkeypatch.setattr(kv_cache.DecoderCache, "__init__",
                        lambda self, *args: made.append(1) or real(self, *args))
    for beam_size in (1, 3):
        made.clear()
        decoding.translate_texts(params, config, tokenizer, ["abc", "fed"], beam_size=beam_size)
        assert made  # the default decodes on the cache
        made.clear()
        decoding.translate_texts(params, config, tokenizer, ["abc", "fed"], beam_size=beam_size,
                                 use_cache=False)
        assert not made
    seen = []
    spy_on(monkeypatch, seq2seq_run, "translate", seen)
    small = Seq2SeqConfig(block_size=32, n_layer=1, n_embd=8)  # the embedded dates fit
    one_step = TrainConfig(batch_size=2, max_iters=1, eval_interval=1, eval_iters=1)
    for run, kwargs in (("a", {}), ("b", {"use_cache": False})):
        with pytest.raises(Spied):
            seq2seq_run.train_seq2seq(small, one_step, str(tmp_path / run), log=lambda *a: None,
                                      **kwargs)
    assert seen == [True, False]


def test_fewshot_and_instruction_runs_pass_use_cache_down(monkeypatch, tmp_path):
    """run_fewshot -> evaluate_task, and run_instruct -> score_responses (before and after)."""
    task = tmp_path / "t.jsonl"
    task.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    params, config, tokenizer = tiny_generator()
    monkeypatch.setattr(fewshot, "load_checkpoint", lambda path, **kwargs: SimpleNamespace(
        params=params, model_config=config, tokenizer=tokenizer, iter=0))
    seen = []
    real_evaluate = fewshot.evaluate_task
    monkeypatch.setattr(fewshot, "evaluate_task", lambda *a, **k: seen.append(k["use_cache"])
                        or real_evaluate(*a, **k))
    for kwargs in ({}, {"use_cache": False}):
        fewshot.run_fewshot("run", [str(task)], [0], icl_windows=0, **kwargs)
    assert seen == [True, False]

    base = str(tmp_path / "base")
    tokenizer = CharTokenizer.train("abcdefINRsponstruci:\n ", special_tokens=SPECIAL_TOKENS)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=1,
                       n_embd=8)
    params = init_gpt(config, onp.random.default_rng(0))
    save_checkpoint(base, params, adamw_init(params), onp.random.default_rng(0).bit_generator.state,
                    config, TrainConfig(), tokenizer, 0)
    data = tmp_path / "i.jsonl"
    data.write_text("".join(json.dumps({"instruction": "say", "input": "", "output": "ab"}) + "\n"
                            for _ in range(20)))
    seen.clear()
    real_score = instruct_run.score_responses
    monkeypatch.setattr(instruct_run, "score_responses", lambda *a: seen.append(a[-1])
                        or real_score(*a))
    settings = instruct_run.InstructSettings(checkpoint=base, data=str(data), max_iters=1,
                                             eval_interval=1, max_new_tokens=2)
    for run, kwargs in (("a", {}), ("b", {"use_cache": False})):
        instruct_run.run_instruct(str(tmp_path / run), settings, log=lambda *a: None, **kwargs)
    assert seen == [True, True, False, False]  # the base model's responses, then the tuned one's


def test_a_cached_decoder_step_builds_position_encodings_only_up_to_its_position(monkeypatch):
    """The fixed (sinusoidal) table is not in the weights file, so a run's block_size costs
    nothing there: a decoder step must not build all block_size rows of it."""
    from tinyllm import kv_cache, seq2seq

    built = []
    real = seq2seq.sinusoidal_positions
    monkeypatch.setattr(kv_cache, "sinusoidal_positions",
                        lambda n, c, dtype: built.append(n) or real(n, c, dtype))
    config = Seq2SeqConfig(vocab_size=9, block_size=1 << 20, n_layer=1, n_head=2, n_embd=8,
                           positions="sinusoidal")
    params = {"tgt_wte": onp.ones((9, 8), "float32")}
    monkeypatch.setattr(kv_cache, "target_table", lambda p: p["tgt_wte"])
    x = kv_cache.target_embedding(params, config, onp.array([[1, 2]]), onp.array([[5, 6]]))
    assert built == [7]
    onp.testing.assert_allclose(x[0] - onp.sqrt(8), real(7, 8)[5:7], atol=1e-6)
