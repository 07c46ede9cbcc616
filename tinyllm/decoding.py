"""Decoding an encoder-decoder: greedy search and beam search, each stopping at <eos>.

The encoder runs once per source; the decoder is then run on the growing target prefix, and
only its last position's log-probabilities are used to extend it. By default the decoder runs on
a key/value cache (`kv_cache.DecoderCache`): each step feeds it only the newest token, its
self-attention keys and values are appended per step, and the cross-attention keys and values
are computed once per source. `use_cache=False` (the `--no-cache` flag) re-runs the whole prefix
every step, the plain form to read; both give the same outputs (tests/test_kv_cache.py).

Why not the GPT's greedy decoder (generate.greedy_batch)? That one continues a prompt of the
model's own tokens; here each step also reads the encoder's memory and its padding mask, every
target starts from <bos> rather than from a prompt, and beam search needs the log-probabilities,
not only the argmax. The loops share no more than "append the likeliest token".

Beam search (as used by the paper, section 6.1, with beam 4 and length penalty 0.6) keeps the
`beam_size` best prefixes by total log-probability. A prefix that ends in <eos> is finished;
finished hypotheses are compared by score = log p / lp(length), where the length penalty of
Wu et al. (2016) is lp(n) = ((5 + n) / 6) ^ alpha: alpha = 0 compares raw log-probabilities
(which favour short outputs), larger alpha favours longer ones.

Each search reports, per output, how it stopped: at <eos>, or cut at the length limit
(`Output.cut`). The text alone cannot tell: decoding drops <pad> and <bos> from it, and a barely
trained model may emit them, so a cut output can come out shorter than the limit.
"""

import numbers
from typing import NamedTuple

import numpy as onp

from .errors import TinyLLMError
from .fileio import available_memory
from .kv_cache import DecoderCache
from .ops import log_softmax
from .seq2seq import decoder_forward, encoder_forward
from .seq2seq_data import BOS, EOS, encode_source, make_arrays

# Wu et al. (2016) tune alpha in [0, 1]; far above, ((5 + n) / 6)^alpha overflows a float (at
# alpha 1000, a length of 8) and beam search stopped with an OverflowError. 10 keeps it
# finite for any output a context of config.MAX_SIZE tokens allows.
MAX_LENGTH_PENALTY = 10.0


class Output(list):
    """The token ids of one decoded output (no <bos>/<eos>), and `cut`: True if it reached the
    length limit without <eos>. It is the list of ids itself, so a caller that wants only the
    ids (or compares them) uses it as one."""

    def __init__(self, ids, cut):
        super().__init__(ids)
        self.cut = cut


class Translation(NamedTuple):
    """One translated text, and whether it was cut at the length limit (see `Output`)."""

    text: str
    cut: bool


def _next_log_probs(params, config, memory, src_valid, prefixes):
    """Log-probabilities of the next token after each prefix: (R, t) ids -> (R, V) float64."""
    logits = decoder_forward(params, prefixes, memory, config, src_valid)[:, -1]  # (R, t, V) -> (R, V)
    return log_softmax(onp.asarray(logits, dtype=onp.float64))


def next_log_probs_fn(params, config, memory, src_valid, use_cache):
    """next_log_probs(prefixes, parents=None) -> (R, V) for the search loops below.

    `parents[i]` is the row of the previous step's prefixes that row i extends (beam search
    reorders its hypotheses); the cache needs it, the plain path re-reads each prefix anyway.
    The memory has one row per prefix (greedy) or one row for all of them (beam search).
    """
    if use_cache:
        return DecoderCache(params, config, memory, src_valid).next_log_probs

    def recompute(prefixes, parents=None):
        rows = memory if len(memory) == len(prefixes) else onp.repeat(memory, len(prefixes), axis=0)
        return _next_log_probs(params, config, rows, src_valid, prefixes)

    return recompute


