"""Pairs of texts for the encoder-decoder: file readers, the embedded default task, batches.

A PAIRS file is either
- TSV: one pair per line, `source<TAB>target`, split on the FIRST tab only (a target may hold
  tabs; quotes are ordinary characters: no csv module, which would strip or pair them), or
- JSONL (a name ending in .jsonl or .json): one object per line, {"source": "...", "target": "..."}.
Blank lines are skipped, and so is a TSV file's first line if it is the header `source<TAB>target`
(in any case). A line without a tab, an empty side, or bad JSON is an error that names
the file and line.

Held-out pairs: every 10th pair (lines 10, 20, ... of the pairs read) is held out for validation
and scoring, so a file sorted by topic still gives a held-out set from all of it.

Batches: a batch is a tuple of arrays with the batch first, padded to the split's fixed lengths
(S for sources, T for targets), so any two batches of a split can be stacked:
    src (B, S) int32, src_valid (B, S) float32 (1 real, 0 padding),
    tgt_in (B, T) int32 = <bos> y1 .. yn <pad>..., tgt_out (B, T) int32 = y1 .. yn <eos> <pad>...,
    tgt_mask (B, T) float32 (1 where tgt_out counts in the loss).
"""

import calendar
import json
import os
from dataclasses import dataclass

import numpy as onp

from .data import read_text_file
from .errors import RecordErrors, TinyLLMError
from .fileio import split_lines

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SEQ2SEQ_SPECIAL_TOKENS = (PAD, BOS, EOS)
HELD_OUT_EVERY = 10  # every 10th pair is held out


@dataclass(frozen=True)
class Pair:
    """A source text, its target text, and where it came from (for error messages)."""

    source: str
    target: str
    where: str  # "FILE line N" or "dates task #N"


# ----------------------------------------------------------------------------- reading files


def read_pairs(path, min_pairs=1, allow_pipe=True):
    """Read a TSV or JSONL PAIRS file (see the module docstring) -> list of Pair.

    allow_pipe=False reads only a regular file: for a path stored in a run directory.
    """
    return parse_pairs(read_text_file(path, allow_pipe=allow_pipe), path, min_pairs)


def parse_pairs(text, path, min_pairs=1):
    """The pairs of the text of the PAIRS file `path` (its name tells TSV from JSONL).

    A byte-order mark (Windows editors write one) is dropped: it is no part of the first source.
    """
    text = text.removeprefix("\ufeff")
    jsonl = path.lower().endswith((".jsonl", ".json"))
    pairs, errors, first = [], RecordErrors(), True
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if not jsonl and first and line.strip().casefold() == "source\ttarget":
            first = False
            continue  # a header row, as a spreadsheet exports one: not a pair to learn
        if jsonl and first and line.lstrip().startswith("["):
            raise TinyLLMError(f"{where}: a JSON array; a PAIRS file in JSON holds one object"
                               " {\"source\": ..., \"target\": ...} per line (JSONL)")
        first = False
        with errors.gathered():  # a bad line is reported with the others, at the end
            pairs.append(_pair(line, where, jsonl))
    errors.raise_any()
    if len(pairs) < min_pairs:
        raise TinyLLMError(f"{path}: has {len(pairs)} pairs, need at least {min_pairs}")
    return pairs


def _pair(line, where, jsonl):
    """The Pair one line of a PAIRS file holds, or a one-line error naming the line."""
    source, target = _parse_json_line(line, where) if jsonl else _parse_tsv_line(line, where)
    if not source.strip() or not target.strip():
        side = "source" if not source.strip() else "target"
        raise TinyLLMError(f"{where}: the {side} is empty")
    return Pair(source, target, where)


def _parse_tsv_line(line, where):
    """'a<TAB>b<TAB>c' -> ('a', 'b<TAB>c'): split on the first tab only."""
    if "\t" not in line:
        if line.lstrip().startswith("{"):  # JSONL under another name: the name tells them apart
            hint = "; a JSONL file must be named .jsonl or .json to be read as JSONL"
        else:
            hint = "; a PAIRS file is TSV or JSONL, not CSV" if "," in line else ""
        raise TinyLLMError(f"{where}: no tab between source and target (expected source<TAB>target"
                           f"{hint})")
    source, target = line.split("\t", 1)
    return source, target


