"""Tests for tinyllm/data.py: reading corpora and their errors, the split, batches of windows."""

import os
import re
import threading

import numpy as onp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyllm.data import (
    check_long_enough,
    encode_corpus,
    encode_in_pieces,
    get_batch,
    get_windows,
    load_corpus,
    MIN_PARAGRAPH_CHARS,
    file_docstrings,
    prose_paragraphs,
    stdlib_python_files,
    walk_statements,
    pydoc_corpus,
    python_docs_corpus,
    stdlib_docstrings_corpus,
    read_text_file,
    text_pieces,
    train_val_split,
)
from tinyllm import data
from tinyllm.embed import read_lines
from tinyllm.errors import TinyLLMError
from tinyllm.fileio import decode_utf8
from tinyllm.tokenizers import BPETokenizer, CharTokenizer

# ----------------------------------------------------------------------------- split


def test_split_is_90_10_at_one_point():
    ids = onp.arange(100)
    train, val = train_val_split(ids)
    onp.testing.assert_array_equal(train, onp.arange(90))
    onp.testing.assert_array_equal(val, onp.arange(90, 100))


@given(st.integers(0, 5000))
def test_split_keeps_every_token_once_in_order(n):
    ids = onp.arange(n)
    train, val = train_val_split(ids)
    assert len(train) == int(n * 0.9)
    onp.testing.assert_array_equal(onp.concatenate([train, val]), ids)


# ----------------------------------------------------------------------------- encoding in pieces

# letters (one with an accent), digits, symbols, an apostrophe, spaces, tabs and line ends: every
# alternative of BPE's pre-split, and whitespace runs that take a space from the word after them
PIECE_ALPHABET = "ab\u00e9 12.,'\t\nsd"
BPE = BPETokenizer.train("ab\u00e9 ab  12 .. 'sd a\tb\n\n  ab   ab\t\t ab \n ab    ab" * 3, 300)
CHAR = CharTokenizer.train(PIECE_ALPHABET)


def test_text_pieces_worked_example():
    assert list(text_pieces("ab cd  ef\ngh", 3)) == ["ab cd", "  ef", "\ngh"]
    assert list(text_pieces("abcdefgh", 3)) == ["abcdefgh"]  # no space to cut before
    assert list(text_pieces("", 3)) == [""]


# texts of words and runs of whitespace, where a cut in the wrong place changes BPE's chunks
piece_texts = st.one_of(
    st.text(alphabet=PIECE_ALPHABET, max_size=80),
    st.lists(st.sampled_from(["ab", "\u00e9", "12", "..", "'sd", " ", "  ", "\t", "\n"]),
             max_size=30).map("".join))


@settings(max_examples=300, deadline=None)
@given(text=piece_texts, size=st.integers(1, 12))
@example(text="a   b", size=2)  # cut before the second space: "a " + "  b" is not "a" "  " " b"
def test_text_encoded_in_pieces_is_the_text_encoded_whole(text, size):
    """For both tokenizers, whatever the piece size: so pretraining on a text and embedding a
    line give the same ids with progress shown as without it."""
    pieces = list(text_pieces(text, size))
    assert "".join(pieces) == text and all(len(p) >= size for p in pieces[:-1])
    for tokenizer in (CHAR, BPE):
        joined = [i for ids, _ in encode_in_pieces(tokenizer, text, size) for i in ids]
        assert joined == tokenizer.encode(text)
        whole = onp.asarray(tokenizer.encode(text), dtype=onp.int32)
        got = encode_corpus(tokenizer, text, size=size)
        assert got.dtype == onp.int32 and onp.array_equal(got, whole)


def test_encode_corpus_reports_its_progress_in_characters():
    seen = []
    encode_corpus(CHAR, "ab ab ab ab", lambda done, total: seen.append((done, total)), size=2)
    assert seen == [(2, 11), (5, 11), (8, 11), (11, 11)]  # cut before each " ab"


