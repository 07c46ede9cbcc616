"""Tokenizers: turn text into a list of integer ids and back.

A language model never sees characters; it sees ids from a fixed vocabulary. This module has two
ways to build that vocabulary from a training text:

* `CharTokenizer`: one id per distinct character of the training text. Simple and exact, but it
  cannot encode a character it never saw, and every character costs one position of context.
* `BPETokenizer`: byte-level byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation
  of Rare Words with Subword Units"; byte-level as in GPT-2, Radford et al. 2019). The base
  vocabulary is the 256 byte values, so any Unicode text can be encoded; training then adds one
  new id at a time by merging the most frequent adjacent pair of ids into a new one.

Both tokenizers can have *special tokens* (such as "<|endoftext|>"). They get the ids right after
the ordinary vocabulary. `encode` never produces them: text is always encoded literally, so a user
who types "<|endoftext|>" gets ordinary tokens and cannot forge a document boundary. Code that
needs one inserts it by id, `tok.special_tokens["<|endoftext|>"]`, and `decode` turns it back
into its string.

How BPE training works here
---------------------------
1. Pre-split the text into chunks with `SPLIT_PATTERN` (runs of letters with an optional leading
   space, runs of digits, runs of other symbols, whitespace, English contractions), and cut a
   chunk longer than `MAX_CHUNK_CHARACTERS` (1,024) into pieces of that length. Merges never
   cross a chunk boundary, so a token never glues the end of one word to the start of the next.
2. Count the distinct chunks. Natural text repeats words a lot, so 1 MB of text has only a few
   ten thousand distinct chunks; we merge over those, weighting each by its count.
3. Keep a table of pair counts and, for each pair, the places where it occurs. A merge then
   updates only the counts beside each place it merges (an incremental update), instead of
   recounting the whole text for each of the hundreds of merges, and a heap gives the most
   frequent pair. `learn_merges_reference` is the plain algorithm that does recount everything
   before each merge: read it first; a test shows the two learn the same merges.
4. Ties: when several pairs share the highest count, the pair with the smallest ids wins
   (compared as tuples, first id then second). So training is reproducible: the same text and
   settings always give the same merges, whatever order Python's dicts happen to be in.
5. If no pair is left to merge (a tiny text) training stops early, and the tokenizer has fewer
   ids than the `vocab_size` asked for. `tok.vocab_size` always gives the true size. A pair
   whose token would be longer than `MAX_TOKEN_BYTES` is never merged, so every tokenizer
   trained here loads back.

Encoding applies the learned merges to each chunk in the order they were learned, and remembers
the ids of each distinct chunk, so a word that appears a thousand times is encoded once.
`encode_chunk_reference` is the plain form: merge the lowest-ranked pair everywhere, rescan, repeat.

Cost: a chunk of n bytes costs about n log n to train on or to encode, however long it is. The
symbols sit in a linked list, so a merge touches only its neighbours, and a heap gives the next
pair to merge (`LinkedSymbols`, `encode_chunk`, `learn_merges`). The plain forms rescan a chunk
for every merge, n times the number of merges: that is fine for words, but one long run of
letters (a DNA sequence, English with its spaces stripped, a language written without spaces)
would be a single chunk, and 100 kB of it took half a minute to encode and minutes to train on.
Such a run is now cut into pieces of 1,024 characters anyway, which bounds the memory an
encoding takes (see `cut_long`); `benchmarks/bench_tokenizer.py` times both forms on longer
chunks, given to them directly.

File format
-----------
A tokenizer is saved as one indented UTF-8 JSON file that a person can read, written atomically
(the old file stays whole if a save is interrupted). Both kinds share the first keys:

    {"format": "tinyllm-tokenizer", "version": 1, "type": "char", ...}

A char tokenizer adds its characters in id order (id i is chars[i]) and its special tokens:

    {"format": "tinyllm-tokenizer", "version": 1, "type": "char",
     "chars": ["\\n", " ", "!", ...], "special_tokens": {"<|endoftext|>": 65}}

A BPE tokenizer adds the pre-split regex (Python `re` syntax; on load it must be one of the
package's own, `SPLIT_PATTERNS`, given by its text or its name), the merges in order (merge i joins
the pair [a, b] into id 256 + i), its special tokens, and "tokens": a readable rendering of each
merged token (tokens[i] is id 256 + i; bytes that are not whole UTF-8 characters are shown as
\\xNN). "tokens" is there for people only and is ignored on load.

    {"format": "tinyllm-tokenizer", "version": 1, "type": "bpe", "pattern": "...",
     "merges": [[32, 116], ...], "special_tokens": {"<|endoftext|>": 511},
     "tokens": [" t", ...]}

Special-token ids must follow the ordinary vocabulary without gaps. A run pretrained as a
masked language model (`tinyllm pretrain --objective mlm`) has one more special token,
`MASK_TOKEN` ("<|mask|>", after "<|endoftext|>"); it is an ordinary entry of "special_tokens", so
the file format is unchanged and files without it load as before. `load` checks all of this and
raises `TinyLLMError` naming the file for a missing file, broken JSON, a wrong "format", a
"version" newer than `FORMAT_VERSION`, a missing or ill-typed field, or a special-token name
holding a control or format character (`NOT_IN_SPECIAL_NAMES`). A tokenizer file is
untrusted data: only a regular file of at most `MAX_FILE_BYTES` is read, its regex cannot be
chosen by the file, and more than `MAX_VOCAB_SIZE` ids, merges that would build tokens longer
than `MAX_TOKEN_BYTES`, or more than `MAX_TABLE_BYTES` of tokens in all, are refused.
"""

