"""Fine-tuning a pretrained GPT: a classification head, pooling, freezing, the instruction
template, loss masking, and the metrics both kinds of fine-tuning report.

Shape letters: B batch, T time, C channels, V vocabulary, K classes.

Classification. The LM head (C, V) is replaced by a classification head (C, K). The hidden
states (B, T, C) are pooled into one vector per sequence:
  - "last": the state at the last real (non-padding) token. In a causal decoder it is the only
    position that has read the whole text, and since padding comes after it, padding can never
    change it (attention only looks back).
  - "mean": the average over real tokens (padding gets weight 0).
  - "max": the largest value of each channel over the real tokens (max-over-time pooling, as in
    Kim's 2014 convolutional text classifier): a channel that fires on one cue anywhere in the
    text passes it on undiluted by the rest, where a mean divides it by the text's length.
  - "meanmax": the average of "mean" and "max": the max's single cues and the mean's view of the
    whole text, in one C-vector (ULMFiT's concat pooling, Howard and Ruder 2018, puts the last
    state, the max and the mean side by side instead, a 3C-vector).
  - "first": the state at the first token; meaningful for the bidirectional encoder only.
With `arch="encoder"` the same parameter tree runs as a bidirectional encoder
(models.bidirectional_hidden), padding hidden by an attention mask. DEFAULT_POOLING is "last" for
the decoder and "meanmax" for the encoder (on 720 YouTube comments it beat "mean" and "max" from
an MLM base; see docs/experiments.md).

Texts longer than the context are read whole, as overlapping windows of block_size tokens whose
starts are WINDOW_STRIDE * block_size apart (the last window ends at the text's last token). Each
window is pooled as above into one vector, and a text's vector is the mean of its windows'
vectors, so a cue anywhere in the text reaches the head. A text that fits has one window, and
its vector is exactly what the single-window path gives. At most `max_windows` windows are read
per text; the rest of a longer text is cut (and counted).

Instruction tuning. Each record becomes prompt + response + <|endoftext|> with the template
below (a simplified Alpaca layout: Alpaca's preamble and "###" headers cost ~100 tokens, more
than a tiny model's whole context). The loss counts the response tokens and the end-of-text
token only; the prompt is context, not something to learn to write.
"""

from dataclasses import dataclass, fields

import autograd.numpy as np
import numpy as onp

from .config import GPTConfig
from .errors import TinyLLMError
from .lora import apply_lora, init_lora
from .models import INIT_STD, bidirectional_hidden, check_finite_outputs, gpt_hidden, init_gpt
from .ops import cross_entropy, linear, softmax
from .tree import flatten, unflatten

POOLINGS = ("last", "mean", "max", "meanmax", "first")
WINDOW_STRIDE = 0.5  # windows of one text start half a context apart: every token is read twice,
# once in the second half of a window (with at least half a context before it), except near the ends
GROUP_OVERHEAD = 64  # tokens: the fixed cost of one more forward and backward pass (Python and
# op calls), as rows x length; on YouTube comments 16 and 64 gave the fastest steps, 0 and 256 slower
ARCHS = ("decoder", "encoder")
DEFAULT_POOLING = {"decoder": "last", "encoder": "meanmax"}  # by arch, when none is asked for

PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse: "
PROMPT_TEMPLATE_NO_INPUT = "Instruction: {instruction}\nResponse: "


# ----------------------------------------------------------------------------- config and init


