"""Masked-language-model (MLM) pretraining: the encoder as a pretrained model (BERT's objective).

A causal GPT learns by predicting each next token from the tokens before it. An encoder sees the
whole text at once (bidirectional attention: `models.bidirectional_hidden`, the same blocks and
the same parameter tree as the GPT), so predicting "the next token" would be copying it. Instead
(Devlin et al., 2019, "BERT", section 3.1):

1. choose 15% of the real (non-padding) positions of each sequence, at least one;
2. replace 80% of the chosen tokens by the mask token `<|mask|>`, 10% by a random ordinary token,
   and keep 10% as they are (so the model cannot learn that only masked positions matter, and
   must keep a good vector for every token);
3. predict the original token at the chosen positions only: the loss is the mean cross-entropy
   over them, every other position counts for nothing.

The output layer is the token embedding transposed (tied), as in the GPT, so an MLM checkpoint
holds exactly a GPT's parameter tree; its config.json says kind "mlm", and the commands that
need a causal model refuse it. Only the chosen positions' hidden states go through the output
layer (about 15% of them), which makes an MLM step cheaper than a causal one at the default
vocabulary: the (B T, C) @ (C, V) product is the largest matmul of a step.

Shapes: B batch, T time, C channels, V vocabulary, N chosen positions in a batch.
"""

import re

import autograd.numpy as np
import numpy as onp

from .data import get_windows
from .errors import TinyLLMError
from .models import bidirectional_hidden, check_finite_outputs, lm_head_weight
from .ops import cross_entropy, linear
from .tokenizers import MASK_TOKEN

MASK_RATE = 0.15  # share of positions chosen for prediction (BERT)
REPLACE_WITH_MASK = 0.8  # of the chosen: replaced by <|mask|>
REPLACE_WITH_RANDOM = 0.1  # of the chosen: replaced by a random ordinary token; the rest is kept


# ----------------------------------------------------------------------------- masking


def chosen_count(n_real, rate=MASK_RATE):
    """How many of a sequence's n_real positions are chosen: round(rate * n), at least 1.

    Example: 256 -> 38, 10 -> 2, 3 -> 1 (0.45 rounds to 0, but every sequence teaches something).
    """
    return onp.maximum(1, onp.rint(rate * onp.asarray(n_real))).astype(onp.int64)


def choose_positions(valid, rng, rate=MASK_RATE):
    """Which positions to predict: valid (B, T) of 0/1 -> chosen (B, T) bool, never padding.

    Each row gets exactly chosen_count(real tokens) positions, drawn uniformly without
    replacement among its real ones: every position gets a random key, padding the key +inf, and
    the positions with the smallest keys are chosen.
    """
    valid = onp.asarray(valid) > 0  # (B, T)
    keys = onp.where(valid, rng.random(valid.shape), onp.inf)  # (B, T)
    rank = onp.argsort(onp.argsort(keys, axis=1), axis=1)  # (B, T): 0 for the smallest key
    n_real = valid.sum(axis=1)  # (B,)
    k = onp.where(n_real > 0, chosen_count(n_real, rate), 0)  # (B,)
    return (rank < k[:, None]) & valid  # (B, T)


