"""A key/value cache for generation: each new token costs one position's work, not the context's.

Why it works. In a causal decoder the keys and values of position j depend only on the tokens
0..j, so once computed they never change while the sequence grows. Plain generation
(`gpt_forward` on the whole context, every step) recomputes all of them for every new token;
with a cache, a step runs only the new token through the model: its query attends to the stored
keys and values of every earlier position, and its own key and value are written into the cache
for the steps after it. The maths is that of the reference blocks (tinyllm/blocks.py and
tinyllm/seq2seq.py), calling the same `layer_norm`, `linear`, `feed_forward` and
`multi_head_attention`: only where k and v come from differs. The plain functions stay the way
a reader learns the model; this module is the fast path beside them, and tests/test_kv_cache.py
shows that both give the same logits (to float32 rounding) and the same tokens. (The rounding
differs because a one-row matmul sums in another order than a whole-window one: two candidate
tokens whose float32 logits tie to within about 1e-6 could come out swapped, which no run of the
benchmark has shown; on float64 weights the tests find the tokens identical.)

The cache of a model with L layers is, per layer, a keys and a values buffer (B, P, C): row b,
position p holds that sequence's key (or value) at position p, for P <= block_size positions.
(Stored before the heads are split, so a step reuses `multi_head_attention` as it is.) Each
row has its own positions, so sequences of different lengths share one batch: a query at
position p is masked from every key past p, and so never reads a slot that is unwritten (zeros)
or written by padding.

The context limit. Positions are absolute (a learned or sinusoidal embedding per position),
so when generation runs past block_size and the window of the last block_size tokens slides by
one, every token's position changes and no stored key is valid any more. `GPTCache` then reads
the whole window again, just as the uncached path does: beyond the context a step costs what
an uncached step costs, and gives the same tokens.

In PyTorch terms this is Hugging Face's `past_key_values`, with static (preallocated) buffers.
Plain numpy only: nothing here is differentiated.
"""

import math

import numpy as onp

from .attention import multi_head_attention
from .blocks import feed_forward
from .errors import TinyLLMError
from .models import lm_head_weight
from .ops import MASK_VALUE, embedding, layer_norm, linear, log_softmax, padding_mask
from .seq2seq import output_weight, sinusoidal_positions, target_table


# ----------------------------------------------------------------------------- the cache itself


def new_cache(n_layer, rows, n_pos, n_embd, dtype):
    """Empty (zero) key and value buffers: {"k": [L x (B, P, C)], "v": [L x (B, P, C)]}.

    Zeros, not `empty`: a masked slot gets weight exactly 0, and 0 * garbage could be NaN.
    """
    return {name: [onp.zeros((rows, n_pos, n_embd), dtype=dtype) for _ in range(n_layer)]
            for name in ("k", "v")}


def select_rows(cache, rows):
    """The cache of the sequences `rows` (indices or a boolean mask), in that order: beam search
    reorders hypotheses by parent, batched greedy drops finished rows. Returns a new cache."""
    return {name: [buffer[rows] for buffer in buffers] for name, buffers in cache.items()}


def position_mask(positions, width, dtype):
    """Additive mask (B, 1, n, W) for new tokens at `positions` (B, n): 0 where the key's position
    is at most the query's, MASK_VALUE after. Example: positions [[1]], width 3 -> [[[[0, 0, -1e9]]]].
    """
    allowed = onp.arange(width)[None, None, :] <= positions[:, :, None]  # (B, n, W)
    return onp.where(allowed, 0.0, MASK_VALUE).astype(dtype)[:, None]  # (B, 1, n, W)


def cached_self_attention(x, c_attn, c_proj, n_head, keys, values, positions, mask):
    """Causal self-attention of new tokens x (B, n, C) at `positions` (B, n) -> (B, n, C).

    Their keys and values are written into this layer's buffers (B, P, C) first; then every query
    reads the buffers up to the mask's width, as `attention.self_attention` reads its sequence.
    """
    q, k, v = onp.split(linear(x, **c_attn), 3, axis=-1)  # (B, n, 3C) -> 3 x (B, n, C)
    rows = onp.arange(x.shape[0])[:, None]  # (B, 1), broadcast against positions (B, n)
    keys[rows, positions] = k  # each row's new keys at its own positions
    values[rows, positions] = v
    width = mask.shape[-1]
    return multi_head_attention(q, keys[:, :width], values[:, :width], c_proj, n_head, mask)


# ----------------------------------------------------------------------------- GPT


