"""Tests for tinyllm/tokenizers.py: worked examples, round-trip properties, files and their errors."""

import json
import random
import sys
from collections import Counter

import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import tokenizers
from tinyllm.errors import TinyLLMError
from tinyllm.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    LinkedSymbols,
    apply_merge,
    best_pair,
    build_pair_index,
    encode_chunk,
    encode_chunk_reference,
    get_pair_counts,
    learn_merges,
    learn_merges_reference,
    load_tokenizer,
    merge_pair,
    pop_best_pair,
    split_into_chunks,
    train_tokenizer,
)

EOT = "<|endoftext|>"

# A small training text with some non-ASCII, so merges also join multi-byte characters.
SMALL_TEXT = (
    "The cat sat on the mat. The cat's hat is on the mat!\n"
    "Der Hund läuft über die Straße; le café est très bon. 12 + 30 = 42\n"
) * 3


@pytest.fixture(scope="module")
def small_bpe():
    """A BPE tokenizer with 40 merges and one special token, trained once for the module."""
    return BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 40 + 1, special_tokens=[EOT])


def trained(cls):
    """A small trained tokenizer of class `cls`, with one special token."""
    if cls is CharTokenizer:
        return CharTokenizer.train(SMALL_TEXT, special_tokens=[EOT])
    return BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 40 + 1, special_tokens=[EOT])


# ---------------------------------------------------------------------------------------------
# BPE building blocks: the docstring examples, checked


def test_merge_pair_worked_example():
    assert merge_pair([1, 2, 3, 1, 2], pair=(1, 2), new_id=4) == [4, 3, 4]
    assert merge_pair([7, 7, 7], pair=(7, 7), new_id=9) == [9, 7]  # overlaps go to the leftmost
    assert merge_pair([], pair=(1, 2), new_id=4) == []


def test_get_pair_counts_worked_example():
    assert get_pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}


def test_best_pair_breaks_ties_by_smallest_pair():
    assert best_pair({(97, 98): 2, (256, 97): 2, (98, 99): 1}) == (97, 98)
    assert best_pair({(5, 1): 3, (1, 9): 3, (1, 8): 3}) == (1, 8)


def test_split_into_chunks_worked_example():
    assert split_into_chunks("Hello world's 42 cats!!\n") == [
        "Hello", " world", "'s", " 42", " cats", "!!", "\n"]
    # Whitespace before a word leaves its last space to that word.
    assert split_into_chunks("a   b") == ["a", "  ", " b"]


@given(st.text())
def test_chunks_join_back_to_the_text(text):
    assert "".join(split_into_chunks(text)) == text


def test_linked_symbols_worked_example():
    symbols = LinkedSymbols([b"abc", b"d"])
    assert (symbols.ids, symbols.next_of, symbols.prev_of) == (
        [97, 98, 99, 100], [1, 2, -1, -1], [-1, 0, 1, -1])
    assert symbols.pair_at(1) == (98, 99)
    assert symbols.pair_at(2) is None and symbols.pair_at(-1) is None  # a chunk's end; no position
    assert symbols.merge_at(0, 256) == (-1, 2)
    assert (symbols.ids, symbols.next_of[0], symbols.prev_of[2]) == ([256, None, 99, 100], 2, 0)
    assert symbols.pair_at(0) == (256, 99) and symbols.pair_at(1) is None
    assert symbols.remaining() == [256, 99, 100]


def test_build_pair_index_and_apply_merge_worked_example():
    symbols, weight = LinkedSymbols([b"abc", b"ab"]), [5, 5, 5, 2, 2]
    pair_counts, where = build_pair_index(symbols, weight)
    assert pair_counts == {(97, 98): 7, (98, 99): 5}
    assert where == {(97, 98): {0, 3}, (98, 99): {1}}
    changed = apply_merge(symbols, weight, pair_counts, where, (97, 98), 256)
    assert symbols.remaining() == [256, 99, 256]
    assert pair_counts == {(256, 99): 5}
    assert changed == {(97, 98), (98, 99), (256, 99)}


