"""Tests for tinyllm/embed.py and `tinyllm embed`: one vector per text, padding never changes a
vector, long texts as windows, cosine nearest neighbours, the .npy file, and one-line errors."""

from dataclasses import replace

import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.cli import main
from tinyllm.config import GPTConfig
from tinyllm import embed
from tinyllm.embed import (cosine_similarity, embed_sequences, embed_texts, encode_texts,
                           most_tokens_read, nearest, nearest_neighbour_agreement, read_lines,
                           window_vectors)
from tinyllm.errors import TinyLLMError
from tinyllm.models import init_gpt
from tinyllm.tokenizers import CharTokenizer

TOKENIZER = CharTokenizer.train("abcdefgh ")
CONFIG = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=12, n_layer=2, n_head=2, n_embd=16)
PARAMS = init_gpt(CONFIG, onp.random.default_rng(0), dtype="float64")
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 12
TINY = ["--tokenizer", "char", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--block-size", "16", "--batch-size", "4", "--eval-iters", "1", "--max-iters", "2",
        "--sample-tokens", "0"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


texts = st.text(alphabet="abcdefgh ", min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(alone=texts, others=st.lists(texts, min_size=1, max_size=4), bidirectional=st.booleans(),
       distance_bias=st.booleans())
def test_a_text_alone_equals_the_same_text_in_a_padded_batch(alone, others, bidirectional,
                                                             distance_bias):
    config = replace(CONFIG, distance_bias=distance_bias)
    single, _ = embed_texts(PARAMS, config, TOKENIZER, [alone], bidirectional)
    batch, _ = embed_texts(PARAMS, config, TOKENIZER, others + [alone] + others, bidirectional)
    onp.testing.assert_allclose(batch[len(others)], single[0], rtol=1e-5, atol=1e-6)


def test_the_vector_is_the_mean_of_the_final_hidden_states():
    ids = onp.asarray([TOKENIZER.encode("abc")])
    from tinyllm.models import bidirectional_hidden, gpt_hidden

    for bidirectional, hidden in ((True, bidirectional_hidden(PARAMS, ids, CONFIG)),
                                  (False, gpt_hidden(PARAMS, ids, CONFIG))):
        got = window_vectors(PARAMS, CONFIG, ids, onp.ones(ids.shape), bidirectional)
        onp.testing.assert_allclose(got, hidden.mean(axis=1), rtol=1e-12)
    # the encoder's and the decoder's vectors differ: the encoder's first token saw the others
    assert not onp.allclose(window_vectors(PARAMS, CONFIG, ids, onp.ones(ids.shape), True),
                            window_vectors(PARAMS, CONFIG, ids, onp.ones(ids.shape), False))


def test_a_text_longer_than_the_context_is_the_mean_of_its_windows():
    text = "abcdefgh abcdefgh"  # 17 characters, context 12, stride 6: windows at 0 and 5
    got, cut = embed_texts(PARAMS, CONFIG, TOKENIZER, [text], True)
    ids = onp.asarray(TOKENIZER.encode(text))
    windows = onp.stack([ids[0:12], ids[5:17]])
    want = window_vectors(PARAMS, CONFIG, windows, onp.ones(windows.shape), True).mean(axis=0)
    onp.testing.assert_allclose(got[0], want, rtol=1e-5)
    assert cut == 0


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5), max_windows=st.integers(1, 4),
       piece=st.integers(1, 20), seed=st.integers(0, 1000))
def test_texts_encoded_in_pieces_and_cut_short_give_the_same_vectors(lengths, max_windows, piece,
                                                                      seed):
    """encode_texts keeps at most the tokens the windows read and one more: the vectors and the
    count of cut texts are those of the texts encoded whole."""
    rng = onp.random.default_rng(seed)
    texts = ["".join(rng.choice(list("abcdefgh "), n)) for n in lengths]
    keep = most_tokens_read(CONFIG.block_size, max_windows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embed, "PIECE_CHARACTERS", piece)
        seqs = encode_texts(TOKENIZER, texts, keep)
    whole = [TOKENIZER.encode(t) for t in texts]
    assert seqs == [ids[:keep + 1] for ids in whole]
    got, cut = embed_sequences(PARAMS, CONFIG, seqs, True, max_windows=max_windows)
    want, want_cut = embed_sequences(PARAMS, CONFIG, whole, True, max_windows=max_windows)
    onp.testing.assert_array_equal(got, want)
    assert cut == want_cut == sum(len(ids) > keep for ids in whole)