def _parse_json_line(line, where):
    """'{"source": "a", "target": "b"}' -> ('a', 'b'), or a one-line error naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        hint = "; a TSV file must not be named .jsonl or .json" if "\t" in line else ""
        raise TinyLLMError(f"{where}: not valid JSON ({err.msg}{hint})") from None
    except RecursionError:  # [[[[...]]]] nested deeper than Python's stack
        raise TinyLLMError(f"{where}: JSON nested too deeply to be a pair") from None
    if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("source", "target")):
        raise TinyLLMError(f"{where}: expected an object with string fields \"source\" and \"target\"")
    for key in ("source", "target"):
        if not _utf8_encodable(record[key]):
            raise TinyLLMError(f"{where}: the {key} holds an unpaired surrogate escape (such as"
                               " \\ud800), which is no character: UTF-8 text cannot hold it")
    return record["source"], record["target"]


def _utf8_encodable(text):
    """False for a string holding a lone surrogate, as json.loads makes of "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------- the embedded task


def _date_formats():
    """Ways to write a date (year, month, day) as text; the target is always ISO 8601."""
    month, abbr = calendar.month_name, calendar.month_abbr  # English names from the stdlib tables
    return (
        lambda y, m, d: f"{d} {month[m]} {y}",  # 14 July 2023
        lambda y, m, d: f"{month[m]} {d}, {y}",  # July 14, 2023
        lambda y, m, d: f"{d} {abbr[m]} {y}",  # 14 Jul 2023
        lambda y, m, d: f"{abbr[m]} {d}, {y}",  # Jul 14, 2023
        lambda y, m, d: f"{d:02d}/{m:02d}/{y}",  # 14/07/2023 (day first)
        lambda y, m, d: f"{y}.{m:02d}.{d:02d}",  # 2023.07.14
    )


def dates_task(seed=0, n_train=20000, n_held_out=1000, first_year=1900, last_year=2099):
    """The embedded default task: dates written in six human formats -> ISO 8601 (YYYY-MM-DD).

    Example pairs: ("July 14, 2023", "2023-07-14"), ("03/02/1961", "1961-02-03").
    The model must read month names, reorder fields and copy digits: a small translation task
    with one right answer, so exact match measures it. Held-out pairs use dates that never
    occur in training (any format), so the score is not memorisation.
    Returns (train pairs, held-out pairs); the same seed gives the same pairs.
    """
    rng = onp.random.default_rng(seed)
    dates = [(y, m, d) for y in range(first_year, last_year + 1) for m in range(1, 13)
             for d in range(1, calendar.monthrange(y, m)[1] + 1)]
    order = rng.permutation(len(dates))
    held = [dates[i] for i in order[:n_held_out]]
    train = [dates[i] for i in order[n_held_out:]]
    formats = _date_formats()

    def render(picked, name):
        styles = rng.integers(0, len(formats), size=len(picked))
        return [Pair(formats[s](*ymd), f"{ymd[0]:04d}-{ymd[1]:02d}-{ymd[2]:02d}", f"{name} #{i}")
                for i, (ymd, s) in enumerate(zip(picked, styles))]

    train_idx = rng.integers(0, len(train), size=n_train)
    return render([train[i] for i in train_idx], "dates task"), render(held, "dates held-out")


EMBEDDED_TASKS = {"dates": dates_task}
DEFAULT_TASK = "dates"


def load_pairs(name_or_path):
    """(train pairs, held-out pairs) from a PAIRS file, or an embedded task by name."""
    name_or_path = name_or_path or DEFAULT_TASK
    if not os.path.exists(name_or_path) and name_or_path in EMBEDDED_TASKS:
        return EMBEDDED_TASKS[name_or_path]()
    if not os.path.exists(name_or_path):
        raise TinyLLMError(f"pairs file {name_or_path!r} not found (embedded tasks: "
                           f"{', '.join(sorted(EMBEDDED_TASKS))})")
    return split_pairs(read_pairs(name_or_path, min_pairs=2))  # one to train on, one to hold out


def split_pairs(pairs, every=HELD_OUT_EVERY):
    """Hold out every `every`-th pair: [p1..p10] -> ([p1..p9], [p10])."""
    held = [p for i, p in enumerate(pairs, start=1) if i % every == 0]
    train = [p for i, p in enumerate(pairs, start=1) if i % every != 0]
    if not held:  # fewer than `every` pairs: hold out the last one
        return pairs[:-1], pairs[-1:]
    return train, held


def repeated_pairs(train, held):
    """How many held-out pairs are also training pairs (a file with duplicate lines), whose
    scores measure memory, not translation. Example: train [a->b, c->d], held [a->b] -> 1."""
    learned = {(p.source, p.target) for p in train}
    return sum((p.source, p.target) in learned for p in held)


