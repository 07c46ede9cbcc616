"""One line rule for every reader of line-per-record files (fileio.split_lines): a line ends at
"\\n", "\\r\\n" or "\\r", never at U+2028, U+0085 or a form feed, and line N is the same line in
every reader's errors."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tinyllm.embed import read_lines
from tinyllm.errors import TinyLLMError
from tinyllm.fewshot import read_task
from tinyllm.fileio import decode_utf8, split_lines
from tinyllm.labelled_data import read_classification, read_instructions
from tinyllm.seq2seq_data import read_pairs

INSIDE = "\u2028\u0085\x0c\x0b\x1c\u2029"  # separators that str.splitlines would cut at
INSIDE_JSON = "\u2028\u0085\u2029"  # the ones a JSON string may hold unescaped


def test_split_lines_examples():
    assert split_lines("a\r\nb\u2028c\rd\n") == ["a", "b\u2028c", "d"]
    assert split_lines("") == [] and split_lines("x") == ["x"]
    assert split_lines("\n\n") == ["", ""]  # two empty lines, each ended


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n")), min_size=1),
       st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1), st.booleans())
def test_split_lines_gives_back_the_lines_whatever_their_ends(lines, ends, final_end):
    end = [ends[i % len(ends)] for i in range(len(lines))]
    if not final_end:
        end[-1] = ""
    # a "\r" end, then an empty line ended by "\n", is one "\r\n" end: not what was drawn
    assume(not any(end[i] == "\r" and lines[i + 1] == "" and end[i + 1] == "\n"
                   for i in range(len(lines) - 1)))
    text = "".join(line + e for line, e in zip(lines, end))
    expected = lines if final_end or lines[-1] else lines[:-1]  # a last line left empty is none
    assert split_lines(text) == expected


def test_decode_errors_count_lines_as_split_lines_does(tmp_path):
    data = b"one\rtwo\r\nthree\nfo\xe9ur\n"
    with pytest.raises(TinyLLMError, match=r"f:4: not UTF-8 text \(byte 0xe9 at column 3\)"):
        decode_utf8(data, "f")


# Each reader gets: a good record, a lone "\r", a good record holding separators, "\r\n", then a
# bad record on line 3. Each must keep the separators inside its record and blame line 3.
GOOD = {
    "cls.tsv": ("ham\thello", "spam\tbuy{s}now", "spam\t"),
    "cls.jsonl": ('{"text": "hello", "label": "ham"}', '{"text": "buy{s}now", "label": "spam"}',
                  '{"text": "", "label": "spam"}'),
    "ins.jsonl": ('{"instruction": "Say hi", "output": "hi"}',
                  '{"instruction": "Say{s}yo", "output": "yo"}', '{"instruction": "x"}'),
    "task.jsonl": ('{"input": "a", "output": "b"}', '{"input": "c{s}d", "output": "e"}', "{oops"),
    "pairs.tsv": ("one\ttwo", "th{s}ree\tfour", "five\t"),
    "lines.txt": ("first", "second{s}text", "\nfourth"),  # blank, but not at the end
}
READERS = {"cls.tsv": read_classification, "cls.jsonl": read_classification,
           "ins.jsonl": read_instructions, "task.jsonl": read_task, "pairs.tsv": read_pairs,
           "lines.txt": read_lines}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_reader_keeps_separators_inside_a_record_and_names_the_same_line(tmp_path, name):
    first, second, bad = GOOD[name]
    inside = INSIDE_JSON if name.endswith(".jsonl") else INSIDE
    second = second.replace("{s}", inside)
    path = tmp_path / name
    path.write_bytes((first + "\r" + second + "\r\n" + bad + "\n").encode())
    with pytest.raises(TinyLLMError) as err:
        READERS[name](str(path))
    assert f"{path}:3" in str(err.value) or f"{path}, line 3" in str(err.value) \
        or f"{path} line 3" in str(err.value), str(err.value)
    path.write_bytes((first + "\r" + second + "\r\n").encode())
    if name == "ins.jsonl":  # instructions need a few records to split; read them directly
        return
    read = READERS[name](str(path))
    assert any(inside in text for text in _strings(read))


def _strings(value):
    """Every str inside a reader's result (lists, tuples, dicts, dataclasses)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif hasattr(value, "__dict__"):
        yield from _strings(vars(value))
