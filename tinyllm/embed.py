"""Text vectors: one vector per text from a pretrained model, and nearest neighbours by cosine.

A text's vector is the mean of the model's final hidden states (after the last layer norm) over
its real tokens: `finetune.pool(..., "mean")`. (A classifier fine-tuned from an encoder pools by
"meanmax" instead; as vectors before any fine-tuning, the channel-wise max put fewer YouTube
comments next to one of their own label than the mean did: 0.76 against 0.81 from an MLM base.)
From an MLM checkpoint the model runs bidirectionally (each token's state has seen the whole
text); from a causal checkpoint (a pretrained or instruction-tuned GPT) it runs causally, so a
token's state has seen only the tokens before it. A text longer than the context is read as
overlapping windows, as in classification (`finetune.make_windows`), and its vector is the mean of
its windows' vectors. Padding changes nothing: a text embedded alone or inside a padded batch gets
the same vector (a test shows it).

Shapes: N texts, W windows, T time, C channels.
"""

import io
import os

import numpy as onp

from .checkpoint import load_checkpoint
from .data import PIECE_CHARACTERS, check_not_binary, encode_in_pieces
from .errors import TinyLLMError
from .fileio import atomic_write_bytes, decode_utf8, read_bounded, split_lines
from .finetune import WINDOW_STRIDE, make_windows, pool
from .lora import merge_lora
from .models import bidirectional_hidden, check_finite_outputs, gpt_hidden

MAX_WINDOWS = 8  # most context windows read per text (as `finetune classify`); the rest is cut
MAX_LINES_BYTES = 256 << 20  # a file of texts to embed larger than this is not one


def load_embedder(checkpoint):
    """(params, GPTConfig, tokenizer, bidirectional?) of a pretrained run: an MLM encoder
    (bidirectional) or a causal GPT, LoRA adapters merged."""
    ckpt = load_checkpoint(checkpoint, kind=("mlm", "gpt", "gpt-lora"))
    config, params = ckpt.model_config, ckpt.params
    if hasattr(config, "lora_rank"):
        params, config = merge_lora(params, config.lora_alpha, config.lora_rank), config.gpt()
    return params, config, ckpt.tokenizer, ckpt.meta["kind"] == "mlm"


def most_tokens_read(block_size, max_windows=MAX_WINDOWS):
    """The tokens of a text that its windows cover: the rest of a longer text is cut.
    Example: block 32 (windows half a block apart), 8 windows -> 7 x 16 + 32 = 144."""
    return (max_windows - 1) * max(1, int(block_size * WINDOW_STRIDE)) + block_size


def window_vectors(params, config, ids, valid, bidirectional):
    """Mean-pooled final hidden states: ids (W, T), valid (W, T) -> (W, C)."""
    if bidirectional:
        hidden = bidirectional_hidden(params, ids, config, valid=valid)  # (W, T, C)
    else:
        hidden = gpt_hidden(params, ids, config)  # (W, T, C): padding is after the real tokens
    return onp.asarray(pool(hidden, valid, "mean"))  # (W, C)


def embed_texts(params, config, tokenizer, texts, bidirectional, batch_size=32,
                max_windows=MAX_WINDOWS, on_batch=None):
    """One vector per text: (N, C) float32, and the number of texts cut after max_windows;
    on_batch(texts done), if given, after each batch. It is `encode_texts`, then
    `embed_sequences`: `tinyllm embed` calls the two itself, to show the progress of each."""
    seqs = encode_texts(tokenizer, texts, most_tokens_read(config.block_size, max_windows))
    return embed_sequences(params, config, seqs, bidirectional, batch_size, max_windows, on_batch)


def encode_texts(tokenizer, texts, keep, on_encoded=None):
    """The token ids of each text, no more than its first keep + 1: the windows read `keep`
    (`most_tokens_read`) and the one more tells `make_windows` that the text is cut, so a line of
    a million tokens keeps no more than that (the windows and the vectors are the same).

    A text is encoded a piece at a time (`data.encode_in_pieces`: the same ids as a whole), so
    on_encoded(characters encoded), if given, is called about every PIECE_CHARACTERS characters
    and at the end, whether the file is one huge line or millions of short ones."""
    seqs, done, shown = [], 0, 0
    for number, text in enumerate(texts, 1):
        if not text:
            raise TinyLLMError(f"text {number} is empty: there is nothing to embed")
        ids = []
        try:
            for piece_ids, characters in encode_in_pieces(tokenizer, text, PIECE_CHARACTERS):
                ids += piece_ids[:keep + 1 - len(ids)]
                done += characters
                if on_encoded and done - shown >= PIECE_CHARACTERS:
                    on_encoded(done)
                    shown = done
        except TinyLLMError as err:
            raise TinyLLMError(f"text {number}: {err}") from None
        seqs.append(ids)
    if on_encoded:
        on_encoded(done)
    return seqs