@dataclass(frozen=True)
class ClassifierConfig(GPTConfig):
    """A GPT's shape (every GPTConfig field) plus what the classifier adds: classes, pooling,
    architecture, LoRA."""

    n_classes: int = 2  # K: the labels themselves are stored in config.json
    pooling: str = "last"  # how (B, T, C) becomes (B, C): see the module docstring
    arch: str = "decoder"  # "decoder": causal, as pretrained; "encoder": bidirectional
    lora_rank: int = 0  # 0: no adapters; otherwise see tinyllm/lora.py
    lora_alpha: float = 0.0

    def gpt(self):
        """The underlying GPTConfig."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def validate(self):
        """Raise TinyLLMError for a config that cannot make a classifier; return self."""
        super().validate()
        if self.n_classes < 2:
            raise TinyLLMError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        if self.pooling not in POOLINGS or self.arch not in ARCHS:
            raise TinyLLMError(f"--pooling must be one of {POOLINGS} and --arch one of {ARCHS}")
        if self.pooling == "first" and self.arch == "decoder":
            raise TinyLLMError("--pooling first needs --arch encoder: in a causal decoder the first"
                               " token has seen nothing else")
        return self


def init_head(rng, c, k, dtype="float32"):
    """A fresh classification head (C, K) with zero bias."""
    return {"w": (rng.standard_normal((c, k)) * INIT_STD).astype(dtype), "b": onp.zeros(k, dtype)}


def init_classifier(config, rng, dtype="float32"):
    """Fresh classifier parameters: the GPT tree without its LM head, plus "cls_head"."""
    params = init_gpt(config.gpt(), rng, dtype)
    params.pop("lm_head", None)
    params["cls_head"] = init_head(rng, config.n_embd, config.n_classes, dtype)
    if config.lora_rank:
        params["lora"] = init_lora(params, config.lora_rank, rng)
    return params


def classifier_from_gpt(gpt_params, config, rng):
    """A classifier that starts from pretrained GPT parameters: the LM head is replaced."""
    params = {k: v for k, v in gpt_params.items() if k != "lm_head"}
    params["cls_head"] = init_head(rng, config.n_embd, config.n_classes,
                                   gpt_params["wte"].dtype)
    if config.lora_rank:
        params["lora"] = init_lora(params, config.lora_rank, rng)
    return params


# ----------------------------------------------------------------------------- forward


def pool(hidden, valid, how):
    """Hidden states (B, T, C) and 0/1 `valid` (B, T) -> one vector per sequence (B, C).

    Example (T = 3, C = 1): hidden [[[1], [2], [9]]], valid [[1, 1, 0]]:
    last -> [[2]], mean -> [[1.5]], max -> [[2]], meanmax -> [[1.75]], first -> [[1]]. Padding
    (the 9) never counts.
    """
    if how == "meanmax":
        return 0.5 * (pool(hidden, valid, "mean") + pool(hidden, valid, "max"))  # (B, C)
    valid = onp.asarray(valid, dtype=hidden.dtype)  # (B, T)
    if how == "max":  # padding becomes -inf, never the maximum (every text has a real token)
        real = np.where(valid[:, :, None] > 0, hidden, -np.inf)  # (B, T, C)
        return np.max(real, axis=1)  # (B, T, C) -> (B, C)
    if how == "mean":
        weights = valid / onp.maximum(valid.sum(axis=1, keepdims=True), 1.0)  # (B, T)
    elif how == "last":
        last = valid.sum(axis=1).astype(int) - 1  # (B,) index of the last real token
        weights = (onp.arange(valid.shape[1])[None, :] == last[:, None]).astype(hidden.dtype)
    else:
        weights = onp.zeros_like(valid)
        weights[:, 0] = 1.0
    # A weighted sum, not fancy indexing: its gradient is a plain product, cheap in autograd.
    return np.sum(hidden * weights[:, :, None], axis=1)  # (B, T, C) * (B, T, 1) -> (B, C)


def classifier_logits(params, ids, valid, config, rng=None, assign=None):
    """Class logits: ids (W, T) and valid (W, T) -> (B, K).

    Without `assign` each row is one text (W = B). With it, rows are windows and `assign` (B, W)
    averages each text's window vectors (row b holds 1/n_b at the n_b windows of text b).
    """
    if "lora" in params:
        params = apply_lora(params, config.lora_alpha / config.lora_rank)
    gpt_config = config.gpt()
    if config.arch == "encoder":
        hidden = bidirectional_hidden(params, ids, gpt_config, valid=valid, rng=rng)  # (B, T, C)
    else:
        hidden = gpt_hidden(params, ids, gpt_config, rng)  # (B, T, C)
    vectors = pool(hidden, valid, config.pooling)  # (W, T, C) -> (W, C)
    if assign is not None:
        vectors = assign @ vectors  # (B, W) @ (W, C) -> (B, C): the mean over each text's windows
    return linear(vectors, **params["cls_head"])  # (B, C) -> (B, K)


def classifier_loss(params, ids, valid, labels, config, rng=None, assign=None):
    """Mean cross-entropy of the true classes: (W, T), (W, T), (B,) [, (B, W)] -> scalar."""
    return cross_entropy(classifier_logits(params, ids, valid, config, rng, assign), labels)


def predict_proba(params, ids, valid, config, batch_size=64):
    """Class probabilities (N, K) for many one-window sequences, in batches, without gradients."""
    windows = Windows(ids, valid, onp.arange(len(ids)), onp.ones(len(ids), onp.int64))
    return predict_windows(params, windows, config, batch_size)


def predict_windows(params, windows, config, batch_size=64, on_batch=None):
    """Class probabilities (N, K) for N windowed texts (see `Windows`), `batch_size` texts at a
    time, without gradients; on_batch(texts done), if given, after each batch.

    The texts go through longest first (`Windows.longest_first`: scoring 1,500 comments was 6.6
    times faster so); the rows come back in the texts' own order."""
    probs = onp.zeros((windows.n_texts, config.n_classes), "float32")
    longest_first = windows.longest_first()
    for start in range(0, windows.n_texts, batch_size):
        texts = longest_first[start:start + batch_size]
        ids, valid, assign = windows.batch(texts)
        logits = onp.asarray(classifier_logits(params, ids, valid, config, assign=assign))
        probs[texts] = softmax(logits, axis=1)  # (B, K)
        check_finite_outputs(probs[texts])
        if on_batch:
            on_batch(start + len(texts))
    return probs