def mask_tokens(ids, valid, rng, mask_id, n_ordinary, rate=MASK_RATE):
    """BERT's corruption: ids (B, T) -> (inputs (B, T), chosen (B, T) bool).

    Of the chosen positions, 80% get `mask_id`, 10% a random id in [0, n_ordinary) (an
    ordinary token, never a special one) and 10% keep their token; the targets are `ids`.
    Example (rate 0.5): ids [[5, 6, 7, 8]] may give inputs [[5, M, 7, 8]], chosen [[F, T, F, T]]:
    position 3 was chosen and kept.
    """
    ids = onp.asarray(ids)
    chosen = choose_positions(valid, rng, rate)  # (B, T)
    u = rng.random(ids.shape)  # (B, T): which of the three fates
    random_ids = rng.integers(0, n_ordinary, size=ids.shape)  # (B, T)
    inputs = onp.where(chosen & (u < REPLACE_WITH_MASK), mask_id, ids)
    random_slot = chosen & (u >= REPLACE_WITH_MASK) & (u < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
    inputs = onp.where(random_slot, random_ids, inputs)
    return inputs.astype(ids.dtype), chosen


def mask_id_of(tokenizer):
    """(mask id, number of ordinary tokens) of a tokenizer that has the mask token."""
    if MASK_TOKEN not in tokenizer.special_tokens:
        raise TinyLLMError(f"the tokenizer has no {MASK_TOKEN} token: it was not made for masked"
                           " language modelling (pretrain with --objective mlm)")
    return tokenizer.special_tokens[MASK_TOKEN], min(tokenizer.special_tokens.values())


# ----------------------------------------------------------------------------- model and loss


def mlm_logits(params, inputs, rows, config, valid=None, rng=None):
    """Token logits at some positions: inputs (B, T), rows (N,) flat indices b * T + t -> (N, V).

    Only those positions go through the output layer (see the module docstring).
    """
    hidden = bidirectional_hidden(params, inputs, config, valid=valid, rng=rng)  # (B, T, C)
    flat = np.reshape(hidden, (-1, hidden.shape[-1]))  # (B T, C)
    return linear(flat[rows], lm_head_weight(params))  # (N, C) @ (C, V) -> (N, V)


def mlm_loss(params, inputs, targets, chosen, config, valid=None, rng=None):
    """Mean cross-entropy of the original tokens at the chosen positions only -> scalar.

    inputs (B, T) the corrupted ids, targets (B, T) the original ids, chosen (B, T) bool.
    """
    rows = onp.flatnonzero(chosen)  # (N,)
    logits = mlm_logits(params, inputs, rows, config, valid, rng)  # (N, V)
    return cross_entropy(logits, onp.reshape(targets, -1)[rows])


def mlm_loss_and_batches(splits, config, batch_size, tokenizer, rate=MASK_RATE):
    """loss_fn(params, batch, rng) and sample(split, rng, rows=batch_size, length=block_size)
    for train.train_loop: random windows of the corpus, corrupted afresh by the Generator of
    each draw (so resume and evaluation batches are reproducible exactly like the causal ones);
    `rate` of each window's positions chosen. A window is its own targets: no next token is
    needed after it."""
    mask_id, n_ordinary = mask_id_of(tokenizer)

    def sample(split, rng, rows=batch_size, length=config.block_size):
        x = get_windows(splits[split], rows, length, rng)  # (B, T)
        inputs, chosen = mask_tokens(x, onp.ones(x.shape), rng, mask_id, n_ordinary, rate)
        return inputs, x, chosen

    def loss_fn(params, batch, rng):
        inputs, targets, chosen = batch
        return mlm_loss(params, inputs, targets, chosen, config, rng=rng)

    return loss_fn, sample


# ----------------------------------------------------------------------------- measuring it


def masked_accuracy(params, config, tokenizer, ids, n_batches=20, batch_size=8, seed=0):
    """Accuracy of the top prediction at the positions that got the mask token, on random
    windows of `ids` (N,) (the validation split), beside the unigram baseline: always guessing
    the most frequent token of `ids` at those same positions.

    Returns {"accuracy", "baseline", "baseline_token", "positions"}.
    """
    mask_id, n_ordinary = mask_id_of(tokenizer)
    rng = onp.random.default_rng(seed)
    counts = onp.bincount(ids, minlength=config.vocab_size)
    most_frequent = int(counts.argmax())
    right = baseline = total = 0
    for _ in range(n_batches):
        x = get_windows(ids, batch_size, config.block_size, rng)  # (B, T)
        inputs, chosen = mask_tokens(x, onp.ones(x.shape), rng, mask_id, n_ordinary)
        rows = onp.flatnonzero(chosen & (inputs == mask_id))  # (N,) the masked positions
        pred = onp.asarray(mlm_logits(params, inputs, rows, config)).argmax(axis=1)  # (N,)
        truth = x.reshape(-1)[rows]
        right += int((pred == truth).sum())
        baseline += int((truth == most_frequent).sum())
        total += len(rows)
    return {"accuracy": right / total, "baseline": baseline / total,
            "baseline_token": tokenizer.decode([most_frequent]), "positions": total}


# ----------------------------------------------------------------------------- fill


MASK_TEXT = "[MASK]"  # what a user types in `tinyllm fill`
MASK_SPELLINGS = re.compile(r"\[mask\]|" + re.escape(MASK_TOKEN), re.IGNORECASE)  # mistyped masks


def encode_with_masks(tokenizer, text):
    """Token ids of `text` with each literal "[MASK]" replaced by the mask token's id.

    BPE tokens carry the space before a word (" the"), so one space right before a [MASK] goes
    into the masked token: "The [MASK] statement" -> ids("The") + [mask] + ids(" statement").
    Example (char tokenizer, where a mask is one character): "a[MASK]c" -> [id(a), mask, id(c)].
    """
    mask_id, _ = mask_id_of(tokenizer)
    _check_mask_spelling(text)
    pieces = text.split(MASK_TEXT)
    if len(pieces) == 1:
        raise TinyLLMError(f"the text has no {MASK_TEXT}: write {MASK_TEXT} where a token is missing")
    _check_encodes(tokenizer, text)
    ids = []
    for i, piece in enumerate(pieces):
        if i < len(pieces) - 1 and tokenizer.kind == "bpe" and piece.endswith(" "):
            piece = piece[:-1]
        ids += tokenizer.encode(piece)
        if i < len(pieces) - 1:
            ids.append(mask_id)
    return ids


def _check_mask_spelling(text):
    """Refuse a mask written another way ("[mask]", "[Mask]", the token's name "<|mask|>"): it
    would be read as plain text, so the model would fill only the other masks, or none."""
    for written in MASK_SPELLINGS.finditer(text):
        if written.group() != MASK_TEXT:
            raise TinyLLMError(f"{written.group()!r} at position {written.start()} is read as"
                               f" text, not as a mask: write the mask as {MASK_TEXT}")


def _check_encodes(tokenizer, text):
    """The tokenizer's error for a character it cannot encode, with its position in the whole
    text: the pieces between masks are encoded one by one, and each would count from 0. Each
    [MASK] stands in as as many characters that the tokenizer knows, so positions stay."""
    known = tokenizer.decode([0])  # one character: the char tokenizer's first, or BPE's byte 0
    tokenizer.encode(text.replace(MASK_TEXT, known * len(MASK_TEXT)))


def filled_text(tokenizer, text, tokens):
    """`text` with its [MASK]s replaced by `tokens` in order, undoing what encode_with_masks did
    to a space before a mask (BPE). Example: "The [MASK] fox", [" red"] -> "The red fox".

    The space dropped is the text's, never the end of a token before it: "[MASK][MASK]" with
    tokens ["\\n  ", "x"] -> "\\n  x"."""
    pieces = text.split(MASK_TEXT)
    out = ""
    for piece, token in zip(pieces, tokens):
        if tokenizer.kind == "bpe" and piece.endswith(" "):
            piece = piece[:-1]  # that space went into the masked token
        out += piece + token
    return out + pieces[-1]


def fill_masks(params, config, tokenizer, text, top_k=5):
    """The top_k predictions at each [MASK] of `text`: a list, one per mask, of (token text,
    probability) pairs, most likely first. The mask token itself is never offered: it is never
    a target in pretraining, and a barely trained model would otherwise "fill" a mask with one."""
    ids = encode_with_masks(tokenizer, text)
    if len(ids) > config.block_size:
        raise TinyLLMError(f"the text has {len(ids)} tokens, more than the model's context of"
                           f" {config.block_size}")
    inputs = onp.asarray([ids], dtype=onp.int32)  # (1, T)
    mask_id = mask_id_of(tokenizer)[0]
    rows = onp.flatnonzero(inputs[0] == mask_id)  # (M,) the masks
    logits = onp.asarray(mlm_logits(params, inputs, rows, config), dtype=onp.float64)  # (M, V)
    logits[:, mask_id] = -onp.inf  # probability 0, and left out below
    probs = onp.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)  # (M, V)
    check_finite_outputs(probs)
    out = []
    for row in probs:
        best = [i for i in onp.argsort(-row, kind="stable") if i != mask_id][:top_k]
        out.append([(tokenizer.decode([int(i)]), float(row[i])) for i in best])
    return out