def greedy_decode(params, config, src, src_valid, bos, eos, max_len, use_cache=True):
    """Greedy search for a batch: src (B, S), src_valid (B, S) -> B Outputs (ids, no bos/eos).

    At each step every unfinished row takes its single likeliest token; a row is finished once
    it emits <eos>, and all stop after `max_len` tokens (at most block_size - 1): a row that has
    not emitted <eos> by then is cut.
    """
    max_len = min(max_len, config.block_size - 1)
    memory = encoder_forward(params, src, config, src_valid)  # (B, S, C)
    next_log_probs = next_log_probs_fn(params, config, memory, src_valid, use_cache)
    prefixes = onp.full((src.shape[0], 1), bos, dtype=onp.int32)  # (B, 1)
    done = onp.zeros(src.shape[0], dtype=bool)
    for _ in range(max_len):
        token = next_log_probs(prefixes).argmax(axis=-1)  # (B,)
        token = onp.where(done, eos, token)
        prefixes = onp.concatenate([prefixes, token[:, None].astype(onp.int32)], axis=1)
        done |= token == eos
        if done.all():
            break
    return [_strip(row[1:], eos) for row in prefixes]


def _strip(ids, eos):
    """The Output of ids up to (not including) the first <eos>; cut if there is none.
    Example: [5, 6, eos, eos] -> [5, 6], not cut; [5, 6] -> [5, 6], cut."""
    ids = [int(i) for i in ids]
    return Output(ids[: ids.index(eos)], cut=False) if eos in ids else Output(ids, cut=True)


def length_penalty(length, alpha):
    """Wu et al. (2016): ((5 + length) / 6) ^ alpha. Example: length 7, alpha 1 -> 2.0.
    Finite for alpha up to MAX_LENGTH_PENALTY (beam_search refuses more)."""
    return ((5.0 + length) / 6.0) ** alpha


def length_penalty_problem(alpha):
    """Why `alpha` cannot be a length penalty (a number from 0 to MAX_LENGTH_PENALTY), or None.
    Example: 0.6 -> None; 1000 -> "must be from 0 to 10 (the paper: 0.6), got 1000"."""
    number = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not number or not 0.0 <= alpha <= MAX_LENGTH_PENALTY:
        return f"must be from 0 to {MAX_LENGTH_PENALTY:g} (the paper: 0.6), got {alpha!r}"
    return None


def check_beam_search(params, config, beam_size, alpha):
    """One-line errors for a beam search that cannot run: a width below 1, a length penalty
    outside 0..MAX_LENGTH_PENALTY, or hypotheses that cannot fit in free memory (where numpy
    would stop with a MemoryError deep in the search, or the machine would swap).

    Each hypothesis holds its decoder key/value cache, n_layer x (keys, values) x block_size x
    n_embd numbers, copied when the beam is reordered (so twice), and each step scores it over the
    vocabulary in float64 (log-probabilities, totals, sort indices: three arrays). Example: the
    default model (2 layers, context 64, width 64, vocab 40) in float32 -> 132,032 bytes each.
    """
    if not isinstance(beam_size, numbers.Integral) or beam_size < 1:
        raise TinyLLMError(f"--beam-size must be a whole number of 1 or more, got {beam_size!r}")
    problem = length_penalty_problem(alpha)
    if problem:
        raise TinyLLMError(f"--length-penalty {problem}")
    itemsize = onp.asarray(params["src_wte"]).dtype.itemsize
    cache = 2 * config.n_layer * 2 * config.block_size * config.n_embd * itemsize
    scores = 3 * config.vocab_size * 8
    needed, free = beam_size * (cache + scores), available_memory()
    if needed > free:
        raise TinyLLMError(f"beam search with --beam-size {beam_size:,} needs about"
                           f" {needed / 1e9:,.1f} GB of memory and this machine has"
                           f" {free / 1e9:,.1f} GB free")