def test_apply_merge_overlapping_pairs_like_merge_pair():
    # "aaaa" holds "aa" at 0, 1 and 2; left to right that is two merges, and "aaa" is one.
    for text, want in ((b"aaaa", [256, 256]), (b"aaa", [256, 97])):
        symbols = LinkedSymbols([text])
        pair_counts, where = build_pair_index(symbols, [1] * len(text))
        apply_merge(symbols, [1] * len(text), pair_counts, where, (97, 97), 256)
        assert symbols.remaining() == want == merge_pair(list(text), (97, 97), 256)
        assert pair_counts == get_pair_counts(want)


def test_pop_best_pair_skips_old_counts_and_breaks_ties_by_smallest_pair():
    heap = [(-3, (1, 2)), (-2, (1, 2)), (-2, (0, 5))]
    pair_counts = {(1, 2): 2, (0, 5): 2}
    assert pop_best_pair(heap, pair_counts) == (0, 5)  # (1, 2) no longer has 3
    del pair_counts[(0, 5)]
    assert pop_best_pair(heap, pair_counts) == (1, 2)
    assert pop_best_pair(heap, pair_counts) is None


@pytest.mark.parametrize("encode", [encode_chunk, encode_chunk_reference])
def test_encode_chunk_worked_example(encode):
    ranks = {(97, 97): 0, (97, 98): 1, (256, 257): 2}
    assert encode(b"aaab", ranks) == [258]
    assert encode(b"ba", ranks) == [98, 97]  # no learned pair: bytes stay as they are
    assert encode(b"", ranks) == [] and encode(b"a", ranks) == [97]


def test_reference_trainer_worked_example():
    assert learn_merges_reference({"aaabdaaabac": 1}, 3) == [(97, 97), (97, 98), (256, 257)]
    assert learn_merges_reference({"ab": 2, " ab": 1}, 5) == [(97, 98), (32, 256)]  # stops early


def repeated_runs(alphabet, max_repeat):
    """Texts made of short pieces each repeated many times, e.g. "ab" * 40 + "é" + "a" * 97.

    They make long chunks whose merges chain ("aa", then "aaaa", ...) and overlap ("aaa" holds
    one "aa" merge, not two): where a fast form is most likely to part from the plain one.
    """
    piece = st.text(alphabet=alphabet, min_size=1, max_size=3)
    return st.lists(st.tuples(piece, st.integers(1, max_repeat)), max_size=6).map(
        lambda parts: "".join(text * n for text, n in parts))


def texts(alphabet, max_repeat):
    """Random texts over `alphabet`, some plain and some made of long repeated runs."""
    return st.one_of(st.text(alphabet=alphabet, max_size=80), repeated_runs(alphabet, max_repeat))


@settings(max_examples=150, deadline=None)
@given(texts("ab cé!\n", 60), st.integers(0, 40))
def test_incremental_training_matches_the_reference_trainer(text, n_merges):
    chunk_counts = Counter(split_into_chunks(text))
    assert learn_merges(chunk_counts, n_merges) == learn_merges_reference(chunk_counts, n_merges)


@settings(max_examples=100, deadline=None)
@given(texts("ab cé!\n", 60), st.integers(0, 40), st.integers(2, 6))
def test_a_token_longer_than_the_limit_is_never_learned(text, n_merges, max_token_bytes):
    chunk_counts = Counter(split_into_chunks(text))
    merges = learn_merges(chunk_counts, n_merges, max_token_bytes=max_token_bytes)
    assert merges == learn_merges_reference(chunk_counts, n_merges, max_token_bytes)
    assert max(map(len, tokenizers.token_bytes_table(merges))) <= max_token_bytes


def test_a_long_run_of_one_character_trains_a_tokenizer_that_loads(tmp_path):
    # 100,000 newlines in a row (a file of many empty lines) are one chunk: unbounded, its merges
    # built a 65,537-byte token, and the run's tokenizer.json was refused when read back
    text = "a b\n" + "\n" * 100_000 + "c d\n"
    tok = BPETokenizer.train(text, vocab_size=256 + 30)
    assert max(map(len, tokenizers.token_bytes_table(tok.merges))) <= tokenizers.MAX_TOKEN_BYTES
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.decode(loaded.encode(text)) == text


