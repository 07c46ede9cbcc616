"""Attention maps: what each head of a trained model attends to, and the induction-head score.

An attention map is the matrix of weights softmax(q k^T / sqrt(D) + mask) of one head: row i is
how query token i spreads its attention over the keys (each row sums to 1). We get the maps by
running the model's own pieces block by block: before each block we compute, from the block's
input, that block's q and k (its own layer norm and projection) and the weights with
`ops.attention_weights`; then the block itself moves the residual stream on. So the maps are
the ones the forward pass uses (a test rebuilds each block's output from them).

    GPT (and a classifier run as a decoder)   causal self-attention      (L, H, T, T)
    classifier run as an encoder              bidirectional self-attention (L, H, T, T)
    seq2seq encoder                           source self-attention      (L, H, S, S)
    seq2seq decoder                           causal target self-attention (L, H, T, T)
    seq2seq cross-attention                   target queries over source (L, H, T, S)

An induction head (Olsson et al. 2022, "In-context Learning and Induction Heads") attends from a
token to the token that followed an earlier occurrence of the same token, so that the model can
copy it: having seen "w2" before, at a new "w" it looks at the "2". `induction_score` measures it.

Shape letters: L layers, H heads, T target / GPT positions, S source positions, C channels.
"""

from dataclasses import dataclass

import numpy as onp

from .attention import self_attention, split_heads
from .blocks import encoder_block, gpt_block
from .errors import TinyLLMError
from .models import embed, encoder_mask
from .ops import attention_weights, causal_mask, layer_norm, linear
from .seq2seq import cross_decoder_block, embed_tokens, target_table

PARTS = ("encoder", "decoder", "cross")  # the three attentions of a seq2seq model
# a checkpoint kind as a picture's title names it (after "of a")
KIND_NAMES = {"gpt": "GPT", "gpt-lora": "GPT with LoRA adapters", "mlm": "masked-token encoder",
              "classifier": "classifier"}


# ----------------------------------------------------------------------------- per-head weights

def self_attention_weights(x, c_attn, n_head, mask=None):
    """Weights of a self-attention layer: x (1, T, C) after its layer norm -> (H, T, T)."""
    q, k, _ = onp.split(linear(x, **c_attn), 3, axis=-1)  # (1, T, 3C) -> 3 x (1, T, C)
    return attention_weights(split_heads(q, n_head), split_heads(k, n_head), mask)[0]


def cross_attention_weights(x, memory, c_q, c_kv, n_head):
    """Weights of a cross-attention layer: queries x (1, T, C), memory (1, S, C) -> (H, T, S)."""
    q = linear(x, **c_q)  # (1, T, C)
    k, _ = onp.split(linear(memory, **c_kv), 2, axis=-1)  # (1, S, 2C) -> 2 x (1, S, C)
    return attention_weights(split_heads(q, n_head), split_heads(k, n_head))[0]


# ----------------------------------------------------------------------------- whole models


def gpt_attention(params, config, ids, causal=True):
    """Every head's weights of a GPT-shaped model on one sequence: ids (T,) -> (L, H, T, T).

    causal=False runs the same tree bidirectionally (`models.bidirectional_hidden`).
    """
    x = embed(params, onp.asarray(ids)[None, :], config)  # (1, T, C)
    mask = causal_mask(len(ids), x.dtype) if causal else encoder_mask(config, len(ids), x.dtype)
    maps = []
    for block in params["h"]:
        maps.append(self_attention_weights(layer_norm(x, **block["ln_1"]), block["attn"]["c_attn"],
                                           config.n_head, mask))  # (H, T, T)
        if causal:
            x = gpt_block(x, **block, n_head=config.n_head, mask=mask)  # (1, T, C)
        else:
            x = encoder_block(x, **block, n_head=config.n_head, mask=mask)  # (1, T, C)
    return onp.stack(maps)  # (L, H, T, T)