import heapq
import numbers
import os
import re
import unicodedata
from collections import Counter, defaultdict

from tinyllm.errors import TinyLLMError
from tinyllm.fileio import atomic_write_json, open_regular, parse_json, read_fd

FORMAT_NAME = "tinyllm-tokenizer"
FORMAT_VERSION = 1  # bump when the file layout changes; `load` reads this version and older

# The pre-split regex, in stdlib `re` syntax (the GPT-2 pattern uses \p{L} from the `regex`
# package; `[^\W\d_]` is the stdlib way to say "a letter": a word character that is not a digit
# or an underscore). Alternatives are tried left to right; every character matches one of them,
# so the chunks always join back to the exact text.
SPLIT_PATTERN = "|".join([
    r"'(?:[sdmt]|ll|ve|re)",  # English contractions: 's 'd 'm 't 'll 've 're
    r" ?[^\W\d_]+",           # a run of letters, with the space before it
    r" ?\d+",                 # a run of digits, with the space before it
    r" ?(?:[^\s\w]|_)+",      # a run of other symbols (punctuation, _, emoji, ...)
    r"\s+(?!\S)",             # whitespace, leaving its last space to the word that follows
    r"\s+",                   # other whitespace, e.g. a lone newline right before a word
])

# The split patterns a tokenizer file may name (by name, or by the exact regex text).
SPLIT_PATTERNS = {"gpt2-stdlib": SPLIT_PATTERN}

# The token that stands for a hidden token in masked-language-model pretraining (tinyllm/mlm.py).
MASK_TOKEN = "<|mask|>"

N_BYTES = 256  # byte-level BPE: ids 0..255 are the raw byte values
MAX_FILE_BYTES = 64 << 20  # a 50k-token BPE file is about 2 MB
MAX_TOKEN_BYTES = 1 << 16  # the longest token a loaded file may build
MAX_TABLE_BYTES = 1 << 26  # all tokens of a loaded file together (50k real tokens: about 300 kB)
MAX_VOCAB_SIZE = 1 << 20  # the most ids a loaded file may have (as `--vocab-size` allows)
MAX_CHUNK_CHARACTERS = 1024  # a longer run of letters or symbols is cut into pieces (`cut_long`)
_CHUNK_CACHE_LIMIT = 100_000  # distinct chunks remembered by `encode`; caps its memory
_CACHED_CHUNK_CHARACTERS = 64  # only chunks this short are remembered: words, not long runs
# Unicode categories a special-token name may not hold: control characters (Cc), format
# characters (Cf: zero-width spaces, bidirectional overrides) and the line and paragraph
# separators (Zl, Zp). `decode` gives a name whole, and `tinyllm generate` prints it, so
# "\x1b]0;title\x07" in a name would reach the terminal as a command, and an invisible
# character would make a name read as another. The package's own names are plain ASCII.
NOT_IN_SPECIAL_NAMES = ("Cc", "Cf", "Zl", "Zp")


# ---------------------------------------------------------------------------------------------
# Shared checks


def _check_special_tokens(special_tokens):
    """Return `special_tokens` as a tuple of distinct non-empty strings, or raise TinyLLMError."""
    if isinstance(special_tokens, str):
        # A lone string would be iterated character by character: almost surely a mistake.
        raise TinyLLMError(f"special_tokens must be a list of strings, not the string {special_tokens!r}")
    names = tuple(special_tokens)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TinyLLMError(f"special token {name!r} must be a non-empty string")
        bad = _forbidden_character(name)
        if bad is not None:  # repr() writes the character as its escape: the error line is safe
            raise TinyLLMError(f"special token {name[:40]!r} holds the character {bad!r}: a"
                               " name may hold no control or format character")
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise TinyLLMError(f"special token {duplicates[0]!r} is given more than once")
    return names


def _forbidden_character(name):
    r"""The first character of `name` in a category of NOT_IN_SPECIAL_NAMES, or None.

    Example: "<|endoftext|>" -> None; "<|eot|>\x1b[2J" -> "\x1b"; "<|e\u200bot|>" -> "\u200b".
    """
    return next((c for c in name if unicodedata.category(c) in NOT_IN_SPECIAL_NAMES), None)


def _special_token_ids(names, first_id):
    """Give special tokens consecutive ids after the ordinary vocabulary.

    Example: names=("<|endoftext|>", "<|pad|>"), first_id=65 -> {"<|endoftext|>": 65, "<|pad|>": 66}
    """
    return {name: first_id + i for i, name in enumerate(names)}