def test_an_error_in_a_later_piece_names_its_place_in_the_whole_text():
    text = "ab " * 10 + "abz"
    with pytest.raises(TinyLLMError) as whole:
        CHAR.encode(text)
    with pytest.raises(TinyLLMError) as pieces:
        encode_corpus(CHAR, text, size=4)
    assert str(pieces.value) == str(whole.value) and "position 32" in str(whole.value)


# ----------------------------------------------------------------------------- batches


def test_get_batch_docstring_example():
    ids = onp.array([5, 9, 2, 7], dtype=onp.int32)
    x, y = get_batch(ids, 1, 3, onp.random.default_rng(0))  # only one window fits: start 0
    onp.testing.assert_array_equal(x, [[5, 9, 2]])
    onp.testing.assert_array_equal(y, [[9, 2, 7]])
    assert x.dtype == y.dtype == onp.int32


@settings(max_examples=60, deadline=None)
@given(n_extra=st.integers(0, 100), batch=st.integers(1, 8), block=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1))
def test_targets_are_inputs_shifted_by_one_inside_the_data(n_extra, batch, block, seed):
    n = block + 1 + n_extra
    values = onp.random.default_rng(seed).integers(0, 50, size=n).astype(onp.int32)
    x, y = get_batch(values, batch, block, onp.random.default_rng(seed))
    assert x.shape == y.shape == (batch, block)
    onp.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # With ids = 0..n-1 each row is its own start position, so windows can be located exactly.
    positions = onp.arange(n, dtype=onp.int32)
    px, py = get_batch(positions, batch, block, onp.random.default_rng(seed))
    onp.testing.assert_array_equal(py, px + 1)
    assert px.min() >= 0 and py.max() <= n - 1
    for row, start in zip(px, px[:, 0]):
        onp.testing.assert_array_equal(row, onp.arange(start, start + block))
    # The same draw on the real values picks the same windows.
    onp.testing.assert_array_equal(x, values[px])
    onp.testing.assert_array_equal(y, values[py])


def test_batches_are_reproducible_from_the_seed():
    ids = onp.arange(1000, dtype=onp.int32)
    first = [get_batch(ids, 4, 8, rng) for rng in [onp.random.default_rng(7)] for _ in range(3)]
    again = [get_batch(ids, 4, 8, rng) for rng in [onp.random.default_rng(7)] for _ in range(3)]
    other = get_batch(ids, 4, 8, onp.random.default_rng(8))
    for (x1, y1), (x2, y2) in zip(first, again):
        onp.testing.assert_array_equal(x1, x2)
        onp.testing.assert_array_equal(y1, y2)
    assert not onp.array_equal(first[0][0], other[0])
    assert not onp.array_equal(first[0][0], first[1][0])  # the generator moves on between calls


def test_every_start_position_can_be_drawn():
    ids = onp.arange(12, dtype=onp.int32)
    x, _ = get_batch(ids, 2000, 4, onp.random.default_rng(0))
    assert set(x[:, 0].tolist()) == set(range(12 - 4))  # starts 0..7: the last window ends at 11


def test_windows_without_targets_are_the_next_token_windows_and_fit_an_exact_text():
    ids = onp.arange(12, dtype=onp.int32)
    x, _ = get_batch(ids, 50, 4, onp.random.default_rng(0))
    onp.testing.assert_array_equal(get_windows(ids, 50, 4, onp.random.default_rng(0)), x)
    only = get_windows(ids[:4], 3, 4, onp.random.default_rng(0))  # no next token: one window
    onp.testing.assert_array_equal(only, [[0, 1, 2, 3]] * 3)


# ----------------------------------------------------------------------------- files