def gpt_block_cached(x, ln_1, attn, ln_2, mlp, n_head, keys, values, positions, mask):
    """`blocks.gpt_block` for new tokens (B, n, C), reading and extending one layer's cache."""
    x = x + cached_self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, keys=keys,
                                  values=values, positions=positions, mask=mask)
    return x + feed_forward(layer_norm(x, **ln_2), **mlp)  # (B, n, C)


def gpt_extend(params, config, cache, ids, positions):
    """Run new tokens ids (B, n) at positions (B, n) through the GPT, with the cache holding every
    earlier position of each row -> final-normed hidden states (B, n, C). Writes into `cache`.

    Position 0..n-1 on an empty cache is `models.gpt_hidden`; a single token at position p after
    p cached ones is one step of generation.
    """
    if positions.max() >= config.block_size:
        raise TinyLLMError(f"position {positions.max()} is past block_size {config.block_size}")
    x = embedding(params["wte"], ids) + params["wpe"][positions]  # (B, n, C)
    mask = position_mask(positions, int(positions.max()) + 1, x.dtype)  # (B, 1, n, W)
    for block, keys, values in zip(params["h"], cache["k"], cache["v"]):
        x = gpt_block_cached(x, **block, n_head=config.n_head, keys=keys, values=values,
                             positions=positions, mask=mask)  # (B, n, C)
    return layer_norm(x, **params["ln_f"])  # (B, n, C)


def gpt_logits(params, hidden):
    """Next-token logits from final-normed hidden states: (..., C) -> (..., V)."""
    return linear(hidden, lm_head_weight(params))


class GPTCache:
    """next_logits(window) for one sequence: the logits (V,) after a window of token ids, reusing
    the keys and values of the previous window when this one extends it (same ids, same positions).

    While generation fits the context the window only grows, and each call runs just the new
    tokens. Once it slides (each call drops the oldest token), every position changes, and the
    whole window is read again: the cost of the uncached path, and its result.
    """

    def __init__(self, params, config):
        dtype = params["wte"].dtype
        self.params, self.config = params, config
        self.cache = new_cache(config.n_layer, 1, config.block_size, config.n_embd, dtype)
        self.tokens = []  # the ids whose keys and values the cache holds, at positions 0, 1, ...
        self.rebuilds = 0  # how often a whole window was read (the tests look)

    def next_logits(self, window):
        """Logits (V,) for the token after `window` (a list of at most block_size ids)."""
        seen = len(self.tokens)
        if not 0 < seen < len(window) or window[:seen] != self.tokens:
            seen = 0  # first call, or the window slid: read it whole
            self.rebuilds += 1
        new = onp.asarray(window[seen:], dtype=onp.int32)[None, :]  # (1, n)
        positions = onp.arange(seen, len(window))[None, :]  # (1, n)
        hidden = gpt_extend(self.params, self.config, self.cache, new, positions)  # (1, n, C)
        self.tokens = list(window)
        return gpt_logits(self.params, hidden[0, -1])  # (C,) -> (V,)


def greedy_batch_cached(params, config, prompts, limits, stop_id):
    """`generate.greedy_batch`'s loop on the cache: the prompts run once, as one right-padded
    batch; then each step feeds every unfinished row its one new token at its own position.

    A row stops at `stop_id`, after limits[i] new tokens, or when it fills the context; finished
    rows leave the batch (and the cache). Returns the new token lists with stop_id removed.
    """
    lengths = onp.array([len(p) for p in prompts])  # (N,)
    ends = onp.minimum(lengths + onp.asarray(limits, dtype=int), config.block_size)  # (N,)
    out = [[] for _ in prompts]
    live = onp.flatnonzero(lengths < ends)  # rows still to decode, (L,)
    if live.size == 0:
        return out
    width = int(lengths[live].max())
    ids = onp.zeros((live.size, width), dtype=onp.int32)  # (L, W) right-padded with id 0
    for row, index in enumerate(live):
        ids[row, :lengths[index]] = prompts[index]
    cache = new_cache(config.n_layer, live.size, int(ends.max()), config.n_embd,
                      params["wte"].dtype)
    positions = onp.broadcast_to(onp.arange(width), ids.shape)  # (L, W)
    hidden = gpt_extend(params, config, cache, ids, positions)  # (L, W, C)
    last = hidden[onp.arange(live.size), lengths[live] - 1]  # (L, C) each row's last prompt token
    while True:
        token = gpt_logits(params, last).argmax(axis=-1)  # (L,)
        for index, t in zip(live, token):
            out[index].append(int(t))
        lengths[live] += 1
        going = (token != stop_id) & (lengths[live] < ends[live])  # (L,)
        if not going.all():
            live, token, cache = live[going], token[going], select_rows(cache, going)
        if live.size == 0:
            break
        positions = (lengths[live] - 1)[:, None]  # (L, 1) the new token's position
        last = gpt_extend(params, config, cache, token[:, None].astype(onp.int32), positions)[:, 0]
    return [row[:row.index(stop_id)] if stop_id in row else row for row in out]