def _check_utf8_encodable(text):
    """Raise TinyLLMError if `text` holds a lone surrogate, which UTF-8 cannot represent."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        if "\udc80" <= bad <= "\udcff":  # how Python reads a byte of a command line not in UTF-8
            raise TinyLLMError(f"text has byte 0x{ord(bad) - 0xdc00:02x} at position"
                               f" {error.start}, which is not UTF-8: type or save it as UTF-8"
                               ) from None
        raise TinyLLMError(
            f"text has character {bad!r} at position {error.start}, "
            "an unpaired surrogate that UTF-8 cannot encode") from None


def _check_id(i, vocab_size):
    """Return id `i` as a Python int, or raise TinyLLMError if it is outside the vocabulary."""
    i = int(i)  # accept numpy integers, e.g. from a model's argmax
    if not 0 <= i < vocab_size:
        raise TinyLLMError(f"token id {i} is outside the vocabulary (ids 0..{vocab_size - 1})")
    return i


# ---------------------------------------------------------------------------------------------
# Character tokenizer


class CharTokenizer:
    """One id per distinct character of the training text, then the special tokens."""

    kind = "char"

    def __init__(self, chars, special_tokens=()):
        """`chars`: the characters in id order; `special_tokens`: names, given ids after them."""
        self.chars = list(chars)
        self.special_tokens = _special_token_ids(_check_special_tokens(special_tokens), len(self.chars))
        self._id_of = {c: i for i, c in enumerate(self.chars)}
        self._special_of = {i: name for name, i in self.special_tokens.items()}

    @classmethod
    def train(cls, text, special_tokens=()):
        """Build the vocabulary: the sorted distinct characters of `text`, then the special tokens.

        Example: train("hello") has chars ['e', 'h', 'l', 'o'], so encode("hole") -> [1, 3, 2, 0].
        """
        if not text:
            raise TinyLLMError("cannot train a char tokenizer on empty text")
        _check_utf8_encodable(text)  # so that `save` can write every character
        return cls(sorted(set(text)), special_tokens)

    @property
    def vocab_size(self):
        """Number of ids: the characters plus the special tokens."""
        return len(self.chars) + len(self.special_tokens)

    def encode(self, text):
        """Text -> ids, one per character; special-token names in `text` are encoded literally."""
        try:
            return [self._id_of[c] for c in text]
        except KeyError:
            _check_utf8_encodable(text)  # a byte that is not UTF-8 is named as one
            position = next(i for i, c in enumerate(text) if c not in self._id_of)
            raise TinyLLMError(
                f"text has character {text[position]!r} at position {position} that the char "
                f"tokenizer never saw (it knows {len(self.chars)} characters)") from None

    def decode(self, ids):
        """Ids (any iterable of ints, e.g. a numpy array) -> text."""
        pieces = []
        for i in ids:
            i = _check_id(i, self.vocab_size)
            pieces.append(self.chars[i] if i < len(self.chars) else self._special_of[i])
        return "".join(pieces)

    def to_dict(self):
        """The JSON-ready contents of a saved file (see the module docstring)."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "type": self.kind,
                "chars": self.chars, "special_tokens": self.special_tokens}

    def save(self, path):
        """Write the tokenizer to `path` as readable JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data, path):
        """Rebuild from a loaded file's contents; `path` is used only in error messages."""
        chars = _field(data, "chars", list, path)
        _check_vocab_size(len(chars), data, path)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise TinyLLMError(f"tokenizer file {path} has a \"chars\" entry that is not one character")
        if len(set(chars)) != len(chars):
            raise TinyLLMError(f"tokenizer file {path} lists a character twice in \"chars\"")
        return cls(chars, _read_special_tokens(data, len(chars), path))

    @classmethod
    def load(cls, path):
        """Read a tokenizer saved by `save`; raises TinyLLMError naming `path` if the file is bad."""
        return cls.from_dict(_read_tokenizer_file(path, expected_type=cls.kind), path)


# ---------------------------------------------------------------------------------------------
# BPE building blocks: small functions, each with a worked example


def split_into_chunks(text, pattern=SPLIT_PATTERN):
    """Pre-split text into the chunks that BPE merges within (never across): the matches of
    `pattern` (a regex, as text or compiled), each cut into pieces of at most
    MAX_CHUNK_CHARACTERS (`cut_long`). Training and encoding both split text here.

    Example: "Hello world's 42 cats!!\\n" -> ["Hello", " world", "'s", " 42", " cats", "!!", "\\n"]
    """
    chunks = re.findall(pattern, text)
    if max(map(len, chunks), default=0) <= MAX_CHUNK_CHARACTERS:
        return chunks  # ordinary text: no chunk to cut, and no list made per chunk
    return [piece for chunk in chunks for piece in cut_long(chunk)]