def pairs_text(pairs):
    """All the text of the pairs, for training a tokenizer over both sides (and fingerprinting
    the data). Nothing is added between them, so no character enters the vocabulary that the
    pairs do not hold (a newline in the vocabulary could break a one-line-per-output listing)."""
    return "".join(p.source + p.target for p in pairs)


# ----------------------------------------------------------------------------- ids and batches


def encode_source(tokenizer, text, block_size, where, side="source"):
    """Source (or target) text -> ids, or a one-line error naming `where` if it is longer than
    block_size tokens or has a character the tokenizer does not know."""
    try:
        ids = tokenizer.encode(text)
    except TinyLLMError as err:
        raise TinyLLMError(f"{where}: {err}") from None
    if len(ids) > block_size:
        raise TinyLLMError(f"{where}: the {side} has {len(ids)} tokens, more than the context of"
                           f" {block_size} (--block-size)")
    return ids


def encoding_problem(tokenizer, text, block_size, where, side="source"):
    """Why `text` cannot be read as `side` ids within block_size tokens (encode_source's one-line
    reason, naming `where`), or None if it can."""
    try:
        encode_source(tokenizer, text, block_size, where, side)
    except TinyLLMError as err:
        return str(err)
    return None


def readable_pairs(tokenizer, pairs, block_size):
    """Pairs whose source a model can read, and the reason for each one whose source it cannot
    (a character its tokenizer never saw, or more tokens than its context) -> (pairs, reasons).

    Scoring a file leaves those pairs out and counts them, so one odd line does not stop the
    scoring of thousands. Example: a model that knows 'a' to 'z', pairs [("ab", ...) on line 1,
    ("aé", ...) on line 2] -> ([the line 1 pair], ["FILE line 2: text has character 'é' ..."]).
    """
    readable, reasons = [], []
    for pair in pairs:
        reason = encoding_problem(tokenizer, pair.source, block_size, pair.where)
        if reason:
            reasons.append(reason)
        else:
            readable.append(pair)
    return readable, reasons


def encode_pairs(tokenizer, pairs, block_size):
    """Pairs -> (source ids list, target ids list); a target needs room for <bos>/<eos>.
    Every pair too long for the context is counted in the one error (RecordErrors)."""
    sources, targets, errors = [], [], RecordErrors()
    for pair in pairs:
        with errors.gathered():
            source = encode_source(tokenizer, pair.source, block_size, pair.where)
            # the target shares the context with its <bos> (decoder input) or <eos> (output)
            target = encode_source(tokenizer, pair.target, block_size - 1, pair.where, "target")
            sources.append(source)
            targets.append(target)
    errors.raise_any()
    return sources, targets


def pad_rows(rows, length, pad_id):
    """Lists of ids -> (N, length) int32, right-padded. Example: [[5], [6, 7]], 3, 0 ->
    [[5, 0, 0], [6, 7, 0]]."""
    out = onp.full((len(rows), length), pad_id, dtype=onp.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def make_arrays(sources, targets, special, src_len=None, tgt_len=None):
    """Encoded pairs -> the five padded arrays of a batch (see the module docstring), for all N.

    `special` maps "<pad>", "<bos>", "<eos>" to ids. Example with pad 0, bos 1, eos 2, a pair
    ([5, 6], [7]): src [[5, 6]], src_valid [[1, 1]], tgt_in [[1, 7]], tgt_out [[7, 2]],
    tgt_mask [[1, 1]].
    """
    pad, bos, eos = special[PAD], special[BOS], special[EOS]
    src_len = src_len or max(len(s) for s in sources)
    tgt_len = tgt_len or max(len(t) for t in targets) + 1
    src = pad_rows(sources, src_len, pad)  # (N, S)
    src_valid = (onp.arange(src_len)[None, :] < onp.array([len(s) for s in sources])[:, None])
    tgt_in = pad_rows([[bos] + t for t in targets], tgt_len, pad)  # (N, T)
    tgt_out = pad_rows([t + [eos] for t in targets], tgt_len, pad)  # (N, T)
    lengths = onp.array([len(t) + 1 for t in targets])
    tgt_mask = onp.arange(tgt_len)[None, :] < lengths[:, None]  # (N, T)
    return (src, src_valid.astype(onp.float32), tgt_in, tgt_out, tgt_mask.astype(onp.float32))


def get_pair_batch(arrays, batch_size, rng):
    """A random batch (with replacement) of rows from the padded arrays of a split."""
    rows = rng.integers(0, arrays[0].shape[0], size=batch_size)  # (B,)
    return tuple(a[rows] for a in arrays)