def beam_search(params, config, src_ids, bos, eos, max_len, beam_size=4, alpha=0.6,
                use_cache=True):
    """Beam search for one source (list of ids) -> the best target's Output (ids, no bos/eos).

    Each step extends every live prefix by every token, keeps the 2k best extensions by total
    log-probability (k = beam_size), sets those among the best k that end in <eos> aside as
    finished, and keeps the best k others alive. It stops when k hypotheses have finished or
    after max_len tokens, and returns the finished one (or, if none finished, the live one: cut)
    with the best length-penalised score. With k = 1 this is greedy search.
    """
    check_beam_search(params, config, beam_size, alpha)
    max_len = min(max_len, config.block_size - 1)
    src = onp.asarray([src_ids], dtype=onp.int32)  # (1, S)
    memory = encoder_forward(params, src, config)  # (1, S, C)
    next_log_probs = next_log_probs_fn(params, config, memory, None, use_cache)
    alive = [([], 0.0)]  # (tokens, total log-probability)
    parents = None  # the row of the previous step that each live hypothesis extends
    finished = []
    for _ in range(max_len):
        prefixes = onp.asarray([[bos] + toks for toks, _ in alive], dtype=onp.int32)  # (R, t)
        logp = next_log_probs(prefixes, parents)  # (R, V)
        totals = onp.asarray([score for _, score in alive])[:, None] + logp  # (R, V)
        # a stable sort keeps the lower token id first among ties, as argmax does
        best = onp.argsort(-totals, axis=None, kind="stable")[: 2 * beam_size]
        alive_next, parents = [], []
        for rank, flat in enumerate(best):
            row, token = divmod(int(flat), totals.shape[1])
            tokens, total = alive[row][0] + [token], float(totals[row, token])
            if token == eos:
                if rank < beam_size:  # an <eos> counts only if it is among the k best extensions
                    finished.append((tokens[:-1], total))
            elif len(alive_next) < beam_size:
                alive_next.append((tokens, total))
                parents.append(row)
        alive = alive_next
        if len(finished) >= beam_size or not alive:
            break
    pool = finished or alive
    best = max(pool, key=lambda h: h[1] / length_penalty(len(h[0]) + 1, alpha))[0]
    return Output(best, cut=not finished)


def default_max_len(block_size, sources):
    """The most tokens a translation may have without --max-len: the context allows block_size
    - 1, but no more than twice the longest source plus 50. A model that never emits <eos> (one
    barely trained, or a run from elsewhere whose context is huge: fixed position encodings
    cost nothing in its weights file) would otherwise decode all block_size - 1 steps."""
    return min(block_size - 1, 2 * max((len(s) for s in sources), default=0) + 50)


def translate(params, config, tokenizer, texts, wheres=None, beam_size=1, alpha=0.6,
              max_len=None, chunk=256, use_cache=True, on_done=None):
    """Translate source texts -> a Translation (text, cut) per text; greedy (batched) for
    beam_size 1, else beam search per text (on the key/value cache unless use_cache is False).

    `wheres` names each text in error messages (a text with an unknown character or one longer
    than the context is reported, not truncated). on_done(texts translated), if given, after each
    text a beam search translates and each chunk greedy decoding does.
    """
    on_done = on_done or (lambda done: None)
    special = tokenizer.special_tokens
    wheres = wheres or [f"text {i + 1}" for i in range(len(texts))]
    sources = [encode_source(tokenizer, t, config.block_size, w) for t, w in zip(texts, wheres)]
    for ids, where in zip(sources, wheres):
        if not ids:
            raise TinyLLMError(f"{where}: the source is empty: nothing to translate")
    max_len = max_len or default_max_len(config.block_size, sources)
    outputs = []
    if beam_size > 1:
        for s in sources:
            outputs.append(beam_search(params, config, s, special[BOS], special[EOS], max_len,
                                       beam_size, alpha, use_cache))
            on_done(len(outputs))
    else:
        for start in range(0, len(sources), chunk):
            part = sources[start:start + chunk]
            src, src_valid = make_arrays(part, [[]] * len(part), special)[:2]
            outputs += greedy_decode(params, config, src, src_valid, special[BOS], special[EOS],
                                     max_len, use_cache)
            on_done(len(outputs))
    hidden = set(special.values())  # <pad>/<bos> never belong in an output text
    return [Translation(tokenizer.decode([i for i in out if i not in hidden]), out.cut)
            for out in outputs]


def translate_texts(params, config, tokenizer, texts, wheres=None, **search):
    """The texts of `translate` alone, for callers that do not count cut outputs. `search`:
    translate's beam_size, alpha, max_len, chunk, use_cache and on_done."""
    return [t.text for t in translate(params, config, tokenizer, texts, wheres, **search)]