def cut_long(chunk):
    """[chunk] if it has at most MAX_CHUNK_CHARACTERS, else its pieces of that many characters.

    Encoding a chunk holds about 100 bytes of Python objects for each of its bytes, so one line
    of 10 million letters with no space took a gigabyte; cut into pieces, it takes what its
    tokens take. No chunk of the default corpus is longer than 93 bytes, so the cut changes no
    token of ordinary text, only runs of letters or symbols over 1,024 characters long (the
    pieces of such a run never merge across a cut).
    Example (with MAX_CHUNK_CHARACTERS = 2): "abcde" -> ["ab", "cd", "e"]
    """
    if len(chunk) <= MAX_CHUNK_CHARACTERS:
        return [chunk]
    return [chunk[i:i + MAX_CHUNK_CHARACTERS] for i in range(0, len(chunk), MAX_CHUNK_CHARACTERS)]


def get_pair_counts(ids):
    """Count each adjacent pair of ids.

    Example: ids=[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    return Counter(zip(ids, ids[1:]))


def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair`, left to right, with `new_id`.

    Example: ids=[1, 2, 3, 1, 2], pair=(1, 2), new_id=4 -> [4, 3, 4]
    Overlaps go to the leftmost: ids=[7, 7, 7], pair=(7, 7), new_id=9 -> [9, 7]
    """
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def best_pair(pair_counts):
    """The pair to merge next: the highest count; on a tie, the smallest pair (as a tuple).

    Example: {(97, 98): 2, (256, 97): 2, (98, 99): 1} -> (97, 98)
    """
    return min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))


def learn_merges_reference(chunk_counts, n_merges, max_token_bytes=MAX_TOKEN_BYTES):
    """BPE training written plainly: before each merge, recount every pair of every chunk.

    The same merges as `learn_merges` (a test checks it), with none of its bookkeeping; too slow
    for real text (every merge rescans every chunk), which is why `learn_merges` exists. A pair
    whose token would be longer than `max_token_bytes` is never merged (see `learn_merges`).
    Example: {"aaabdaaabac": 1}, n_merges=3 -> [(97, 97), (97, 98), (256, 257)]
    """
    words = {chunk: list(chunk.encode("utf-8")) for chunk in chunk_counts}
    lengths = [1] * N_BYTES  # id -> bytes of its token
    merges = []
    for new_id in range(N_BYTES, N_BYTES + n_merges):
        totals = Counter()  # pair -> occurrences in the whole text
        for chunk, ids in words.items():
            for pair, n in get_pair_counts(ids).items():
                if lengths[pair[0]] + lengths[pair[1]] <= max_token_bytes:
                    totals[pair] += n * chunk_counts[chunk]
        if not totals:
            break  # every chunk is a single token (or too long a one): nothing left to merge
        pair = best_pair(totals)
        words = {chunk: merge_pair(ids, pair, new_id) for chunk, ids in words.items()}
        lengths.append(lengths[pair[0]] + lengths[pair[1]])
        merges.append(pair)
    return merges


def encode_chunk_reference(chunk_bytes, ranks):
    """Encoding written plainly: merge the lowest-ranked pair present, everywhere, and repeat.

    `ranks` maps pair -> merge index. Merging the lowest rank first replays training, which
    applied merge 0 to the whole text, then merge 1, and so on. The same ids as `encode_chunk`
    (a test checks it), but each round rescans the whole chunk: too slow for a long chunk.
    Example: chunk_bytes=b"aaab", ranks={(97, 97): 0, (97, 98): 1, (256, 257): 2}
      [97, 97, 97, 98] -> (97, 97) first: [256, 97, 98] -> (97, 98): [256, 257] -> [258]
    """
    ids = list(chunk_bytes)
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break  # no pair in this chunk was ever merged
        ids = merge_pair(ids, pair, N_BYTES + ranks[pair])
    return ids


# ---------------------------------------------------------------------------------------------
# BPE fast forms: symbols in a linked list, the next pair to merge from a heap
#
# The plain forms above rescan a whole chunk for every merge they make, so a chunk of n bytes
# costs about n times the number of merges. Natural text has short chunks and does not notice,
# but one long run of letters (a DNA sequence, a language written without spaces) is one chunk:
# 100 kB of English letters with no space took 30 s to encode and 3.5 minutes to train on.
# The forms below touch only the symbols around each merge, so a chunk costs about n log n.