# ----------------------------------------------------------------------------- freezing


def trainable_paths(params, freeze, n_layer):
    """Dotted parameter paths that train under `freeze`.

        "none"       everything
        "all"        the classification head only (the body is a fixed feature extractor)
        "all-but-N"  the last N blocks, the final layer norm and the head
    With LoRA adapters in the tree, the adapters and the head train and nothing else.
    """
    paths = list(flatten(params))
    if "lora" in params:
        return [p for p in paths if p.startswith(("lora.", "cls_head."))]
    if freeze == "none":
        return paths
    if freeze == "all":
        keep = ("cls_head.",)
    elif freeze.startswith("all-but-") and freeze[8:].isdigit():
        n = int(freeze[8:])
        if n > n_layer:
            blocks = "1 block" if n_layer == 1 else f"{n_layer} blocks"
            raise TinyLLMError(f"--freeze {freeze}: the model has {blocks}, so N is at"
                               f" most {n_layer} (all-but-{n_layer} keeps only the embeddings fixed)")
        keep = ("cls_head.", "ln_f.") + tuple(f"h.{i}." for i in range(n_layer - n, n_layer))
    else:
        raise TinyLLMError(f"--freeze must be none, all or all-but-N, got {freeze!r}")
    return [p for p in paths if p.startswith(keep)]


def split_params(params, paths):
    """Split a tree into (trainable tree, frozen flat dict) by dotted `paths`."""
    flat = flatten(params)
    wanted = set(paths)
    return (unflatten({k: v for k, v in flat.items() if k in wanted}),
            {k: v for k, v in flat.items() if k not in wanted})


def merge_params(trainable, frozen):
    """The inverse of split_params: one whole tree."""
    return unflatten({**frozen, **flatten(trainable)})


# ----------------------------------------------------------------------------- batches


def pad_batch(sequences, length, pad_id=0):
    """Token lists -> ids (N, T) int32 and valid (N, T) float32, padded on the right.

    Example: [[5, 6], [7]], length 3 -> ids [[5, 6, 0], [7, 0, 0]], valid [[1, 1, 0], [1, 0, 0]].
    Sequences longer than `length` keep their first `length` tokens.
    """
    ids = onp.full((len(sequences), length), pad_id, dtype=onp.int32)
    valid = onp.zeros((len(sequences), length), dtype=onp.float32)
    for row, seq in enumerate(sequences):
        seq = seq[:length]
        ids[row, :len(seq)] = seq
        valid[row, :len(seq)] = 1.0
    return ids, valid