def test_a_repeated_text_is_embedded_once_and_its_copies_tie_in_line_order():
    """Copies in batches of different padding got vectors a rounding error apart, so `nearest`
    put line 4 before line 1 for the same text, both at 1.000."""
    config = replace(CONFIG, distance_bias=True)
    params = init_gpt(config, onp.random.default_rng(1), dtype="float32")
    texts = ["abcdefgh abc", "abc", "hgf", "abc"] * 3  # batches of 2, padded to different widths
    done = []
    got, _ = embed_sequences(params, config, [TOKENIZER.encode(t) for t in texts], True,
                             batch_size=2, on_batch=done.append)
    for i, text in enumerate(texts):
        assert (got[i] == got[texts.index(text)]).all(), i  # bit for bit
    order, _ = nearest(got, got[1], k=6)
    assert list(order) == [1, 3, 5, 7, 9, 11]
    assert done == [9, 12]  # in lines, copies included: 3 + 6, then 3


def test_encoding_reports_its_progress_in_characters_as_it_goes(monkeypatch):
    monkeypatch.setattr(embed, "PIECE_CHARACTERS", 10)
    seen = []
    encode_texts(TOKENIZER, ["abc " * 10, "ab", "abcdefgh " * 3], 1000, seen.append)
    assert seen == sorted(seen) and len(seen) >= 6 and seen[-1] == 40 + 2 + 27
    seen.clear()
    encode_texts(TOKENIZER, ["ab"] * 25, 1000, seen.append)  # many short lines: every 10 characters
    assert seen == [10, 20, 30, 40, 50, 50]


def test_cosine_and_nearest_worked_example():
    vectors = onp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    onp.testing.assert_allclose(cosine_similarity(vectors, onp.array([2.0, 0.0])),
                                [1.0, 0.0, onp.sqrt(0.5), 0.0])
    order, scores = nearest(vectors, onp.array([0.0, 1.0]), k=2)
    assert list(order) == [1, 2] and scores[0] == pytest.approx(1.0)


def test_nearest_neighbour_agreement_worked_example():
    # two tight pairs of the same label: every nearest neighbour agrees
    vectors = onp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    same, chance = nearest_neighbour_agreement(vectors, ["a", "a", "b", "b"])
    assert same == 1.0 and chance == pytest.approx(4 / 12)  # 2 * (2 * 1) / (4 * 3)
    same, _ = nearest_neighbour_agreement(vectors, ["a", "b", "a", "b"])
    assert same == 0.0  # a text is never its own neighbour


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    out = folder / "run"
    result = invoke("pretrain", "--data", folder / "corpus.txt", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    lines = folder / "lines.txt"
    lines.write_text("The quick brown fox\nPack my box\nHow vexingly quick\nThe quick fox\n",
                     encoding="utf-8")
    return out, lines


def test_embed_writes_one_vector_per_line_as_npy(clm_run, tmp_path):
    run, lines = clm_run
    result = invoke("embed", "--checkpoint", run, "--data", lines, "--out", tmp_path / "v.npy")
    assert result.exit_code == 0, result.output
    vectors = onp.load(tmp_path / "v.npy", allow_pickle=False)
    assert vectors.shape == (4, 16) and vectors.dtype == onp.float32
    assert not onp.allclose(vectors[0], vectors[1])


def test_embed_query_prints_the_k_nearest_lines(clm_run):
    run, lines = clm_run
    result = invoke("embed", "--checkpoint", run, "--data", lines, "--query", "Pack my box", "-k", 2)
    assert result.exit_code == 0, result.output
    hits = [line for line in result.output.splitlines() if " line " in line]
    assert len(hits) == 2 and hits[0].startswith("1.000  line 2: Pack my box")


def test_embed_shows_its_progress_and_shortens_a_long_neighbour(clm_run, tmp_path):
    path = tmp_path / "lines.txt"
    long_line = ("The quick brown fox " * 100).strip()  # 1,999 characters
    path.write_text(f"Pack my box\n{long_line}\nHow vexingly quick\n", encoding="utf-8")
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--query", "quick fox",
                    "-k", 3)
    assert result.exit_code == 0, result.output
    assert "lines embedded: 3/3" in result.stderr
    hit = next(line for line in result.output.splitlines() if " line 2: " in line)
    assert hit.endswith("... (1,999 characters)") and len(hit) < 400


def test_embed_shows_the_progress_of_encoding_from_the_start(clm_run, tmp_path, monkeypatch):
    """A file of one huge line (or millions of short ones) takes minutes to encode: the count of
    characters encoded moves as it goes, before any line is embedded."""
    monkeypatch.setattr(embed, "PIECE_CHARACTERS", 100)
    path = tmp_path / "lines.txt"
    long_line = ("The quick brown fox " * 100).strip()  # 1,999 characters
    path.write_text(f"Pack my box\n{long_line}\n", encoding="utf-8")
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--out", tmp_path / "v")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    counts = [i for i, line in enumerate(lines) if line.startswith("characters encoded: ")]
    assert len(counts) >= 5 and lines[counts[-1]].startswith("characters encoded: 2,010/2,010")
    assert counts[-1] < next(i for i, line in enumerate(lines) if line.startswith("lines embedded"))