def test_a_chunk_longer_than_the_limit_is_cut_into_pieces(monkeypatch):
    monkeypatch.setattr(tokenizers, "MAX_CHUNK_CHARACTERS", 2)
    assert split_into_chunks("abcde fg") == ["ab", "cd", "e", " f", "g"]
    assert tokenizers.cut_long("ab") == ["ab"]


def test_a_long_run_is_encoded_piece_by_piece_and_not_remembered():
    # One line of letters with no space, 2.5 pieces long: its ids are those of its pieces, and
    # the encoder's memo keeps none of them (it keeps words, not long runs)
    tok = BPETokenizer.train("aaaa bbb ab " * 50 + "a" * 3000, vocab_size=256 + 20)
    limit = tokenizers.MAX_CHUNK_CHARACTERS
    run = "b" + "a" * (2 * limit + limit // 2)
    pieces = [run[i:i + limit] for i in range(0, len(run), limit)]
    by_pieces = [i for piece in pieces for i in tok.encode(piece)]
    ranks = {pair: rank for rank, pair in enumerate(tok.merges)}
    assert encode_chunk(run.encode("utf-8"), ranks) != by_pieces  # uncut, merges would cross
    tok._chunk_cache.clear()
    assert tok.encode(run) == by_pieces
    assert max(map(len, tokenizers.token_bytes_table(tok.merges))) <= limit
    assert all(len(chunk) <= 64 for chunk in tok._chunk_cache)


@settings(max_examples=150, deadline=None)
@given(train_text=texts("ab cé!\n", 40), text=texts("abc é!\n", 200), n_merges=st.integers(0, 40))
def test_fast_encoding_equals_the_reference_encoding(train_text, text, n_merges):
    tok = BPETokenizer(learn_merges(Counter(split_into_chunks(train_text)), n_merges))
    ranks = {pair: rank for rank, pair in enumerate(tok.merges)}
    want = [i for chunk in split_into_chunks(text)
            for i in encode_chunk_reference(chunk.encode("utf-8"), ranks)]
    assert tok.encode(text) == want


@st.composite
def any_merges(draw, alphabet=(97, 98, 99), max_merges=30):
    """Merges not learned from a text but drawn at random, as a file could hold them: merge i
    joins any two ids made before it (bytes of `alphabet` or earlier merges), repeats allowed."""
    merges = []
    for i in range(draw(st.integers(0, max_merges))):
        known = st.sampled_from([*alphabet, *range(256, 256 + i)])
        merges.append((draw(known), draw(known)))
    return merges


@settings(max_examples=150, deadline=None)
@given(merges=any_merges(), text=texts("abc", 200))
def test_fast_encoding_equals_the_reference_for_any_merges(merges, text):
    ranks = {pair: rank for rank, pair in enumerate(merges)}  # a repeated pair keeps its last rank
    chunk = text.encode("utf-8")
    assert encode_chunk(chunk, ranks) == encode_chunk_reference(chunk, ranks)


def lines_run(fn, *args):
    """How many lines of tinyllm/tokenizers.py the call fn(*args) runs.

    A count of work that, unlike a time, is the same on every machine, so a test can bound it.
    """
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != tokenizers.__file__:
            return None  # do not trace inside other modules
        count += event == "line"
        return trace

    old_trace = sys.gettrace()
    sys.settrace(trace)
    try:
        fn(*args)
    finally:
        sys.settrace(old_trace)
    return count


def long_word(seed, n=2000):
    """n random letters of "abcd": one long run without a space (as in a DNA file, or text in a
    language written without spaces). The pre-split would cut it at 1,024 characters; these
    tests give it to the chunk functions whole."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcd") for _ in range(n))


def test_training_on_one_long_word_is_not_quadratic():
    # The chunk-by-chunk trainer rescanned the whole word for each of the 300 merges: about
    # 1,000 lines a byte here. Touching only the places each merge changes takes about 60.
    word = long_word(seed=0)
    assert lines_run(learn_merges, {word: 1}, 300) < 150 * len(word)


def test_encoding_one_long_word_is_not_quadratic():
    # The plain encoder rescans the word once for each merge it applies: about 300 lines a byte
    # here, where finding each merge's places from an index takes about 25.
    merges = learn_merges({long_word(seed=0): 1}, 300)
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    chunk = long_word(seed=1).encode("utf-8")
    ids = encode_chunk(chunk, ranks)
    assert ids == encode_chunk_reference(chunk, ranks)
    assert len(ids) < len(chunk) / 2  # many merges apply, all over the word
    assert lines_run(encode_chunk, chunk, ranks) < 60 * len(chunk)


# ---------------------------------------------------------------------------------------------
# BPE tokenizer


def test_bpe_hand_worked_example():
    # "aaabdaaabac" is all letters, so the pre-split keeps it as one chunk. Bytes: a=97 b=98
    # c=99 d=100, so the ids are [97, 97, 97, 98, 100, 97, 97, 97, 98, 97, 99].
    # Merge 0: pair counts (97,97)=4 (overlapping pairs count: "aaa" holds two), (97,98)=2, the
    #   rest 1. (97,97) -> 256, merged left to right: [256, 97, 98, 100, 256, 97, 98, 97, 99].
    # Merge 1: (256,97)=2 and (97,98)=2 tie; the smaller pair (97,98) wins -> 257:
    #   [256, 257, 100, 256, 257, 97, 99].
    # Merge 2: (256,257)=2 is the only pair seen twice -> 258: [258, 100, 258, 97, 99].
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.encode("aaab") == [258]


def test_bpe_merges_stay_inside_chunks_and_stop_early():
    # "ab ab" splits into "ab" and " ab", so the pair (98, 32) = "b " is never counted.
    # Merge 0: (97,98)=2 beats (32,97)=1 -> 256; chunks [256] and [32, 256].
    # Merge 1: (32,256)=1 -> 257; chunks [256] and [257]. No pairs are left, so training
    # stops after 2 merges although vocab_size 300 asked for 44.
    tok = BPETokenizer.train("ab ab", vocab_size=300)
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.vocab_size == 258
    assert tok.encode("ab ab") == [256, 257]
    assert tok.encode("ba") == [98, 97]


@given(st.text())
def test_bpe_round_trip_any_unicode(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text


@given(st.text())
def test_bpe_encode_never_produces_special_ids(small_bpe, text):
    ids = small_bpe.encode(text + EOT)
    assert small_bpe.special_tokens[EOT] not in ids
    assert all(0 <= i < small_bpe.vocab_size - 1 for i in ids)


def test_bpe_vocab_size_accounting():
    tok = BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 10 + 2, special_tokens=[EOT, "<|pad|>"])
    assert len(tok.merges) == 10
    assert tok.vocab_size == 268
    assert tok.special_tokens == {EOT: 266, "<|pad|>": 267}


def test_bpe_vocab_size_too_small_names_the_minimum():
    with pytest.raises(TinyLLMError, match="at least 258"):
        BPETokenizer.train(SMALL_TEXT, vocab_size=257, special_tokens=[EOT, "<|pad|>"])


def test_bpe_progress_is_called_after_each_merge():
    calls = []
    BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_bpe_training_is_deterministic():
    first = BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 60)
    second = BPETokenizer.train(SMALL_TEXT, vocab_size=256 + 60)
    assert first.merges == second.merges
    assert len(first.merges) == 60


def test_bpe_decode_replaces_partial_utf8():
    tok = BPETokenizer([])
    euro = list("€".encode("utf-8"))  # [226, 130, 172]
    assert tok.decode(euro) == "€"
    assert tok.decode(euro[:2]) == "\ufffd"  # a model cut off mid-character


def test_bpe_decode_accepts_numpy_ids(small_bpe):
    ids = small_bpe.encode("The cat")
    assert small_bpe.decode(onp.array(ids, dtype=onp.int64)) == "The cat"


# ---------------------------------------------------------------------------------------------
# Char tokenizer

CHAR_TEXT = "hello world!\n"


def test_char_vocab_is_sorted_distinct_chars_then_specials():
    tok = CharTokenizer.train(CHAR_TEXT, special_tokens=[EOT])
    assert tok.chars == ["\n", " ", "!", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.special_tokens == {EOT: 10}
    assert tok.vocab_size == 11
    assert tok.encode("hole") == [5, 7, 6, 4]


@given(st.text(alphabet=CHAR_TEXT))
def test_char_round_trip_over_training_alphabet(text):
    tok = CharTokenizer.train(CHAR_TEXT)
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_is_named_with_its_position():
    tok = CharTokenizer.train(CHAR_TEXT)
    with pytest.raises(TinyLLMError, match="character 'é' at position 3 that the char tokenizer never saw"):
        tok.encode("helé")


def test_char_empty_training_text_is_an_error():
    with pytest.raises(TinyLLMError, match="empty text"):
        CharTokenizer.train("")


# ---------------------------------------------------------------------------------------------
# Both tokenizers


@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_special_token_has_the_last_id_and_decodes_to_its_name(cls):
    tok = trained(cls)
    eot = tok.special_tokens[EOT]
    assert eot == tok.vocab_size - 1
    assert tok.decode(tok.encode("The cat") + [eot]) == "The cat" + EOT


def test_special_token_text_is_encoded_literally(small_bpe):
    # Typed "<|endoftext|>" is 13 ordinary bytes, encoded like a tokenizer without specials would.
    plain = BPETokenizer(small_bpe.merges)
    ids = small_bpe.encode("a" + EOT)
    assert small_bpe.special_tokens[EOT] not in ids
    assert ids == plain.encode("a" + EOT)
    assert small_bpe.decode(ids) == "a" + EOT
    # The char tokenizer never saw '<', so it refuses the text rather than emit the special id.
    with pytest.raises(TinyLLMError, match="'<' at position 0"):
        trained(CharTokenizer).encode(EOT)


@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_decode_rejects_ids_outside_the_vocabulary(cls):
    tok = trained(cls)
    for bad in (tok.vocab_size, -1):
        with pytest.raises(TinyLLMError, match=f"token id {bad} is outside"):
            tok.decode([0, bad])


@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
def test_save_then_load_gives_identical_encodings(cls, tmp_path):
    tok = trained(cls)
    path = tmp_path / "tok.json"
    tok.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["{", '  "format": "tinyllm-tokenizer",', '  "version": 1,']
    assert json.loads(path.read_text(encoding="utf-8"))["type"] == cls.kind
    for loaded in (cls.load(path), load_tokenizer(path)):
        assert type(loaded) is cls
        assert loaded.encode(SMALL_TEXT) == tok.encode(SMALL_TEXT)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_tokens == tok.special_tokens


def test_bpe_file_lists_readable_tokens(small_bpe, tmp_path):
    path = tmp_path / "bpe.json"
    small_bpe.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data["tokens"]) == len(data["merges"]) == 40
    a, b = data["merges"][0]
    assert data["tokens"][0] == (bytes([a]) + bytes([b])).decode("utf-8", errors="backslashreplace")


def write_bad_file(tmp_path, case):
    """Write a broken tokenizer file of the given kind of damage; return its path."""
    path = tmp_path / f"{case}.json"
    good = trained(BPETokenizer).to_dict()
    if case == "missing":
        return path
    if case == "truncated":
        path.write_text(json.dumps(good)[:50], encoding="utf-8")
    elif case == "newer_version":
        path.write_text(json.dumps({**good, "version": 2}), encoding="utf-8")
    elif case == "wrong_format":
        path.write_text(json.dumps({**good, "format": "something-else"}), encoding="utf-8")
    elif case == "missing_field":
        path.write_text(json.dumps({k: v for k, v in good.items() if k != "merges"}), encoding="utf-8")
    elif case == "bad_merge":
        path.write_text(json.dumps({**good, "merges": [[97, 999]]}), encoding="utf-8")
    elif case == "bad_special_ids":
        path.write_text(json.dumps({**good, "special_tokens": {EOT: 7}}), encoding="utf-8")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("truncated", "not valid JSON"),
    ("newer_version", "format version 2; this tinyllm reads version 1 or older: upgrade tinyllm"),
    ("wrong_format", "not a tinyllm tokenizer file"),
    ("missing_field", 'no "merges" field'),
    ("bad_merge", "bad merge"),
    ("bad_special_ids", "special token ids"),
])
def test_load_errors_name_the_file(tmp_path, case, message):
    path = write_bad_file(tmp_path, case)
    for load in (load_tokenizer, BPETokenizer.load):
        with pytest.raises(TinyLLMError, match=message) as info:
            load(path)
        assert str(path) in str(info.value)


def test_loading_the_wrong_kind_is_an_error(tmp_path):
    path = tmp_path / "char.json"
    trained(CharTokenizer).save(path)
    with pytest.raises(TinyLLMError, match="holds a char tokenizer, not a bpe one"):
        BPETokenizer.load(path)


def test_train_tokenizer_dispatches_on_kind():
    assert isinstance(train_tokenizer("char", CHAR_TEXT, None), CharTokenizer)
    bpe = train_tokenizer("bpe", SMALL_TEXT, 256 + 3, special_tokens=[EOT])
    assert isinstance(bpe, BPETokenizer)
    assert len(bpe.merges) == 2 and bpe.vocab_size == 259  # the special token counts in vocab_size
    with pytest.raises(TinyLLMError, match="needs a vocab_size"):
        train_tokenizer("bpe", SMALL_TEXT, None)
    with pytest.raises(TinyLLMError, match="unknown tokenizer kind 'word'"):
        train_tokenizer("word", SMALL_TEXT, 300)


def test_bad_special_tokens_are_errors():
    with pytest.raises(TinyLLMError, match="more than once"):
        CharTokenizer.train(CHAR_TEXT, special_tokens=[EOT, EOT])
    with pytest.raises(TinyLLMError, match="not the string"):
        BPETokenizer.train(CHAR_TEXT, 300, special_tokens=EOT)


# One of each category a special-token name may not hold: Cc (an escape sequence, a newline,
# DEL, NEL), Cf (a zero-width space, a right-to-left override), Zl and Zp.
HIDDEN_IN_NAMES = ["\x1b]0;PWNED\x07\x1b[2J", "<|eot|>\n", "<|eot\x7f|>", "<|eot\x85|>",
                   "<|e\u200bot|>", "\u202e<|eot|>", "<|eot\u2028|>", "<|eot|>\u2029"]


@pytest.mark.parametrize("cls", [CharTokenizer, BPETokenizer])
@pytest.mark.parametrize("name", HIDDEN_IN_NAMES)
def test_a_special_token_name_with_a_control_or_format_character_is_refused(cls, name, tmp_path):
    # before, a tokenizer file's name "\x1b]0;PWNED\x07..." loaded, and `tinyllm generate`
    # printed it raw to the terminal each time the model sampled its id
    data = trained(cls).to_dict()
    data["special_tokens"] = {name: data["special_tokens"][EOT]}
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for load in (load_tokenizer, cls.load):
        with pytest.raises(TinyLLMError, match="a name may hold no control or format") as info:
            load(path)
        message = str(info.value)
        assert str(path) in message and message.isprintable(), message
    with pytest.raises(TinyLLMError, match="no control or format character"):
        cls.train(SMALL_TEXT, *([] if cls is CharTokenizer else [300]), special_tokens=[name])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_every_tokenizer_the_package_trains_loads_back(kind, tmp_path):
    """The package's own special-token names, over a text whose characters include the control
    characters a char tokenizer may learn (a tab, a newline, an escape, NUL) and a format one."""
    from tinyllm.labelled_data import UNK_TOKEN
    from tinyllm.pretrain import SPECIAL_TOKENS
    from tinyllm.seq2seq_data import SEQ2SEQ_SPECIAL_TOKENS

    names = [*SPECIAL_TOKENS, tokenizers.MASK_TOKEN, UNK_TOKEN, *SEQ2SEQ_SPECIAL_TOKENS]
    text = SMALL_TEXT + "a\tb\r\nc\x1b[2Jd\x00e\u200bf\u2028"
    tok = train_tokenizer(kind, text, 256 + 40 + len(names), special_tokens=names)
    tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert list(loaded.special_tokens) == names and loaded.encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_text_utf8_cannot_hold_is_named_for_what_it_is(kind):
    tok = train_tokenizer(kind, "hello world, hello there\n" * 20, 300)
    with pytest.raises(TinyLLMError, match=r"byte 0xe9 at position 3, which is not UTF-8"):
        tok.encode("hel\udce9")  # how Python reads the byte 0xe9 of a Latin-1 command line
    with pytest.raises(TinyLLMError, match="unpaired surrogate"):
        tok.encode("he\ud800")