def seq2seq_attention(params, config, src_ids, tgt_in_ids):
    """The three attentions of an encoder-decoder on one pair: source ids (S,) and decoder input
    ids (T,) (<bos> then the target) -> {"encoder": (L, H, S, S), "decoder": (L, H, T, T),
    "cross": (L, H, T, S)}."""
    x = embed_tokens(params["src_wte"], onp.asarray(src_ids)[None, :], params.get("src_wpe"),
                     config)  # (1, S, C)
    encoder = []
    for block in params["encoder"]:
        encoder.append(self_attention_weights(layer_norm(x, **block["ln_1"]),
                                              block["attn"]["c_attn"], config.n_head))
        x = encoder_block(x, **block, n_head=config.n_head)  # (1, S, C)
    memory = layer_norm(x, **params["enc_ln_f"])  # (1, S, C)

    y = embed_tokens(target_table(params), onp.asarray(tgt_in_ids)[None, :], params.get("tgt_wpe"),
                     config)  # (1, T, C)
    mask = causal_mask(len(tgt_in_ids), y.dtype)  # (T, T)
    decoder, cross = [], []
    for block in params["decoder"]:
        decoder.append(self_attention_weights(layer_norm(y, **block["ln_1"]),
                                              block["attn"]["c_attn"], config.n_head, mask))
        # cross-attention reads the stream after the block's self-attention sub-layer
        after_self = y + _self_attention_output(y, block, config.n_head, mask)  # (1, T, C)
        cross.append(cross_attention_weights(layer_norm(after_self, **block["ln_2"]), memory,
                                             block["xattn"]["c_q"], block["xattn"]["c_kv"],
                                             config.n_head))
        y = cross_decoder_block(y, memory, **block, n_head=config.n_head, self_mask=mask)
    return {"encoder": onp.stack(encoder), "decoder": onp.stack(decoder), "cross": onp.stack(cross)}


def _self_attention_output(x, block, n_head, mask):
    """The first sub-layer of a decoder block, self_attention(ln_1(x)): (1, T, C) -> (1, T, C)."""
    return self_attention(layer_norm(x, **block["ln_1"]), **block["attn"], n_head=n_head, mask=mask)


# ----------------------------------------------------------------------------- tokens as labels

VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # ␣ ↵ ⇥: white space made visible


def token_texts(tokenizer, ids):
    """The text of each token: a character, a BPE token's bytes, or a special token's name.

    A BPE token that is part of a UTF-8 character shows its bytes as \\xNN rather than one
    replacement character for every such token. Example (char): ids of "a b" -> ["a", " ", "b"].
    """
    from .tokenizers import render_token, token_bytes_table

    special = {i: name for name, i in tokenizer.special_tokens.items()}
    if tokenizer.kind == "bpe":
        table = token_bytes_table(tokenizer.merges)
        return [special.get(i) or render_token(table[i]) for i in ids]
    return [special.get(i) or tokenizer.chars[i] for i in ids]


def visible(text):
    r"""A token's text as an axis label: white space and control characters made visible.

    Example: " the" -> "␣the", "\n" -> "↵", "\x07" -> "\x07" (its escape, four characters).
    """
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def token_labels(tokenizer, ids):
    """Axis labels for token ids: `visible(token text)`."""
    return [visible(t) for t in token_texts(tokenizer, ids)]


# ----------------------------------------------------------------------------- induction heads


def induction_targets(ids, queries=None):
    """For each query position i: the positions j + 1 that follow an earlier occurrence j < i of
    token ids[i], leaving out i itself. Returns {i: [targets]} for the queries that have any.

    `queries` limits the positions considered (default: all). Example: ids "ab2ab" as
    [a, b, 2, a, b]: position 3 (the second a) -> [1] (the b after the first a); 4 -> [2].
    """
    ids = list(ids)
    positions = range(len(ids)) if queries is None else queries
    targets = {}
    for i in positions:
        after = [j + 1 for j in range(i) if ids[j] == ids[i] and j + 1 < i]
        if after:
            targets[i] = after
    return targets