def test_read_text_file_reads_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo ✓\n", encoding="utf-8")
    assert read_text_file(str(path)) == "héllo ✓\n"
    assert load_corpus(str(path)) == "héllo ✓\n"
    # a byte-order mark (Windows editors write one) is no text to pretrain on
    path.write_bytes("\ufeffhéllo ✓\n".encode("utf-8"))
    assert read_text_file(str(path)) == "héllo ✓\n"
    assert load_corpus(str(path)) == "héllo ✓\n"


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, "not found"),
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"  \n\n ", "empty (only whitespace)"),
    ("binary.bin", b"abc\x00\x01\x02def", "binary"),
    ("notepad.txt", "héllo\r\n".encode("utf-16"), "is UTF-16 text"),  # not "binary"
    ("big-endian.txt", "héllo\n".encode("utf-16-be") + b"\n\x00", "binary"),  # no mark
    ("latin1.txt", "café crème".encode("latin-1"), "not UTF-8"),
])
@pytest.mark.parametrize("reader", [read_text_file, load_corpus])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, name, content, words, reader):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TinyLLMError) as err:
        reader(str(path))
    message = str(err.value)
    assert "\n" not in message
    assert name in message and words in message


@pytest.mark.parametrize("name, content, words", [
    ("notepad.txt", "héllo\r\nworld\r\n".encode("utf-16"), "is UTF-16 text"),
    ("binary.txt", b"hello\nwo\x00rld\n", "looks binary (it contains NUL bytes)"),
])
def test_a_file_of_lines_is_refused_as_utf16_or_binary_as_a_corpus_is(tmp_path, name, content,
                                                                      words):
    # `embed --data` and `classify --lines` gave UTF-16 a Windows-1252 hint and read NUL bytes
    path = tmp_path / name
    path.write_bytes(content)
    for reader in (read_text_file, read_lines):
        with pytest.raises(TinyLLMError, match=rf"^data file '.*{name}' {re.escape(words)}"):
            reader(str(path))


def test_bytes_from_standard_input_get_a_hint_without_a_file_to_convert():
    # `iconv ... /dev/stdin > /dev/utf8-stdin` cannot be run
    with pytest.raises(TinyLLMError) as err:
        decode_utf8(b"caf\xe9 au lait\n", "/dev/stdin")
    assert str(err.value) == ("/dev/stdin:1: not UTF-8 text (byte 0xe9 at column 4); in"
                              " Windows-1252 it is 'é': pipe it through `iconv -f cp1252 -t"
                              " utf-8` first, or save it as UTF-8")


def written_to_a_fifo(tmp_path, content):
    """The path of a FIFO that a thread writes `content` into (then closes), and the thread."""
    path = str(tmp_path / "pipe")
    os.mkfifo(path)

    def write():
        with open(path, "wb") as f:
            try:
                f.write(content)
            except BrokenPipeError:  # the reader stopped early: as it should for NUL bytes
                pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return path, writer


@pytest.mark.parametrize("content, message", [
    (b"\x00" * 100_000, "looks binary"),  # `cat /dev/zero |`: refused at its first chunk
    (b"a" * 100_000, r"is more than 0 MB: too large \(at most 0 MB"),  # not "is 1,074 MB: too
    # large (at most 1,074 MB"
])
def test_a_pipe_of_nul_bytes_or_too_much_text_is_refused_as_it_comes(tmp_path, monkeypatch,
                                                                       content, message):
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 50_000)
    path, writer = written_to_a_fifo(tmp_path, content)
    with pytest.raises(TinyLLMError, match=message):
        read_text_file(path)
    writer.join(timeout=10)


def test_a_byte_that_is_not_utf8_is_named_by_its_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"first line\nsecond line\nthe caf\xe9 on the third\n")
    with pytest.raises(TinyLLMError, match=r"t\.txt:3: not UTF-8 text \(byte 0xe9 at column 8\)"):
        read_text_file(str(path))


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(TinyLLMError, match="directory"):
        read_text_file(str(tmp_path))