def length_groups(lengths, overhead=GROUP_OVERHEAD):
    """The rows of one batch split into groups of similar length: a list of index arrays into
    `lengths`, each sorted shortest first, the groups in order of length.

    Each group is padded only to its own longest row, so a batch of real messages, most short
    and a few long, no longer pads every row to its longest: on YouTube comments a random batch
    of 16 has 52 real tokens a row on average and 206 in its longest. A group costs its
    rows times its longest length, plus `overhead` tokens for the pass itself (the Python and
    the op calls of one more forward and backward); the split of least total cost is found by
    dynamic programming over the sorted rows. The batch stays the same set of rows: the loss
    of the groups, weighted by their share of the batch, is the batch's loss.

    Example: lengths [3, 100, 4, 98], overhead 10 -> [[0, 2], [3, 1]]: 10 + 2 * 4 and
    10 + 2 * 100 (228 tokens), against 10 + 4 * 100 (410) as one group.
    """
    order = onp.argsort(lengths, kind="stable")
    sorted_lengths = onp.asarray(lengths)[order]
    n = len(order)
    best = [0.0] + [onp.inf] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)  # cut[j]: where the last group of that best split starts
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + overhead + (j - i) * sorted_lengths[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def window_starts(n, block_size, stride):
    """Start positions of the windows of `block_size` tokens that cover n tokens, `stride` apart,
    the last one ending exactly at the end.

    Example: block 4, stride 2: n 10 -> [0, 2, 4, 6]; n 9 -> [0, 2, 4, 5]; n 3 -> [0].
    """
    if n <= block_size:
        return [0]
    starts = list(range(0, n - block_size + 1, stride))
    if starts[-1] != n - block_size:
        starts.append(n - block_size)
    return starts


@dataclass(frozen=True)
class Windows:
    """Texts as windows: the windows of text i are rows first[i] .. first[i] + count[i] - 1.

    ids (W, T) int32 and valid (W, T) float32 are padded on the right to a common length T.
    """

    ids: onp.ndarray
    valid: onp.ndarray
    first: onp.ndarray  # (N,) first window row of each text
    count: onp.ndarray  # (N,) number of windows of each text

    @property
    def n_texts(self):
        return len(self.first)

    def longest_first(self):
        """The text indices, longest first (a text's first window is its longest). Inference
        takes texts in this order: a batch is cut to its longest window, so one long text among
        short ones would make every row pay for its length; sorted, each batch pads little."""
        return onp.argsort(-self.lengths(onp.arange(self.n_texts)), kind="stable")

    def lengths(self, texts):
        """The real tokens of the longest window of each text at indices `texts` (its first)."""
        return self.valid[self.first[texts]].sum(axis=1).astype(onp.int64)

    def head(self, n):
        """The first n texts (a training split's records, without the case copies after them)."""
        return Windows(self.ids, self.valid, self.first[:n], self.count[:n])

    def batch(self, texts):
        """(ids, valid, assign) for the texts at indices `texts` (B,): their windows stacked
        (W_b, T'), cut to the longest real window among them, and assign (B, W_b), the averaging
        matrix that classifier_logits takes."""
        rows = onp.concatenate([onp.arange(self.first[t], self.first[t] + self.count[t])
                                for t in texts])  # (W_b,)
        owner = onp.repeat(onp.arange(len(texts)), self.count[texts])  # (W_b,) text of each row
        assign = onp.zeros((len(texts), len(rows)), dtype=onp.float32)  # (B, W_b)
        assign[owner, onp.arange(len(rows))] = 1.0 / self.count[texts][owner]
        width = max(1, int(self.valid[rows].sum(axis=1).max()))  # padding past it changes nothing
        return self.ids[rows, :width], self.valid[rows, :width], assign


def make_windows(sequences, block_size, max_windows, stride_fraction=WINDOW_STRIDE):
    """Token lists -> (Windows, number of texts read as several windows, number cut short).

    Example: block 4, stride 2, max_windows 3: [[1..10]] -> windows [1..4], [3..6], [5..8];
    the text is counted as windowed and as cut (tokens 9 and 10 are beyond the third window).
    """
    stride = max(1, int(block_size * stride_fraction))
    rows, first, count, windowed, cut = [], [], [], 0, 0
    for seq in sequences:
        starts = window_starts(len(seq), block_size, stride)
        if len(starts) > max_windows:
            starts, cut = starts[:max_windows], cut + 1
        windowed += len(starts) > 1
        first.append(len(rows))
        count.append(len(starts))
        rows += [seq[s:s + block_size] for s in starts]
    ids, valid = pad_batch(rows, min(block_size, max(len(r) for r in rows)))
    return (Windows(ids, valid, onp.asarray(first, onp.int64), onp.asarray(count, onp.int64)),
            windowed, cut)


# ----------------------------------------------------------------------------- instructions


def format_prompt(record):
    """The prompt part of a record, ending where the response starts.

    Example: {"instruction": "reverse", "input": "abc"} ->
    "Instruction: reverse\\nInput: abc\\nResponse: "; without input the Input line is left out.
    """
    template = PROMPT_TEMPLATE if record.get("input") else PROMPT_TEMPLATE_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def fit_prompt(prompt_ids, response_ids, length):
    """The prompt, cut from the front if need be, so that prompt + response + eot fits a row of
    `length` positions (x and y are one token stream shifted by one, so the stream may hold
    length + 1 tokens). None if even one prompt token and the response do not fit.

    The end of the prompt is kept: it holds "Response: ", the cue to start answering, and the
    part of the input nearest the answer. Example: prompt [1, 2, 3, 4], response [5], length 4
    -> [2, 3, 4] (stream 2 3 4 5 eot).
    """
    room = length - len(response_ids)  # (length + 1) - len(response) - 1 for the eot
    if room < 1:
        return None
    return list(prompt_ids)[-room:]


def instruction_example(prompt_ids, response_ids, eot, length, include_prompt=False):
    """One training row: inputs x, targets y and loss mask m, each (length,).

    The token stream is prompt + response + [eot]; y is x shifted left by one. The mask is 1
    where the target is a response token or the eot (or any token with include_prompt), and 0 on
    the prompt and on padding. Example: prompt [1, 2], response [3], eot 9, length 4 ->
    x [1, 2, 3, 0], y [2, 3, 9, 0], m [0, 1, 1, 0] (the first target, 2, is part of the prompt).
    """
    tokens = list(prompt_ids) + list(response_ids) + [eot]
    if len(tokens) - 1 > length:
        return None  # does not fit the context (fit_prompt cuts a prompt so that it does)
    x = onp.zeros(length, onp.int32)
    y = onp.zeros(length, onp.int32)
    m = onp.zeros(length, onp.float32)
    n = len(tokens) - 1
    x[:n], y[:n] = tokens[:-1], tokens[1:]
    first = 0 if include_prompt else len(prompt_ids) - 1  # target index of the first response token
    m[first:n] = 1.0
    return x, y, m


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(true, pred, k):
    """(K, K) counts: row = true class, column = predicted class.

    Example: true [0, 0, 1], pred [0, 1, 1], k 2 -> [[1, 1], [0, 1]].
    """
    matrix = onp.zeros((k, k), dtype=onp.int64)
    onp.add.at(matrix, (onp.asarray(true, int), onp.asarray(pred, int)), 1)
    return matrix


def precision_recall(matrix):
    """Per-class (precision, recall) lists from a confusion matrix; 0.0 where undefined.

    Example: [[1, 1], [0, 1]] -> precision [1.0, 0.5], recall [0.5, 1.0].
    """
    matrix = onp.asarray(matrix, dtype=float)
    hits = onp.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = [float(h / p) if p else 0.0 for h, p in zip(hits, predicted)]
    recall = [float(h / a) if a else 0.0 for h, a in zip(hits, actual)]
    return precision, recall


def token_f1(response, reference):
    """F1 of the whitespace tokens two strings share (SQuAD's answer F1, without normalisation).

    Example: "a b c" vs "a b d": 2 shared of 3 and 3 -> precision = recall = 2/3, F1 = 0.667.
    """
    got, want = response.split(), reference.split()
    if not got or not want:
        return float(got == want)
    counts = {}
    for token in want:
        counts[token] = counts.get(token, 0) + 1
    shared = 0
    for token in got:
        if counts.get(token, 0) > 0:
            counts[token] -= 1
            shared += 1
    if shared == 0:
        return 0.0
    precision, recall = shared / len(got), shared / len(want)
    return 2 * precision * recall / (precision + recall)