class LinkedSymbols:
    """The symbols of one or more chunks in a doubly linked list: two neighbours merge in O(1).

    Position i keeps its index for life. `ids[i]` is its symbol (None once it was merged into the
    symbol before it); `next_of[i]` and `prev_of[i]` are the positions of its neighbours in its
    chunk (-1 at a chunk's ends, so merges never cross chunks).
    Example: chunks [b"abc", b"d"] -> ids=[97, 98, 99, 100], next_of=[1, 2, -1, -1],
      prev_of=[-1, 0, 1, -1]; then merge_at(0, 256) -> ids=[256, None, 99, 100],
      next_of[0]=2, prev_of[2]=0, and returns (-1, 2), the new symbol's neighbours
    """

    def __init__(self, chunks):
        """`chunks`: byte strings (or lists of byte values), laid out one after the other."""
        self.ids, self.next_of, self.prev_of = [], [], []
        for chunk in chunks:
            if not chunk:
                continue
            start, end = len(self.ids), len(self.ids) + len(chunk)
            self.ids.extend(chunk)
            self.next_of.extend([*range(start + 1, end), -1])
            self.prev_of.extend([-1, *range(start, end - 1)])

    def pair_at(self, i):
        """(symbol at i, symbol after it), or None if i is -1, merged away, or ends its chunk."""
        if i < 0 or self.ids[i] is None or self.next_of[i] < 0:
            return None
        return self.ids[i], self.ids[self.next_of[i]]

    def merge_at(self, i, new_id):
        """Put `new_id` for the symbol at i and the one after it; return its neighbours (h, k)."""
        j = self.next_of[i]
        k = self.next_of[j]
        self.ids[i], self.ids[j] = new_id, None
        self.next_of[i] = k
        if k >= 0:
            self.prev_of[k] = i
        return self.prev_of[i], k

    def remaining(self):
        """The symbols left, in order (for a single chunk: its ids)."""
        return [symbol for symbol in self.ids if symbol is not None]


def encode_chunk(chunk_bytes, ranks):
    """Apply merges to one chunk as `encode_chunk_reference` does (the same ids) in n log n time.

    `ranks` maps pair -> merge index. As in the reference, the lowest-ranked pair present is
    merged everywhere, left to right, then the next; but its places come from an index instead
    of a rescan: for each rank, the positions where a pair of that rank starts, and a heap of
    the ranks listed. A merge makes two new pairs with the new symbol's neighbours; those that
    have a rank are listed. Their ranks are above the merge just made (a merge only joins ids
    made before it), so each rank leaves the heap once, after every lower one, as in training.
    A listed position can be out of date (a merge beside it took one of its symbols): it is
    skipped when the pair now there has another rank. Each merge removes a symbol and lists at
    most two positions, and each list is sorted once: n log n in all, whatever the chunk.
    Example: chunk_bytes=b"aaab", ranks={(97, 97): 0, (97, 98): 1, (256, 257): 2}
      ids [97, 97, 97, 98]; positions by rank {0: [0, 1], 1: [2]}; heap of ranks [0, 1]
      rank 0 at 0: merge -> [256, _, 97, 98]; its new pair (256, 97) has no rank
      rank 0 at 1: position 1 was merged away: skip
      rank 1 at 2: merge -> [256, _, 257, _]; its new pair (256, 257) is listed: {2: [0]}
      rank 2 at 0: merge -> [258]
    """
    symbols = LinkedSymbols([chunk_bytes])
    where = defaultdict(list)  # rank -> positions where a pair of that rank starts
    for i, pair in enumerate(zip(chunk_bytes, chunk_bytes[1:])):
        if pair in ranks:
            where[ranks[pair]].append(i)
    heap = list(where)  # the ranks still to merge, lowest first
    heapq.heapify(heap)
    while heap:
        rank = heapq.heappop(heap)
        for i in sorted(where.pop(rank)):  # left to right
            if ranks.get(symbols.pair_at(i)) != rank:
                continue  # out of date: an earlier merge changed the pair at position i
            h, k = symbols.merge_at(i, N_BYTES + rank)
            for left in (h, i):  # the new pairs (h, i) and (i, k)
                new_rank = ranks.get(symbols.pair_at(left))
                if new_rank is not None:
                    if new_rank not in where:
                        heapq.heappush(heap, new_rank)
                    where[new_rank].append(left)
    return symbols.remaining()


def build_pair_index(symbols, weight):
    """Weighted count of each adjacent pair, and the positions where each pair starts.

    `weight[i]` is how often the chunk holding position i occurs in the text.
    Example: chunks [b"abc", b"ab"] occurring 5 and 2 times (weight=[5, 5, 5, 2, 2])
      -> pair_counts={(97, 98): 7, (98, 99): 5}, where={(97, 98): {0, 3}, (98, 99): {1}}
    """
    pair_counts, where = Counter(), defaultdict(set)
    for i, count in enumerate(weight):
        pair = symbols.pair_at(i)
        if pair is not None:
            pair_counts[pair] += count
            where[pair].add(i)
    return pair_counts, where