def embed_sequences(params, config, seqs, bidirectional, batch_size=32, max_windows=MAX_WINDOWS,
                    on_batch=None):
    """One vector per token list: (N, C) float32, and the number of lists cut after max_windows;
    on_batch(lists done), if given, after each batch.

    A list that occurs more than once (a repeated line) is embedded once, so its copies get the
    same vector bit for bit and tie in `nearest`, which keeps them in line order. The distinct
    lists go through longest first (`Windows.longest_first`), as in classification; the rows
    come back in the lists' own order."""
    row_of = {}  # token tuple -> its row among the N' distinct lists
    rows = onp.asarray([row_of.setdefault(tuple(seq), len(row_of)) for seq in seqs])  # (N,)
    copies = onp.bincount(rows, minlength=len(row_of))  # (N',) how often each list occurs
    windows, _, _ = make_windows(list(row_of), config.block_size, max_windows)
    vectors = onp.zeros((windows.n_texts, config.n_embd), onp.float32)  # (N', C)
    longest_first = windows.longest_first()
    done = 0
    for start in range(0, windows.n_texts, batch_size):
        texts_here = longest_first[start:start + batch_size]
        ids, valid, assign = windows.batch(texts_here)  # (W, T), (W, T), (B, W)
        vectors[texts_here] = assign @ window_vectors(params, config, ids, valid, bidirectional)
        check_finite_outputs(vectors[texts_here])
        done += int(copies[texts_here].sum())
        if on_batch:
            on_batch(done)
    most = most_tokens_read(config.block_size, max_windows)
    cut = sum(len(seq) > most for seq in seqs)  # past the last window: as make_windows counts
    return vectors[rows], cut  # (N', C) -> (N, C)


def cosine_similarity(vectors, query):
    """Cosine of each row of vectors (N, C) with query (C,) -> (N,); a zero vector scores 0."""
    norms = onp.linalg.norm(vectors, axis=1) * onp.linalg.norm(query)  # (N,)
    return (vectors @ query) / onp.where(norms > 0, norms, 1.0)


def nearest(vectors, query, k):
    """Indices of the k rows of vectors most similar to query (cosine), best first, and scores."""
    scores = cosine_similarity(vectors, query)
    order = onp.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def nearest_neighbour_agreement(vectors, labels):
    """The share of texts whose nearest other text (cosine) has the same label, and the rate a
    random other text would have: sum over labels of n_l (n_l - 1) / (N (N - 1))."""
    unit = vectors / onp.maximum(onp.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T  # (N, N)
    onp.fill_diagonal(sims, -onp.inf)  # a text is not its own neighbour
    labels = onp.asarray(labels)
    same = float((labels[sims.argmax(axis=1)] == labels).mean())
    n = len(labels)
    counts = onp.unique(labels, return_counts=True)[1]
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return same, chance


def read_lines(path, flag="--data", command="embed"):
    """The lines of a UTF-8 text file (a byte-order mark dropped), one text each; an empty line
    is an error naming it, but for blank lines at the end, which editors leave and which are
    dropped (line i is still the file's line i). UTF-16 or binary bytes are refused as every
    text reader refuses them. `flag` and `command` name the option and the command in errors."""
    if not os.path.exists(path):
        raise TinyLLMError(f"{flag} {path!r} not found")
    raw = read_bounded(path, MAX_LINES_BYTES, "data file")
    check_not_binary(raw, path)
    text = decode_utf8(raw, path)
    lines = split_lines(text)  # so that vector i is line i as an editor counts them
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise TinyLLMError(f"{path}:{number}: empty line ({command} reads one text per line)")
    if not lines:
        raise TinyLLMError(f"{flag} {path!r} has no lines")
    return lines


def save_vectors(path, vectors):
    """Write (N, C) float32 vectors as a .npy file, atomically (numpy.load(path) reads it back,
    no pickle needed; row i is line i of the data)."""
    buffer = io.BytesIO()
    onp.save(buffer, onp.asarray(vectors, dtype=onp.float32), allow_pickle=False)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        raise TinyLLMError(f"cannot write --out {path!r}: {err.strerror}") from None