def induction_score(weights, ids, queries=None):
    """How much a head acts as an induction head on a sequence: the mean, over query positions
    whose token occurred earlier, of the attention weight on the tokens after those earlier
    occurrences (the prefix-matching score of Olsson et al. 2022). weights (T, T) -> in [0, 1].

    1.0: every such query attends only to induction targets; 0.0: never. Example: ids
    [a, b, c, a, b], a head whose row 3 puts 0.8 on position 1 and row 4 puts 0.5 on position 2
    scores (0.8 + 0.5) / 2 = 0.65. NaN if no token repeats.
    """
    targets = induction_targets(ids, queries)
    if not targets:
        return float("nan")
    return float(onp.mean([weights[i, after].sum() for i, after in targets.items()]))


def induction_scores(maps, ids, queries=None):
    """`induction_score` of every head: maps (L, H, T, T) -> (L, H)."""
    return onp.array([[induction_score(head, ids, queries) for head in layer] for layer in maps])


def best_induction_head(maps, ids, queries=None):
    """(layer, head, score) of the head with the highest induction score."""
    scores = induction_scores(maps, ids, queries)
    if onp.all(onp.isnan(scores)):
        raise TinyLLMError("no token of the prompt occurs twice: there is nothing to induce from")
    layer, head = onp.unravel_index(onp.nanargmax(scores), scores.shape)
    return int(layer), int(head), float(scores[layer, head])


def kshot_prompt(tokenizer, instruction, demos, query_input):
    """A k-shot prompt as token ids, and the positions of the last token of every input in it
    (each demonstration's and the query's): the positions an induction head answers from.

    Example (char tokenizer, no instruction): demos [a->x, b->y], query a: the prompt "ax\nby\na"
    -> query positions [0, 3, 6]; position 6 (the second a) should attend to 1 (the x).
    """
    from .fewshot_template import build_prompt

    ends = [len(tokenizer.encode(build_prompt(instruction, demos[:j], d["input"]))) - 1
            for j, d in enumerate(demos)]
    ids = tokenizer.encode(build_prompt(instruction, demos, query_input))
    return ids, ends + [len(ids) - 1]


# ----------------------------------------------------------------------------- from a run directory


@dataclass
class AttentionMaps:
    """Every head's weights on one input, with the tokens to label them by."""

    weights: onp.ndarray  # (L, H, Tq, Tk)
    query_labels: list  # Tq axis labels
    key_labels: list  # Tk axis labels
    what: str  # e.g. "causal self-attention of a GPT"
    unknown: int = 0  # characters read as the unknown token (a fine-tuned char model has one)


def checkpoint_attention(ckpt_dir, prompt, part=None, target=None):
    """The attention maps of a run directory's model on `prompt`.

    GPT, LoRA-tuned GPT, MLM and classifier runs: the self-attention over the prompt (causal, or
    bidirectional for an MLM encoder and a classifier fine-tuned with --arch encoder). seq2seq
    runs: `part` is "encoder", "decoder" or "cross" (the default) and the prompt is the source;
    the decoder reads <bos> + `target`, by default the model's own greedy translation.
    """
    from .checkpoint import load_checkpoint

    if not prompt:
        raise TinyLLMError("--prompt is empty: give the text whose attention to draw")
    ckpt = load_checkpoint(ckpt_dir, kind=None)
    if ckpt.meta["kind"] == "seq2seq":
        return _seq2seq_maps(ckpt, prompt, part or "cross", target)
    if part is not None or target is not None:
        raise TinyLLMError(f"--part and --target apply to seq2seq runs; {ckpt_dir} holds a"
                           f" {ckpt.meta['kind']!r} model")
    params, config, causal = _gpt_shaped(ckpt)
    ids, unknown = _encode_with_fallback(ckpt.tokenizer, prompt, config.block_size, "--prompt")
    labels = token_labels(ckpt.tokenizer, ids)
    what = "causal self-attention" if causal else "bidirectional self-attention"
    return AttentionMaps(gpt_attention(params, config, ids, causal), labels, labels,
                         f"{what} of a {KIND_NAMES[ckpt.meta['kind']]}", unknown)