def apply_merge(symbols, weight, pair_counts, where, pair, new_id):
    """Merge `pair` into `new_id` everywhere, updating counts in place; return the pairs changed.

    Occurrences are merged left to right, as `merge_pair` does. A merge at i, with neighbours h
    and k, turns the pairs (h, a) (a, b) (b, k) into (h, new) (new, k): three counts go down by
    the chunk's weight, two go up. A position is not taken out of `where` when its pair changes,
    so `where[pair]` may list positions that no longer hold the pair; they are checked and
    skipped. Pairs whose count reaches zero are removed.
    Example: chunks [b"abc", b"ab"] occurring 5 and 2 times, pair=(97, 98), new_id=256
      -> chunks [256, 99] and [256]; pair_counts={(256, 99): 5};
      changed={(97, 98), (98, 99), (256, 99)}
    """
    changed = set()
    for i in sorted(where.pop(pair)):  # positions in order: left to right in each chunk
        if symbols.pair_at(i) != pair:
            continue  # out of date, or taken by the merge just before it ("aaa": only one "aa")
        old_pairs = (symbols.pair_at(symbols.prev_of[i]), pair, symbols.pair_at(symbols.next_of[i]))
        h, k = symbols.merge_at(i, new_id)
        for old in old_pairs:
            if old is not None:
                pair_counts[old] -= weight[i]
                changed.add(old)
        for left in (h, i):  # the new pairs (h, i) and (i, k)
            new = symbols.pair_at(left)
            if new is not None:
                pair_counts[new] += weight[i]
                where[new].add(left)
                changed.add(new)
    for p in changed:
        if pair_counts[p] <= 0:
            del pair_counts[p]  # a pair that no longer occurs must not be chosen as the best pair
    return changed


def pop_best_pair(heap, pair_counts):
    """Pop the pair to merge next (as `best_pair` chooses it) from a heap of (-count, pair).

    The heap may hold old counts of a pair: an entry counts only if it still matches
    `pair_counts`. Returns None when no pair is left.
    Example: heap [(-3, (1, 2)), (-2, (1, 2)), (-2, (0, 5))], pair_counts {(1, 2): 2, (0, 5): 2}
      -> (-3, (1, 2)) is out of date; (-2, (0, 5)) is next: (0, 5), the smaller of the tie
    """
    while heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) == -negative_count:
            return pair
    return None


def learn_merges(chunk_counts, n_merges, progress=None, max_token_bytes=MAX_TOKEN_BYTES):
    """Learn up to `n_merges` merges from {chunk: count}; merge i creates id 256 + i.

    The same merges as `learn_merges_reference`, in about N log N time for N bytes of distinct
    chunks however long each chunk is: the symbols of all chunks sit in one linked list, a merge
    updates only the pair counts next to each place it merges (`apply_merge`), and a heap of
    (-count, pair) gives the most frequent pair, ties going to the smallest pair.
    A pair whose token would be longer than `max_token_bytes` is never merged: a long run of one
    character (100,000 newlines) would otherwise make a token that `load` refuses, and the
    checkpoint holding it could not be read back.
    Stops early when no adjacent pair is left. Calls progress(done, n_merges) after each merge.
    Example (one chunk "aaabdaaabac", a=97 b=98 c=99 d=100), n_merges=3
      -> [(97, 97), (97, 98), (256, 257)]   (worked out step by step in the tests)
    """
    chunks = [chunk.encode("utf-8") for chunk in chunk_counts]
    weight = [count for chunk, count in zip(chunks, chunk_counts.values()) for _ in chunk]
    symbols = LinkedSymbols(chunks)
    pair_counts, where = build_pair_index(symbols, weight)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    lengths = [1] * N_BYTES  # id -> bytes of its token
    merges = []
    while len(merges) < n_merges:
        pair = pop_best_pair(heap, pair_counts)
        if pair is None:
            break  # every chunk is a single token: nothing left to merge
        if lengths[pair[0]] + lengths[pair[1]] > max_token_bytes:
            del pair_counts[pair]  # never merged; a merge only makes pairs with its new id
            continue
        for p in apply_merge(symbols, weight, pair_counts, where, pair, N_BYTES + len(merges)):
            if p in pair_counts:
                heapq.heappush(heap, (-pair_counts[p], p))  # its new count; old entries go stale
        lengths.append(lengths[pair[0]] + lengths[pair[1]])
        merges.append(pair)
        if progress is not None:
            progress(len(merges), n_merges)
    return merges