def test_the_note_on_cut_lines_says_where_they_were_cut(clm_run, tmp_path):
    """'longer than the context were cut' was wrong: a line of two windows is read whole."""
    path = tmp_path / "lines.txt"
    path.write_text("a" * 20 + "\n" + "a" * 72 + "\n" + "a" * 73 + "\n", encoding="utf-8")
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--query", "a")
    assert result.exit_code == 0, result.output  # context 16, windows 8 apart: 7 x 8 + 16 = 72
    assert ("note: 1 line(s) longer than 72 tokens (8 windows of the 16-token context) were cut:"
            " their vectors are of their first 72 tokens") in result.stderr


def test_a_nearest_line_is_printed_with_its_control_characters_escaped():
    from tinyllm.cli_encoder import shortened  # what `embed --query` prints of a line

    assert shortened("a\x1b[2Jb\tc") == "a\\x1b[2Jb\tc"  # an escape sequence: clear the screen
    assert shortened("\x07" * 200, most=3) == "\\x07\\x07\\x07... (200 characters)"


def test_a_query_longer_than_the_windows_is_noted_as_cut(clm_run, tmp_path):
    """A query is read as windows too; one past the last window was cut without a word."""
    path = tmp_path / "lines.txt"
    path.write_text("a\n", encoding="utf-8")
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--query", "a" * 72)
    assert result.exit_code == 0 and "--query" not in result.stderr, result.output
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--query", "a" * 73)
    assert result.exit_code == 0, result.output  # context 16, windows 8 apart: 7 x 8 + 16 = 72
    assert ("note: --query is longer than 72 tokens: its vector is of its first 72 tokens"
            in result.stderr)


@pytest.mark.parametrize("content, args, words", [
    ("one\n\nthree\n", ["--out", "{tmp}/v.npy"], ["lines.txt:2", "empty line"]),
    ("one\n", [], ["--out", "--query"]),
    ("one\n", ["--query", "  "], ["--query is empty"]),
    ("caf\u00e9\n", ["--out", "{tmp}/v.npy"], ["lines.txt", "text 1", "never saw"]),
    ("one\n", ["--query", "caf\u00e9"], ["--query: ", "'\u00e9'", "never saw"]),
    ("one\n", ["--out", "{tmp}/no/v.npy"], ["--out", "no/v.npy", "does not exist"]),
])
def test_embed_bad_input_is_one_line(clm_run, tmp_path, content, args, words):
    path = tmp_path / "lines.txt"
    path.write_text(content, encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]


def test_a_file_of_one_line_gives_that_line_s_vector(clm_run, tmp_path):
    """A one-line file without a final line end; the count said "1 lines"."""
    path = tmp_path / "one.txt"
    path.write_bytes(b"Pack my box")
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--out", tmp_path / "v.npy")
    assert result.exit_code == 0 and "1 line -> vectors of 16 numbers" in result.stderr, result.output
    params, config, tokenizer, bidirectional = embed.load_embedder(str(clm_run[0]))
    want, _ = embed_texts(params, config, tokenizer, ["Pack my box"], bidirectional)
    onp.testing.assert_array_equal(onp.load(tmp_path / "v.npy", allow_pickle=False), want)


def test_out_may_not_be_the_data_file(clm_run, tmp_path):
    """`--data lines.txt --out lines.txt` replaced the user's lines by the vectors."""
    path = tmp_path / "lines.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(path)
    for out in (path, tmp_path / "link.txt", tmp_path / "." / "lines.txt"):
        result = invoke("embed", "--checkpoint", clm_run[0], "--data", path, "--out", out)
        assert result.exit_code == 1 and "is the --data file" in result.output, result.output
    assert path.read_text(encoding="utf-8") == "one\ntwo\n"


@pytest.mark.parametrize("args", [["--query", "caf\u00e9"], ["--out", "{tmp}/no/v.npy"]])
def test_a_bad_query_or_out_is_refused_before_any_line_is_embedded(clm_run, tmp_path, args):
    """Not after minutes of embedding a large file."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("embed", "--checkpoint", clm_run[0], "--data", clm_run[1], *args)
    assert result.exit_code == 1 and "lines embedded" not in result.output, result.output


def test_vector_i_is_line_i_as_an_editor_counts_lines(tmp_path):
    # U+2028, U+0085 and a form feed are characters of a line, not line ends; a BOM is no text
    path = tmp_path / "lines.txt"
    path.write_bytes("\ufeffone\r\ntwo\u2028half\nthree\x85x\x0cy\nfour".encode("utf-8"))
    assert read_lines(str(path)) == ["one", "two\u2028half", "three\x85x\x0cy", "four"]
    path.write_bytes(b"one\ntw\xe9\n")
    with pytest.raises(TinyLLMError, match=r"lines\.txt:2: not UTF-8 text \(byte 0xe9 at column 3"):
        read_lines(str(path))
    path.write_text("one\ntwo\n\n \n", encoding="utf-8")  # blank lines an editor left at the end
    assert read_lines(str(path)) == ["one", "two"]