def test_load_corpus_none_is_pydoc_topics_then_stdlib_docstrings():
    text = load_corpus(None)
    assert text == load_corpus("python-docs") == python_docs_corpus()
    topics = pydoc_corpus()
    assert len(topics) > 100_000  # about 460 KB of help texts
    assert text.startswith(topics) and text.endswith(stdlib_docstrings_corpus())
    assert len(text) > len(topics) + 500_000  # the docstrings add about 1.3 MB of prose
    assert "for" in text and "while" in text and "\x00" not in text


def test_stdlib_docstrings_are_deterministic_prose():
    text = stdlib_docstrings_corpus()
    assert text == stdlib_docstrings_corpus()  # same order on every call
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == len(set(paragraphs))  # repeats dropped
    assert not any(">>>" in p or p[0].isspace() or len(p) < MIN_PARAGRAPH_CHARS
                   for p in paragraphs)


def test_prose_paragraphs_keep_prose_and_drop_code_and_doctests():
    doc = ("Return the sum of the two numbers given, as a plain integer.\n\nExample:\n\n"
           "    total = add(1, 2)\n\n>>> add(1, 2)\n3\n\nShort line.\n\n"
           "A second paragraph that wraps\nover two lines of the docstring.")
    assert prose_paragraphs(doc) == [
        "Return the sum of the two numbers given, as a plain integer.",
        "A second paragraph that wraps over two lines of the docstring."]


def test_file_docstrings_reads_without_importing(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text('"""Module doc."""\nraise SystemExit("imported!")\n'
                      'class A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n')
    assert file_docstrings(str(source)) == ["Module doc.", "Class doc.", "Method doc."]
    (tmp_path / "bad.py").write_text("def (:\n", encoding="utf-8")
    assert file_docstrings(str(tmp_path / "bad.py")) == []


NESTED_DEFINITIONS = '''\
class A:
    def f(self): pass
    class B: pass
if X:
    def g(): pass
else:
    async def h(): pass
try:
    def i(): pass
except E:
    def j(): pass
finally:
    class C: pass
with open(p) as f:
    def k(): pass
for x in y:
    def l(): return lambda: (m for m in [1])
match v:
    case 1:
        def n(): pass
'''


def test_walk_statements_finds_the_definitions_ast_walk_finds_in_its_order():
    # it skips expressions; no statement can be inside one, so nothing else changes
    import ast
    import sysconfig

    def definitions(nodes):
        return [n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                   ast.AsyncFunctionDef, ast.Module))]

    trees = [ast.parse(NESTED_DEFINITIONS)]
    for path in stdlib_python_files(sysconfig.get_paths()["stdlib"])[::40]:
        try:
            with open(path, encoding="utf-8") as f:
                trees.append(ast.parse(f.read()))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            pass
    for tree in trees:
        assert definitions(walk_statements(tree)) == definitions(ast.walk(tree))
    names = [getattr(n, "name", "") for n in definitions(walk_statements(trees[0]))]
    assert sorted(names) == ["", "A", "B", "C", "f", "g", "h", "i", "j", "k", "l", "n"]


def test_a_file_named_like_an_embedded_corpus_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pydoc").write_text("my own text", encoding="utf-8")
    assert load_corpus("pydoc") == "my own text"


def test_unknown_corpus_name_lists_the_embedded_ones():
    with pytest.raises(TinyLLMError, match="pydoc"):
        load_corpus("no-such-corpus-name")


def test_check_long_enough():
    check_long_enough(onp.arange(9), 8, "the train split")  # exactly block_size + 1: fine
    with pytest.raises(TinyLLMError) as err:
        check_long_enough(onp.arange(8), 8, "the val split of x.txt")
    message = str(err.value)
    assert "the val split of x.txt has 8 tokens" in message and "block_size + 1 = 9" in message
    assert "--block-size" in message and "\n" not in message
    check_long_enough(onp.arange(8), 8, "the val split", next_token=False)  # masked: fine
    with pytest.raises(TinyLLMError, match=r"has 7 tokens, fewer than block_size = 8"):
        check_long_enough(onp.arange(7), 8, "the val split", next_token=False)