def token_bytes_table(merges):
    """The bytes of every non-special id: 256 single bytes, then each merge's two halves joined.

    Example: merges=[(104, 105), (256, 33)] -> [..., b"hi", b"hi!"] (ids 256 and 257)
    """
    table = [bytes([b]) for b in range(N_BYTES)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table


def render_token(token_bytes):
    r"""A readable string for a token's bytes; bytes that are not whole UTF-8 become \xNN.

    Example: b" the" -> " the"; b"\xe2\x82" (the first two of the three bytes of "€") -> the
    eight characters \xe2\x82, so a reader sees that the token is part of a character.
    """
    return token_bytes.decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------------------------
# BPE tokenizer


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, 256.. are merges, then the special tokens."""

    kind = "bpe"

    def __init__(self, merges, special_tokens=(), pattern=SPLIT_PATTERN):
        """`merges`: pairs in merge order (merge i creates id 256 + i); `pattern`: the pre-split regex."""
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._ranks = {pair: i for i, pair in enumerate(self.merges)}
        self._bytes = token_bytes_table(self.merges)  # (N_BYTES + n_merges) entries
        first_special = N_BYTES + len(self.merges)
        self.special_tokens = _special_token_ids(_check_special_tokens(special_tokens), first_special)
        for name in self.special_tokens:
            self._bytes.append(name.encode("utf-8"))  # so decode(special id) gives its name
        # chunk -> ids. A memo, not state: encode's result never depends on it, only its speed.
        self._chunk_cache = {}

    @classmethod
    def train(cls, text, vocab_size, special_tokens=(), progress=None):
        """Learn vocab_size - 256 - len(special_tokens) merges from `text`.

        `progress`, if given, is called as progress(done_merges, total_merges) after each merge.
        If the text runs out of pairs first, training stops early and `vocab_size` is smaller.
        """
        names = _check_special_tokens(special_tokens)
        minimum = N_BYTES + len(names)
        if not isinstance(vocab_size, numbers.Integral):
            raise TinyLLMError(f"vocab_size must be a whole number, not {vocab_size!r}")
        if vocab_size < minimum:
            raise TinyLLMError(
                f"vocab_size {vocab_size} is too small: a byte-level BPE tokenizer needs at least "
                f"{minimum} (256 bytes + {len(names)} special tokens)")
        _check_utf8_encodable(text)
        chunk_counts = Counter(split_into_chunks(text))
        merges = learn_merges(chunk_counts, vocab_size - minimum, progress)
        return cls(merges, names)

    @property
    def vocab_size(self):
        """Number of ids: 256 bytes + the merges + the special tokens."""
        return len(self._bytes)

    def encode(self, text):
        """Text -> ids. Special-token names in `text` are encoded literally, as ordinary bytes."""
        _check_utf8_encodable(text)
        ids = []
        for chunk in split_into_chunks(text, self._regex):
            chunk_ids = self._chunk_cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = encode_chunk(chunk.encode("utf-8"), self._ranks)
                if len(chunk) <= _CACHED_CHUNK_CHARACTERS:  # a word, which will come again
                    if len(self._chunk_cache) >= _CHUNK_CACHE_LIMIT:
                        self._chunk_cache.clear()  # crude but bounded; common words come back
                    self._chunk_cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def decode(self, ids):
        """Ids (any iterable of ints) -> text. Partial UTF-8 (a model may emit it) becomes U+FFFD."""
        data = b"".join(self._bytes[_check_id(i, self.vocab_size)] for i in ids)
        return data.decode("utf-8", errors="replace")

    def to_dict(self):
        """The JSON-ready contents of a saved file (see the module docstring)."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "type": self.kind,
                "pattern": self.pattern, "merges": [list(pair) for pair in self.merges],
                "special_tokens": self.special_tokens,
                "tokens": [render_token(b) for b in self._bytes[N_BYTES:N_BYTES + len(self.merges)]]}

    def save(self, path):
        """Write the tokenizer to `path` as readable JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data, path):
        """Rebuild from a loaded file's contents; `path` is used only in error messages."""
        pattern = _known_pattern(_field(data, "pattern", str, path), path)
        merges = _field(data, "merges", list, path)
        _check_vocab_size(N_BYTES + len(merges), data, path)
        for i, pair in enumerate(merges):
            # A merge may only join ids that exist before it: bytes and earlier merges.
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(_is_int(x) and 0 <= x < N_BYTES + i for x in pair)):
                raise TinyLLMError(f"tokenizer file {path} has a bad merge at index {i}")
        _check_token_lengths(merges, path)
        return cls(merges, _read_special_tokens(data, N_BYTES + len(merges), path), pattern)

    @classmethod
    def load(cls, path):
        """Read a tokenizer saved by `save`; raises TinyLLMError naming `path` if the file is bad."""
        return cls.from_dict(_read_tokenizer_file(path, expected_type=cls.kind), path)


# ---------------------------------------------------------------------------------------------
# Reading files and choosing a tokenizer by kind

TOKENIZERS = {CharTokenizer.kind: CharTokenizer, BPETokenizer.kind: BPETokenizer}


def _known_pattern(pattern, path):
    """The split regex a file names: one of SPLIT_PATTERNS, given by name or by its exact text.

    A tokenizer file is data, so it may not bring its own regex: a crafted one can take
    exponential time on a short text (catastrophic backtracking). Version-1 files store the
    regex text itself, which is accepted when it is one of the package's own.
    """
    if pattern in SPLIT_PATTERNS:
        return SPLIT_PATTERNS[pattern]
    if pattern in SPLIT_PATTERNS.values():
        return pattern
    raise TinyLLMError(f"tokenizer file {path} has a \"pattern\" that is not one of tinyllm's split"
                       f" patterns ({', '.join(SPLIT_PATTERNS)})")


def _check_vocab_size(n_ordinary, data, path):
    """Refuse a file with more ids than MAX_VOCAB_SIZE before building anything from it: a
    64 MB file of tiny merges would otherwise take gigabytes and many seconds to load."""
    n_special = len(_field(data, "special_tokens", dict, path))
    if n_ordinary + n_special > MAX_VOCAB_SIZE:
        raise TinyLLMError(f"tokenizer file {path} has {n_ordinary + n_special:,} ids, more than"
                           f" the {MAX_VOCAB_SIZE:,} a tinyllm tokenizer can have")