def _gpt_shaped(ckpt):
    """(params with any LoRA adapters merged, GPTConfig, causal?) of a GPT-shaped checkpoint."""
    from .lora import merge_lora

    config, params = ckpt.model_config, ckpt.params
    if "lora" in params:
        params = merge_lora(params, config.lora_alpha, config.lora_rank)
    causal = getattr(config, "arch", "decoder") == "decoder" and ckpt.meta["kind"] != "mlm"
    return params, (config.gpt() if hasattr(config, "gpt") else config), causal


def _encode_with_fallback(tokenizer, text, block_size, flag):
    """(ids, characters read as the unknown token): a char model fine-tuned on text it had not
    seen has that token, and reads those characters so (as `generate` and `classify` do);
    any other model's tokenizer encodes as `_encode` does."""
    from .labelled_data import UNK_TOKEN, encode_with_fallback

    if UNK_TOKEN not in tokenizer.special_tokens:
        return _encode(tokenizer, text, block_size, flag), 0
    ids, unknown = encode_with_fallback(tokenizer, text)
    _check_fits(ids, block_size, flag)
    return ids, unknown


def _encode(tokenizer, text, block_size, flag):
    """Text -> ids, or a one-line error naming `flag` (unknown character, longer than context)."""
    try:
        ids = tokenizer.encode(text)
    except TinyLLMError as err:
        raise TinyLLMError(f"{flag}: {err}") from None
    _check_fits(ids, block_size, flag)
    return ids


def _check_fits(ids, block_size, flag):
    if len(ids) > block_size:
        raise TinyLLMError(f"{flag} has {len(ids)} tokens, more than the model's context of"
                           f" {block_size}")


def _seq2seq_maps(ckpt, prompt, part, target):
    """AttentionMaps of one part of an encoder-decoder on source `prompt`."""
    from .decoding import translate_texts
    from .seq2seq_data import BOS

    if part not in PARTS:
        raise TinyLLMError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "encoder" and target is not None:
        raise TinyLLMError("--target applies to --part decoder and cross: the encoder reads the"
                           " source alone")
    params, config, tokenizer = ckpt.params, ckpt.model_config, ckpt.tokenizer
    src = _encode(tokenizer, prompt, config.block_size, "--prompt")
    if part == "encoder":  # no target to decode: the encoder's weights do not depend on one
        target = ""
    elif target is None:
        target = translate_texts(params, config, tokenizer, [prompt], ["--prompt"])[0]
    tgt_in = [tokenizer.special_tokens[BOS]] + _encode(tokenizer, target, config.block_size - 1,
                                                       "--target")
    maps = seq2seq_attention(params, config, src, tgt_in)[part]
    src_labels, tgt_labels = token_labels(tokenizer, src), token_labels(tokenizer, tgt_in)
    queries, keys = {"encoder": (src_labels, src_labels), "decoder": (tgt_labels, tgt_labels),
                     "cross": (tgt_labels, src_labels)}[part]
    what = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
            "cross": "cross-attention"}[part]
    of_target = "" if part == "encoder" else f", target {target!r}"
    return AttentionMaps(maps, queries, keys, f"{what} of a seq2seq model{of_target}")


MAX_PANELS = 16  # heads in one picture (4 rows of 4): 64 panels of 256 tokens took 95 s to draw


def select_heads(maps, layer=None, head=None):
    """Panels [(title, weights (Tq, Tk))] of one layer (default: the last): one head, or all of
    them up to MAX_PANELS (the caller says how many were left out).

    Layers and heads count from 0; a one-line error names the range when either is outside it.
    """
    n_layer, n_head = maps.shape[:2]
    layer = n_layer - 1 if layer is None else layer
    if not 0 <= layer < n_layer:
        raise TinyLLMError(f"--layer {layer} is out of range: the model has {n_layer}"
                           f" layer{'s' * (n_layer != 1)} (0 to {n_layer - 1})")
    if head is not None and not 0 <= head < n_head:
        raise TinyLLMError(f"--head {head} is out of range: each layer has {n_head}"
                           f" head{'s' * (n_head != 1)} (0 to {n_head - 1})")
    heads = range(min(n_head, MAX_PANELS)) if head is None else [head]
    return [(f"layer {layer}, head {h}", maps[layer, h]) for h in heads]