# ----------------------------------------------------------------------------- encoder-decoder


def target_embedding(params, config, ids, positions):
    """`seq2seq.embed_tokens` at given positions (B, n): token * sqrt(C) + position -> (B, n, C)."""
    x = embedding(target_table(params), ids) * math.sqrt(config.n_embd)  # (B, n, C)
    if config.positions == "sinusoidal":
        table = sinusoidal_positions(int(positions.max()) + 1, config.n_embd, x.dtype)  # (P, C)
        x = x + table[positions]
    elif config.positions == "learned":
        x = x + params["tgt_wpe"][positions]
    return x


def cross_keys_values(params, memory):
    """Each decoder layer's cross-attention keys and values, computed once per source:
    memory (B, S, C) -> [L x ((B, S, C), (B, S, C))]."""
    return [tuple(onp.split(linear(memory, **block["xattn"]["c_kv"]), 2, axis=-1))
            for block in params["decoder"]]


def cross_decoder_block_cached(x, ln_1, attn, ln_2, xattn, ln_3, mlp, n_head, keys, values,
                               positions, self_mask, cross, memory_mask):
    """`seq2seq.cross_decoder_block` for new tokens (B, n, C): self-attention on the cache,
    cross-attention on the source's precomputed keys and values `cross` = (k, v), then the MLP."""
    x = x + cached_self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, keys=keys,
                                  values=values, positions=positions, mask=self_mask)
    q = linear(layer_norm(x, **ln_2), **xattn["c_q"])  # (B, n, C)
    x = x + multi_head_attention(q, *cross, xattn["c_proj"], n_head, memory_mask)  # reads (B, S, C)
    return x + feed_forward(layer_norm(x, **ln_3), **mlp)  # (B, n, C)


class DecoderCache:
    """next_log_probs(prefixes, parents=None) for an encoder-decoder: log-probabilities (R, V),
    float64, of the token after each target prefix (R, t), as `decoding` uses them.

    The prefixes must each extend by one token the prefixes of the previous call: row i
    extends row parents[i] of it (beam search reorders its hypotheses) or, without parents, row i.
    The memory (B, S, C) has one row per prefix, or one row for all (beam search on one source).
    """

    def __init__(self, params, config, memory, src_valid=None):
        dtype = params["src_wte"].dtype
        self.params, self.config = params, config
        self.cross = cross_keys_values(params, memory)  # computed once per source
        self.memory_mask = None if src_valid is None else padding_mask(src_valid, dtype)
        self.cache = None
        self.length = 0  # prefix length the cache holds

    def next_log_probs(self, prefixes, parents=None):
        rows, t = prefixes.shape
        if self.cache is None:  # the first call reads the prefixes whole (usually just <bos>)
            self.cache = new_cache(self.config.n_layer, rows, self.config.block_size,
                                   self.config.n_embd, self.params["src_wte"].dtype)
        elif t != self.length + 1:
            raise TinyLLMError(f"the decoder's cache holds prefixes of {self.length} tokens;"
                               f" the next call must add one, got {t}")
        elif parents is not None:
            self.cache = select_rows(self.cache, onp.asarray(parents))
        new = prefixes[:, self.length:]  # (R, n): the whole prefix on the first call, then 1
        positions = onp.broadcast_to(onp.arange(self.length, t), new.shape)  # (R, n)
        logits = self._extend(new, positions)[:, -1]  # (R, V)
        self.length = t
        return log_softmax(onp.asarray(logits, dtype=onp.float64))

    def _extend(self, ids, positions):
        """Run new target tokens through the decoder, extending the cache -> logits (R, n, V)."""
        config = self.config
        if positions.max() >= config.block_size:
            raise TinyLLMError(f"position {positions.max()} is past block_size {config.block_size}")
        x = target_embedding(self.params, config, ids, positions)  # (R, n, C)
        mask = position_mask(positions, int(positions.max()) + 1, x.dtype)  # (R, 1, n, W)
        for block, keys, values, cross in zip(self.params["decoder"], self.cache["k"],
                                              self.cache["v"], self.cross):
            x = cross_decoder_block_cached(x, **block, n_head=config.n_head, keys=keys,
                                           values=values, positions=positions, self_mask=mask,
                                           cross=cross, memory_mask=self.memory_mask)
        return linear(layer_norm(x, **self.params["dec_ln_f"]), output_weight(self.params))