def _check_token_lengths(merges, path):
    """Refuse merges whose tokens would be absurdly long: each merge may double a token's length,
    so 40 crafted merges could ask for a terabyte, and a 1 MB file of merges each making a
    64 kB token asks for 5 GB. Real tokens are a few dozen bytes at most."""
    lengths = [1] * N_BYTES
    for a, b in merges:
        lengths.append(lengths[a] + lengths[b])
        if lengths[-1] > MAX_TOKEN_BYTES:
            raise TinyLLMError(f"tokenizer file {path} has a merge making a token longer than"
                               f" {MAX_TOKEN_BYTES:,} bytes")
    if sum(lengths) > MAX_TABLE_BYTES:
        raise TinyLLMError(f"tokenizer file {path} has merges whose tokens take more than"
                           f" {MAX_TABLE_BYTES:,} bytes together")


def _is_int(x):
    """True for a JSON integer (json gives bool for true/false, and bool is a subclass of int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _field(data, key, kind, path):
    """data[key], checked to be of type `kind`, or a TinyLLMError naming the file."""
    if key not in data:
        raise TinyLLMError(f"tokenizer file {path} has no \"{key}\" field")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TinyLLMError(f"tokenizer file {path} has a \"{key}\" field that is not a {kind.__name__}")
    return value


def _read_special_tokens(data, first_id, path):
    """Special-token names in id order, checking their ids run first_id, first_id + 1, ..."""
    special = _field(data, "special_tokens", dict, path)
    try:  # the names, held to the rules of a tokenizer made here; the error names the file
        _check_special_tokens(list(special))
    except TinyLLMError as err:
        raise TinyLLMError(f"tokenizer file {path}: {err}") from None
    by_id = sorted(special.items(), key=lambda item: item[1] if _is_int(item[1]) else -1)
    if [i for _, i in by_id] != list(range(first_id, first_id + len(by_id))):
        raise TinyLLMError(
            f"tokenizer file {path} has special token ids that are not the whole numbers "
            f"{first_id}, {first_id + 1}, ... right after the ordinary vocabulary")
    return [name for name, _ in by_id]


def _read_tokenizer_file(path, expected_type=None):
    """Read and check a tokenizer file's JSON and header; return the dict, or raise TinyLLMError.

    Only a regular file is read, and only if it is at most MAX_FILE_BYTES (so /dev/zero or a FIFO
    named as a tokenizer file is refused instead of read forever).
    """
    if not os.path.lexists(path):
        raise TinyLLMError(f"tokenizer file {path} does not exist")
    fd, size = open_regular(path, "tokenizer file")
    if size > MAX_FILE_BYTES:
        os.close(fd)
        raise TinyLLMError(f"tokenizer file {path} is {size:,} bytes, more than a tokenizer file can"
                           f" be ({MAX_FILE_BYTES:,})")
    return _parse_tokenizer_bytes(read_fd(fd, size, "tokenizer file", path), path, expected_type)


def _parse_tokenizer_bytes(data, path, expected_type=None):
    """The checked dict of a tokenizer file's bytes (strict JSON, known format and version)."""
    data = parse_json(data, f"tokenizer file {path}")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise TinyLLMError(f"{path} is not a tinyllm tokenizer file (its \"format\" is not \"{FORMAT_NAME}\")")
    version = _field(data, "version", int, path)
    if version < 1:
        raise TinyLLMError(f"tokenizer file {path} has format version {version} (the first is 1)")
    if version > FORMAT_VERSION:
        raise TinyLLMError(
            f"tokenizer file {path} has format version {version}; this tinyllm reads version "
            f"{FORMAT_VERSION} or older: upgrade tinyllm")
    kind = _field(data, "type", str, path)
    if kind not in TOKENIZERS:
        raise TinyLLMError(f"tokenizer file {path} has unknown type {kind[:40]!r} (known: {', '.join(TOKENIZERS)})")
    if expected_type is not None and kind != expected_type:
        raise TinyLLMError(f"tokenizer file {path} holds a {kind} tokenizer, not a {expected_type} one")
    return data


def load_tokenizer(path):
    """Load a saved tokenizer of either kind, chosen by the file's "type" field."""
    data = _read_tokenizer_file(path)
    return TOKENIZERS[data["type"]].from_dict(data, path)


def load_tokenizer_bytes(data, path):
    """Load a tokenizer from the bytes of its file (already read); `path` names it in errors."""
    data = _parse_tokenizer_bytes(data, path)
    return TOKENIZERS[data["type"]].from_dict(data, path)


def train_tokenizer(kind, text, vocab_size, special_tokens=(), progress=None):
    """Train a tokenizer of `kind` ("char" or "bpe"); `vocab_size` is ignored for "char"."""
    if kind == CharTokenizer.kind:
        return CharTokenizer.train(text, special_tokens)
    if kind == BPETokenizer.kind:
        if vocab_size is None:
            raise TinyLLMError("a bpe tokenizer needs a vocab_size (for example 512)")
        return BPETokenizer.train(text, vocab_size, special_tokens, progress)
    raise TinyLLMError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(TOKENIZERS)}")
