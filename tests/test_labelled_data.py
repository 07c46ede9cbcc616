"""Tests for tinyllm/labelled_data.py: readers and their file:line errors, splits, balancing,
the char fallback and the embedded data sets."""

import csv
import json
import os
import sysconfig

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllm.data import file_docstrings, prose_paragraphs, stdlib_python_files
from tinyllm.errors import RecordErrors, TinyLLMError
from tinyllm.labelled_data import (SUBJECT_MODULES, UNK_TOKEN, balance, case_variants,
                                   default_classification_data, default_instruction_data,
                                   encode_with_fallback, first_sentence, label_ids,
                                   read_classification, read_instructions, split_three,
                                   with_case_copies, with_unknown_token, without_repeats)
from tinyllm.tokenizers import BPETokenizer, CharTokenizer


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_tsv_splits_on_the_first_tab_and_keeps_quotes(tmp_path):
    # csv's default quoting would join these lines into one field and lose rows
    path = write(tmp_path, "d.tsv", 'label\ttext\nham\tSay "hi\nspam\tWin a "prize\tnow"\n')
    assert read_classification(path) == [('Say "hi', "ham"), ('Win a "prize\tnow"', "spam")]


def test_headerless_tsv_uses_positions(tmp_path):
    path = write(tmp_path, "d.tsv", "ham\thello\nspam\tbuy\n")
    assert read_classification(path, text_column="1", label_column="0") == [
        ("hello", "ham"), ("buy", "spam")]
    assert read_classification(path) == [("ham", "hello"), ("spam", "buy")]  # text first by default


SMS = [("spam", "Win a prize now"), ("ham", "See you at six"), ("ham", "Call me later"),
       ("spam", "Free cash, reply YES"), ("ham", "Dinner is ready"), ("spam", "You won a car"),
       ("ham", "On my way home"), ("ham", "Thanks for the book")]


def test_a_headerless_file_with_the_label_first_is_read_label_first(tmp_path):
    # as the public SMS spam collection comes: "ham<TAB>text", no header, no extension
    notes = []
    path = write(tmp_path, "SMSSpamCollection", "".join(f"{l}\t{t}\n" for l, t in SMS))
    assert read_classification(path, log=notes.append) == [(t, l) for l, t in SMS]
    assert notes == [
        f"note: {path}: no .csv, .tsv, .jsonl or .json extension: read as TSV, as its first line"
        " holds a tab",
        f"note: {path}: column 0 holds 2 distinct values in 8 rows and column 1 holds 8: read"
        " column 0 as the label and column 1 as the text (give --text-column and --label-column"
        " to choose)"]
    # text first, as the default has it: read as it is, without a note
    notes.clear()
    path = write(tmp_path, "d.tsv", "".join(f"{t}\t{l}\n" for l, t in SMS))
    assert read_classification(path, log=notes.append) == [(t, l) for l, t in SMS]
    assert notes == []
    # texts that repeat (80 rows, 40 texts: not more than half) are many against 2 labels
    notes.clear()
    repeated = [(SMS[i % 8][0], f"{SMS[i % 8][1]} {i % 20}") for i in range(80)]
    path = write(tmp_path, "d.tsv", "".join(f"{l}\t{t}\n" for l, t in repeated))
    assert read_classification(path, log=notes.append) == [(t, l) for l, t in repeated]
    assert "column 0 holds 2 distinct values in 80 rows and column 1 holds 40" in notes[0]
    # columns given by position are read as given, whatever they hold
    path = write(tmp_path, "d.tsv", "".join(f"{l}\t{t}\n" for l, t in SMS))
    assert read_classification(path, text_column="0", label_column="1") == list(SMS)
    # too few rows to tell labels from texts: text first
    path = write(tmp_path, "d.tsv", "".join(f"{l}\t{t}\n" for l, t in SMS[:4]))
    assert read_classification(path) == list(SMS[:4])
    # unless the classes are known (a file to score): then the column of classes is the label
    notes.clear()
    assert read_classification(path, classes={"ham", "spam"}, log=notes.append) == [
        (t, l) for l, t in SMS[:4]]
    assert notes[0].startswith(f"note: {path}: column 0 holds 2 distinct values in 4 rows")


def test_a_csv_of_label_and_text_under_other_names_is_read_label_first(tmp_path):
    # another public layout: columns "v1" (the label) and "v2" (the text), three empty ones
    notes, records = [], [(l, f"{t}, once more") for l, t in SMS] + SMS
    rows = "".join(f'{l},"{t}",,,\n' for l, t in records)
    path = write(tmp_path, "spam.csv", "v1,v2,,,\n" + rows)
    assert read_classification(path, log=notes.append) == [(t, l) for l, t in records]
    assert [note.split(": ")[2] for note in notes] == [
        "column 0 holds 3 distinct values in 17 rows and column 1 holds 17",
        "read as the header, not a record"]


def test_a_label_column_of_mostly_single_values_is_refused_with_the_first_row(tmp_path):
    # the columns of the public YouTube spam files: the text and the class are columns 3 and 4
    rows = "".join(f"id{i},Person {i},2015-01-01,Comment {i},{i % 2}\n" for i in range(12))
    path = write(tmp_path, "yt.csv", "COMMENT_ID,AUTHOR,DATE,CONTENT,CLASS\n" + rows)
    with pytest.raises(TinyLLMError) as err:
        read_classification(path)
    assert str(err.value) == (
        f"{path}: column 1 holds 13 different labels in 13 records, so most classes would have one"
        " record: it is not a label column; choose the columns with --text-column and"
        " --label-column (its first row: 'COMMENT_ID', 'AUTHOR', 'DATE', 'CONTENT', 'CLASS')")
    assert read_classification(path, text_column="CONTENT", label_column="CLASS")[:2] == [
        ("Comment 0", "0"), ("Comment 1", "1")]
    with pytest.raises(TinyLLMError, match=r"yt.csv: column 1 \('AUTHOR'\) holds 12 different"):
        read_classification(path, text_column="CONTENT", label_column="AUTHOR")
    records = "".join(f'{{"text": "t", "label": "{i}"}}\n' for i in range(10))
    jsonl = write(tmp_path, "d.jsonl", records)
    with pytest.raises(TinyLLMError, match=r"d.jsonl: field 'label' holds 10 different labels"):
        read_classification(jsonl)
    # a file to score against known classes is not refused for it (each label is checked there)
    assert len(read_classification(path, text_column="CONTENT", label_column="AUTHOR",
                                   classes={f"Person {i}" for i in range(12)})) == 12
    # the first row of an untrusted file is shown escaped and cut
    rows = "".join(f"t{i}\x1b[2J,{i}\n" for i in range(12))
    with pytest.raises(TinyLLMError, match=r"its first row: 't0\\x1b\[2J', '0'\)$"):
        read_classification(write(tmp_path, "e.csv", rows))
    # nor is a small file
    assert len(read_classification(write(tmp_path, "s.csv", "text,label\na,1\nb,2\nc,3\n"))) == 3


def test_instruction_records_in_dollys_layout(tmp_path):
    path = write(tmp_path, "d.jsonl",
                 '{"instruction": "Sum", "context": "1 2", "response": "3", "category": "qa"}\n'
                 '{"instruction": "Greet", "context": "", "response": "Hello"}\n'
                 '{"instruction": "Name it", "input": "x", "output": "y"}\n')
    assert [(r["instruction"], r["input"], r["output"]) for r in read_instructions(path)] == [
        ("Sum", "1 2", "3"), ("Greet", "", "Hello"), ("Name it", "x", "y")]
    with pytest.raises(TinyLLMError, match=r"d.jsonl:1: empty 'response'"):
        read_instructions(write(tmp_path, "d.jsonl", '{"instruction": "a", "response": " "}\n'))


def test_a_file_without_extension_is_read_by_its_first_line(tmp_path):
    notes = []
    path = write(tmp_path, "records", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert read_classification(path, log=notes.append) == [("a", "x"), ("b", "y")]
    assert notes == [f"note: {path}: no .csv, .tsv, .jsonl or .json extension: read as JSONL, as"
                     " its first line starts with '{'"]
    path = write(tmp_path, "d.txt", "label,text\nx,hello there\n")
    assert read_classification(path, log=lambda m: None) == [("hello there", "x")]


def test_bytes_that_read_as_windows_1252_get_a_command_that_converts_them(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("label,text\nham,caf\u00e9 \u2019ok\u2019\n".encode("cp1252"))
    with pytest.raises(TinyLLMError) as err:
        read_classification(str(path))
    assert str(err.value) == (
        f"{path}:2: not UTF-8 text (byte 0xe9 at column 8); in Windows-1252 it is 'é': convert"
        f" the file with `iconv -f cp1252 -t utf-8 {path} > {tmp_path / 'utf8-d.csv'}`, or save"
        " it as UTF-8")
    # a UTF-8 file with one damaged byte: converting it would garble its other letters
    path.write_bytes("label,text\nham,caf\u00e9\n".encode("utf-8") + b"ham,bad \xe9\n")
    with pytest.raises(TinyLLMError, match=r"d.csv:3: not UTF-8 text \(byte 0xe9 at column 9\);"
                       r" save the file as UTF-8$"):
        read_classification(str(path))


def test_csv_with_named_columns_and_quoted_commas(tmp_path):
    path = write(tmp_path, "d.csv", 'id,body,cls\n1,"a, b",x\n2,c,y\n')
    assert read_classification(path, text_column="body", label_column="cls") == [
        ("a, b", "x"), ("c", "y")]


def test_a_record_without_the_field_names_the_fields_it_has(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"sentence": "a", "label": 1, "idx": 0}\n')
    with pytest.raises(TinyLLMError, match=r"d.jsonl:1: record has no 'text' \(its fields:"
                       r" 'sentence', 'label', 'idx'\)$"):
        read_classification(path)
    assert read_classification(path, text_column="sentence") == [("a", "1")]
    many = {f"f{i}": i for i in range(10)} | {"x" * 50: 1}
    path = write(tmp_path, "d.jsonl", json.dumps(many) + "\n")
    with pytest.raises(TinyLLMError, match=r"its fields: 'f0', 'f1', .*, 'f7' and 3 more\)$"):
        read_classification(path)


def test_jsonl(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": "x"}\n')
    assert read_classification(path) == [("a", "1"), ("b", "x")]


def test_a_json_array_of_records(tmp_path):  # the layout many data sets are exported in
    path = write(tmp_path, "d.json", '[\n {"text": "a", "label": "x"},\n {"text": "b", "label": 2}\n]\n')
    assert read_classification(path) == [("a", "x"), ("b", "2")]
    with pytest.raises(TinyLLMError, match="d.json:1: expected a JSON object, got int"):
        read_classification(write(tmp_path, "d.json", '[{"text": "a", "label": "x"}, 3]'))


@pytest.mark.parametrize("name,text,kwargs,message", [
    ("d.csv", "body,cls\nhi,x\n", {"text_column": "text", "label_column": "cls"}, r"d.csv:1: no column named 'text'"),
    ("d.tsv", "text\tlabel\nhi\tx\nlonely\n", {}, r"d.tsv:3: missing column"),
    ("d.tsv", "text\tlabel\nhi\tx\nho\t  \n", {}, r"d.tsv:3: empty label"),
    ("d.tsv", "text\tlabel\nhi\tx\n\ty\n", {}, r"d.tsv:3: empty text"),
    ("d.csv", "label,text\nx,hi\ny,ho\nx, \ny,hey\n", {}, r"d.csv:4: empty text"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', {}, r"d.jsonl:2: malformed JSON"),
    ("d.jsonl", '{"text": "a"}\n', {}, r"d.jsonl:1: record has no 'label' \(its fields: 'text'\)"),
    ("d.xlsx", "a\tb\n", {}, r"d.xlsx: unknown data format '.xlsx'"),
    ("d.csv", "label;text\nspam;hi there\n", {},  # a spreadsheet's "CSV" in many languages
     r"d.csv:1: missing column 1 \(this line has 1 field\); it holds ';' and no comma: save it"
     r" with commas \(or with tabs, as .tsv\)"),
    ("d.csv", "label\ttext\nspam\thi there\n", {},
     r"d.csv:1: missing column 1 \(this line has 1 field\); it holds tabs and no comma: name a"
     r" tab-separated file .tsv"),
    ("d.csv", 'label,text\nspam,hi\n"ham; hi, there"\n', {},  # a comma: no word of separators
     r"d.csv:3: missing column 1 \(this line has 1 field\)$"),
    ("d.txt", "label;text\nspam;hi there\n", {},  # no extension to go by: read as CSV
     r"d.txt:1: missing column 1 \(this line has 1 field\); it holds ';' and no comma: save it"),
    ("d.tsv", "label,text\nspam,hi there\n", {},
     r"d.tsv:1: missing column 1 \(this line has 1 field\); it holds commas and no tab: name a"
     r" comma-separated file .csv"),
    ("d.tsv", "text\tlabel\nhi\tx\nlonely\n", {}, r"d.tsv:3: missing column 1 \(this line has 1"
     r" field\)$"),  # no comma: no word of separators
])
def test_bad_classification_files_name_file_and_line(tmp_path, name, text, kwargs, message):
    with pytest.raises(TinyLLMError, match=message):
        read_classification(write(tmp_path, name, text), **kwargs)


def test_a_byte_order_mark_is_dropped_and_a_bad_byte_named_by_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\r\nhello,ham\r\n".encode("utf-8") + b"caf\xe9,spam\r\n")
    with pytest.raises(TinyLLMError, match=r"d\.csv:3: not UTF-8 text \(byte 0xe9 at column 4\)"):
        read_classification(str(path))
    path.write_bytes("\ufefftext,label\r\nhello,ham\r\n".encode("utf-8"))
    assert read_classification(str(path)) == [("hello", "ham")]


@pytest.mark.parametrize("reader", [read_classification, read_instructions])
def test_a_file_that_cannot_be_read_is_named_for_what_it_is(tmp_path, reader):
    for missing in ("/nonexistent/x.csv", "/nonexistent/data"):  # not "unknown format"
        with pytest.raises(TinyLLMError, match="not found"):
            reader(missing)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(TinyLLMError, match="not a regular file"):  # never waits for a writer
        reader(str(fifo))
    (tmp_path / "x.csv").write_bytes(b"text,label\nhi\x00there,a\n")
    with pytest.raises(TinyLLMError, match="looks binary"):
        reader(str(tmp_path / "x.csv"))


def test_single_class_is_an_error():
    with pytest.raises(TinyLLMError, match="single class"):
        label_ids(["a", "a"])
    assert label_ids(["spam", "ham", "spam"]) == {"ham": 0, "spam": 1}


@pytest.mark.parametrize("bad", ["sp\x1b[2Jam", "spam\nham", "\x07"])
def test_a_label_with_a_control_character_is_refused(bad):
    # classify prints class names as they are: an escape sequence would reach the terminal
    with pytest.raises(TinyLLMError, match=r"^x\.jsonl: the label .* holds a control character"):
        label_ids(["ham", bad], "x.jsonl")
    assert label_ids(["ham", "spam é ✓"], "x.jsonl") == {"ham": 0, "spam é ✓": 1}


def test_instructions_json_array_and_jsonl(tmp_path):
    records = [{"instruction": "rev", "input": "ab", "output": "ba"}, {"instruction": "hi", "output": "yo"}]
    a = read_instructions(write(tmp_path, "a.json", json.dumps(records)))
    b = read_instructions(write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in records)))
    assert [r["line"] for r in a] == [1, 1] and [r["line"] for r in b] == [1, 2]
    assert [{**r, "line": 0} for r in a] == [{**r, "line": 0} for r in b] and a[1]["input"] == ""


def test_numbers_and_booleans_read_as_the_file_spells_them(tmp_path):
    # str(True) gave "True": a JSONL label true and a CSV label true were two classes
    text = '{"instruction": 7, "input": false, "output": true}\n{"instruction": "a", "output": 2.5}\n'
    records = read_instructions(write(tmp_path, "n.jsonl", text))
    assert [(r["instruction"], r["input"], r["output"]) for r in records] == [
        ("7", "false", "true"), ("a", "", "2.5")]
    text = '{"text": "yes it is", "label": true}\n{"text": "no", "label": false}\n'
    assert read_classification(write(tmp_path, "c.jsonl", text)) == [("yes it is", "true"),
                                                                      ("no", "false")]


def test_records_of_a_json_array_know_the_line_they_start_on(tmp_path):
    # a split is shuffled: an error found after it (a response too long for the context) can
    # name the record only by its line in the file
    records = [{"instruction": "rev", "input": "ab", "output": "ba"}, {"instruction": "hi", "output": "yo"},
               {"instruction": "a, [b]", "output": "c\n,d"}]
    text = "\n" + json.dumps(records, indent=2)  # records start on lines 3, 8 and 12
    assert [r["line"] for r in read_instructions(write(tmp_path, "a.json", text))] == [3, 8, 12]
    packed = '[{"instruction": "a", "output": "b"},\n\n  {"instruction": "c", "output": "d"}]'
    assert [r["line"] for r in read_instructions(write(tmp_path, "b.json", packed))] == [1, 3]
    with pytest.raises(TinyLLMError, match=r"c\.json:3: expected a JSON object, got list"):
        read_instructions(write(tmp_path, "c.json", '[\n{"instruction": "a", "output": "b"},\n[]]'))


def test_one_json_object_over_several_lines_is_named_as_such(tmp_path):
    # valid JSON, so not "malformed JSON at line 1": the layout is the problem
    text = json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2)
    with pytest.raises(TinyLLMError, match=r"d\.json: one JSON object over 8 lines, not a list"):
        read_instructions(write(tmp_path, "d.json", text))
    one_line = read_instructions(write(tmp_path, "e.json", '{"instruction": "a", "output": "b"}\n'))
    assert one_line == [{"instruction": "a", "input": "", "output": "b", "line": 1}]  # JSONL


@pytest.mark.parametrize("text,message", [
    ('{"instruction": "a", "output": "b"}\n{"output": "c"}\n',
     r"b.jsonl:2: record has no 'instruction' \(its fields: 'output'\)"),
    ('{"instruction": "a"}\n', r"b.jsonl:1: record has no 'output' \(its fields: 'instruction'\)"),
    ('{"instruction": "a", "output": "b"}\nnot json\n', r"b.jsonl:2: malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000,
     r"b.jsonl:2: .*deeply"),
    ("[" * 100_000 + "]" * 100_000, r"b.jsonl: .*deeply"),  # read as a JSON array
])
def test_bad_instruction_records(tmp_path, text, message):
    with pytest.raises(TinyLLMError, match=message):
        read_instructions(write(tmp_path, "b.jsonl", text))


@given(st.integers(3, 200), st.integers(0, 5))
def test_split_three_partitions(n, seed):
    items = list(range(n))
    train, val, test = split_three(items, (0.7, 0.1, 0.2), seed)
    assert sorted(train + val + test) == items and val and test and train
    assert split_three(items, (0.7, 0.1, 0.2), seed) == (train, val, test)  # seeded


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=40), st.integers(0, 3))
def test_balance_equalises_classes(labels, seed):
    examples = [(str(i), label) for i, label in enumerate(labels)]
    kept = balance(examples, seed)
    counts = {label: sum(1 for _, x in kept if x == label) for label in set(labels)}
    assert len(set(counts.values())) == 1 and set(kept) <= set(examples)
    assert min(labels.count(label) for label in set(labels)) == next(iter(counts.values()))


def test_char_fallback_counts_and_keeps_ids():
    tok = CharTokenizer.train("ab", special_tokens=("<|endoftext|>",))
    ext = with_unknown_token(tok)
    assert ext.special_tokens["<|endoftext|>"] == tok.special_tokens["<|endoftext|>"]
    unk = ext.special_tokens[UNK_TOKEN]
    assert encode_with_fallback(ext, "abé") == ([0, 1, unk], 1)
    with pytest.raises(TinyLLMError):
        encode_with_fallback(tok, "é")  # no fallback token: a clear error, never a traceback
    bpe = BPETokenizer.train("hello world", 260, special_tokens=("<|endoftext|>",))
    assert with_unknown_token(bpe) is bpe and encode_with_fallback(bpe, "é")[1] == 0


def test_embedded_sets_are_deterministic_and_balanced():
    data = default_classification_data()
    assert data == default_classification_data()
    labels = [label for _, label in data]
    assert len(data) == 1500 and all(labels.count(s) == 375 for s in SUBJECT_MODULES)
    assert len({text for text, _ in data}) == 1500  # no sentence twice, so none in two splits
    assert labels[:8] != sorted(labels[:8])  # shuffled, not in blocks of one subject


def test_embedded_sentences_are_labelled_by_the_module_they_document():
    """Wiring: each sentence is the first sentence of a docstring paragraph of a module of its
    label's subject, found again here by reading those modules' docstrings independently."""
    root = sysconfig.get_paths()["stdlib"]
    firsts = {subject: set() for subject in SUBJECT_MODULES}
    for subject, modules in SUBJECT_MODULES.items():
        for module in modules.split():
            single = os.path.join(root, module + ".py")
            paths = [single] if os.path.exists(single) else stdlib_python_files(
                os.path.join(root, module))
            for path in paths:
                for doc in file_docstrings(path):
                    firsts[subject].update(first_sentence(p) for p in prose_paragraphs(doc))
    for text, label in default_classification_data()[:200]:
        assert text in firsts[label] and 6 <= len(text.split()) <= 25


def test_instruction_tasks_are_correct():
    records = default_instruction_data(n=40)
    assert {r["instruction"] for r in records} == {"reverse the words", "uppercase",
                                                   "sort the words", "add"}
    for r in records:
        if r["instruction"] == "reverse the words":
            assert r["output"].split() == r["input"].split()[::-1]
        if r["instruction"] == "sort the words":
            assert r["output"].split() == sorted(r["input"].split())
        if r["instruction"] == "add":
            assert int(r["output"]) == sum(map(int, r["input"].split()))


def test_python_docs_instructions_are_ordinary_requests_with_short_answers():
    from tinyllm.labelled_data import first_sentence, python_docs_instructions, sentences

    records = python_docs_instructions(100, seed=1)
    assert records == python_docs_instructions(100, seed=1)  # the same file every time
    assert len(records) == 100 and len({r["instruction"].split()[0] for r in records}) == 5
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"]
        assert len(r["output"]) <= 400
    upper = [r for r in records if "capital letters" in r["instruction"]]
    assert upper and all(r["output"] == r["input"].upper() for r in upper)
    firsts = [r for r in records if r["instruction"].startswith("Give the first")]
    assert firsts and all(r["input"].startswith(r["output"]) for r in firsts)
    assert first_sentence("Return the sum. It is an int.") == "Return the sum."
    assert sentences("A b. C d. E.") == ["A b.", "C d.", "E."]


def test_without_repeats_worked_example():
    examples = [("hi", "a"), ("yo", "b"), ("hi", "b"), ("Hi", "a")]
    assert without_repeats(examples) == ([("hi", "a"), ("yo", "b"), ("Hi", "a")], 1)
    assert without_repeats(examples, earlier=[("yo", "a")]) == ([("hi", "a"), ("Hi", "a")], 2)


def test_case_copies_worked_example():
    examples = [("Hi Bob", "ham"), ("WIN now", "spam")]
    assert with_case_copies(examples) == examples + [
        ("HI BOB", "ham"), ("WIN NOW", "spam"), ("hi bob", "ham"), ("win now", "spam")]


def test_csv_rows_end_only_at_line_ends(tmp_path):
    # U+2028, U+0085 and a form feed are characters of a comment, not line ends (str.splitlines
    # would cut these rows in two); a quoted field may hold a real line end
    path = write(tmp_path, "d.csv", 'text,label\nnice\u2028song,ham\nbuy\x85now,spam\r\n'
                                    'a\x0cb,ham\n"two\r\nlines",spam\nlast,ham\n')
    assert read_classification(path) == [("nice\u2028song", "ham"), ("buy\x85now", "spam"),
                                         ("a\x0cb", "ham"), ("two\r\nlines", "spam"),
                                         ("last", "ham")]


@pytest.mark.parametrize("rows,line", [
    (['ham,"never closed', "spam,buy now", "ham,nice song"], 3),  # would swallow the file's end
    (['ham,"never closed', 'spam,"Hey, sub"', "ham,nice song"], 3),  # ... or the rows up to a quote
    (['ham,"He said "hi" there"', "spam,buy"], 3),
])
def test_an_unbalanced_double_quote_in_a_csv_is_an_error_naming_its_line(tmp_path, rows, line):
    path = write(tmp_path, "d.csv", "label,text\nspam,first\n" + "\n".join(rows) + "\n")
    with pytest.raises(TinyLLMError, match=rf"d\.csv:{line}: malformed CSV.*double quote"):
        read_classification(path)


def test_a_csv_field_longer_than_the_csv_modules_limit_is_read(tmp_path):
    import csv

    long_text = "word " * 40_000  # 200,000 characters, over csv's default 131,072
    path = write(tmp_path, "d.csv", f'text,label\n"{long_text}",ham\nshort,spam\n')
    limit = csv.field_size_limit()
    assert read_classification(path) == [(long_text, "ham"), ("short", "spam")]
    assert csv.field_size_limit() == limit  # put back as it was


@pytest.mark.parametrize("header", ["Text,Label", "TEXT,LABEL", "text,Label"])
def test_a_header_is_found_in_any_case(tmp_path, header):
    # read as data, "Text" would be a training text of a third class "Label"
    path = write(tmp_path, "d.csv", f"{header}\nhello,ham\nbuy,spam\n")
    assert read_classification(path) == [("hello", "ham"), ("buy", "spam")]
    assert read_classification(path, text_column=header.split(",")[0].lower(),
                               label_column="label") == [("hello", "ham"), ("buy", "spam")]


def test_a_header_name_matches_exactly_before_in_any_case(tmp_path):
    path = write(tmp_path, "d.csv", "Text,text,label\nA,a,x\nB,b,y\n")
    assert read_classification(path) == [("a", "x"), ("b", "y")]
    assert read_classification(path, text_column="Text") == [("A", "x"), ("B", "y")]


@pytest.mark.parametrize("name", ["d.csv", "d.tsv"])
def test_columns_given_by_position_still_skip_a_header_row(tmp_path, name):
    sep = "," if name.endswith("csv") else "\t"
    path = write(tmp_path, name, f"Label{sep}Text\nham{sep}hello\nspam{sep}buy\n")
    # the header row is not a record labelled "Label"
    assert read_classification(path, text_column="1", label_column="0") == [
        ("hello", "ham"), ("buy", "spam")]


@pytest.mark.parametrize("name,content,columns", [
    ("d.csv", "label,text\nham,hello\n", {"text_column": "label", "label_column": "label"}),
    ("d.csv", "ham,hello\n", {"text_column": "1"}),  # the label's default position is 1 too
    ("d.jsonl", '{"text": "hi", "label": "x"}\n', {"text_column": "label"}),
])
def test_text_and_label_from_the_same_column_is_refused(tmp_path, name, content, columns):
    with pytest.raises(TinyLLMError, match="--text-column and --label-column name the same"):
        read_classification(write(tmp_path, name, content), **columns)


def test_an_empty_column_name_is_refused_not_read_as_the_default(tmp_path):
    path = write(tmp_path, "d.csv", "label,text\nham,hello\n")
    with pytest.raises(TinyLLMError, match="--label-column is empty"):
        read_classification(path, label_column="")


SPAM_HAM = "spam,buy now\nham,hi there\nspam,cheap pills\nham,see you\n"
RECORDS = [("buy now", "spam"), ("hi there", "ham"), ("cheap pills", "spam"), ("see you", "ham")]


@pytest.mark.parametrize("name,sep", [("d.csv", ","), ("d.tsv", "\t")])
def test_a_header_of_other_names_is_found_by_its_label_on_no_other_row(tmp_path, name, sep):
    # "category" on no other row, spam and ham on two each: a header, not a class of one text
    path = write(tmp_path, name, f"category{sep}comment\n" + SPAM_HAM.replace(",", sep))
    notes = []
    assert read_classification(path, "1", "0", log=notes.append) == RECORDS
    assert notes == [f"note: {path}:1: read as the header, not a record: its label 'category' is"
                     " on no other row, while every other row's label is on two rows or more;"
                     " if it is a record, put a header row naming the columns text and label"
                     " above it"]
    # a header that names the columns text and label keeps a first record of a class of one
    rows = f"label{sep}text\nodd{sep}one of a kind\n" + SPAM_HAM.replace(",", sep)
    path = write(tmp_path, name, rows)
    assert read_classification(path, "1", "0", log=notes.append)[0] == ("one of a kind", "odd")


def test_a_first_row_whose_class_is_on_another_row_is_a_record(tmp_path):
    notes = []
    path = write(tmp_path, "d.csv", SPAM_HAM)
    assert read_classification(path, "1", "0", log=notes.append) == RECORDS
    # many classes, two texts each: every label repeats, so no row is a header
    many = "".join(f"class{i % 40},text {i}\n" for i in range(80))
    path = write(tmp_path, "m.csv", many)
    assert len(read_classification(path, "1", "0", log=notes.append)) == 80
    # a class of one text first, and another class of one text later: not a header either
    path = write(tmp_path, "d.csv", "odd,one\n" + SPAM_HAM + "rare,two\n")
    assert len(read_classification(path, "1", "0", log=notes.append)) == 6
    assert notes == []


def test_with_the_classes_known_a_header_is_a_row_whose_label_is_none_of_them(tmp_path):
    # a small test file: ham on one row only, yet "category" is no class the model knows
    notes = []
    path = write(tmp_path, "t.csv", "category,comment\nham,x\nspam,y\nspam,z\n")
    assert read_classification(path, "1", "0", {"ham", "spam"}, notes.append) == [
        ("x", "ham"), ("y", "spam"), ("z", "spam")]
    assert "its label 'category' is not one of the 2 classes trained on" in notes[0]
    path = write(tmp_path, "t.csv", "ham,x\nspam,y\n")  # a first record of a class known
    assert len(read_classification(path, "1", "0", {"ham", "spam"}, notes.append)) == 2
    path = write(tmp_path, "t.csv", "maybe,x\nperhaps,y\nspam,z\n")  # other rows unknown too
    assert len(read_classification(path, "1", "0", {"ham", "spam"}, notes.append)) == 3
    assert len(notes) == 1


@given(st.lists(st.sampled_from(["ham", "spam", "eggs", "a,b", "x y"]), min_size=1, max_size=30),
       st.booleans())
def test_no_record_is_taken_for_a_header_when_its_class_can_be_a_class(tmp_path_factory, labels,
                                                                       known):
    """A headerless file loses no record: each class is on two rows or more (a training file),
    or each label is a known class (a file scored by a model)."""
    labels = labels if known else labels + labels  # every class at least twice
    rows = [[label, f"text {i}"] for i, label in enumerate(labels)]
    path = tmp_path_factory.mktemp("h") / "d.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    notes = []
    read = read_classification(str(path), "1", "0", set(labels) if known else None, notes.append)
    assert read == [(text, label) for label, text in rows] and notes == []


def test_a_tsv_header_of_three_columns_is_split_into_three(tmp_path):
    # split on its first tab only, "label\ttext" was one column: the header was read as a
    # record and every label was "label-and-text"; the text, last, keeps its own tabs
    path = write(tmp_path, "d.tsv", "id\tlabel\ttext\n1\tspam\tbuy now\n2\tham\thi\tthere\n")
    expected = [("buy now", "spam"), ("hi\tthere", "ham")]
    assert read_classification(path) == expected
    assert read_classification(path, text_column="text", label_column="label") == expected
    assert read_classification(path, text_column="2", label_column="1") == expected
    path = write(tmp_path, "n.tsv", "1\tspam\tbuy now\n2\tspam\thi\tthere\n3\tham\tx\n4\tham\ty\n")
    assert read_classification(path, "2", "1")[1] == ("hi\tthere", "spam")  # no header: by position


def test_a_file_of_blank_rows_is_one_line(tmp_path):
    with pytest.raises(TinyLLMError, match=r"d\.csv: no records: every line is blank"):
        read_classification(write(tmp_path, "d.csv", ",\n , \n"))


# ----------------------------------------------------------------------------- all bad records at once


def raised(error_type, call, *args, **kwargs):
    with pytest.raises(error_type) as err:
        call(*args, **kwargs)
    return str(err.value)


def test_record_errors_give_the_first_in_full_the_next_three_and_a_count():
    def gather(messages):
        errors = RecordErrors()
        for message in messages:
            with errors.gathered():
                raise TinyLLMError(message)
        with errors.gathered():
            pass  # a good record adds nothing
        errors.raise_any()

    gather([])  # nothing gathered: nothing raised
    assert raised(TinyLLMError, gather, ["f:1: a"]) == "f:1: a"
    assert raised(TinyLLMError, gather, ["f:1: a", "f:2: b"]) == (
        "f:1: a (and 1 more bad record: f:2: b)")
    assert raised(TinyLLMError, gather, [f"f:{n}: x" for n in range(1, 7)]) == (
        "f:1: x (and 5 more bad records: f:2: x; f:3: x; f:4: x; 2 more)")
    with pytest.raises(ValueError):  # any other error is a bug, not a bad record: not kept
        with RecordErrors().gathered():
            raise ValueError("no")


@pytest.mark.parametrize("name,text,message", [
    ("d.csv", "text,label\nhi,x\n,y\nho,\nlonely\nok,x\n",
     "d.csv:3: empty text (and 2 more bad records: d.csv:4: empty label; d.csv:5: missing column 1"
     " (this line has 1 field))"),
    ("d.tsv", "hi\tx\n\ty\nho\t \n",
     "d.tsv:2: empty text (and 1 more bad record: d.tsv:3: empty label)"),
    ("d.jsonl", '{"text": "a", "label": "x"}\nnot json\n[1]\n{"text": "b"}\n',
     "d.jsonl:2: malformed JSON (Expecting value) (and 2 more bad records: d.jsonl:3: expected a"
     " JSON object, got list; d.jsonl:4: record has no 'label' (its fields: 'text'))"),
    ("d.json", '[{"text": "a", "label": "x"},\n 3,\n {"text": "", "label": "y"}]',
     "d.json:2: expected a JSON object, got int (and 1 more bad record: d.json:3: empty 'text')"),
])
def test_every_bad_record_of_a_classification_file_is_named_in_one_error(tmp_path, name, text,
                                                                          message):
    assert raised(TinyLLMError, read_classification, write(tmp_path, name, text)) == (
        message.replace(name, str(tmp_path / name)))


def test_every_bad_record_of_an_instruction_file_is_named_in_one_error(tmp_path):
    path = write(tmp_path, "b.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "c"}\n'
                 'not json\n{"instruction": "d", "output": "e"}\n{"instruction": "f"}\n')
    assert raised(TinyLLMError, read_instructions, path) == (
        f"{path}:2: record has no 'instruction' (its fields: 'output') (and 2 more bad records:"
        f" {path}:3: malformed JSON (Expecting value); {path}:5: record has no 'output' (its"
        " fields: 'instruction'))")


@pytest.mark.parametrize("name,sep", [("d.csv", ","), ("d.tsv", "\t")])
def test_a_header_found_by_its_labels_keeps_the_default_columns(tmp_path, name, sep):
    # "comment,category" above rows of text then label: a header by rule 3, and with no column
    # given the text is column 0 and the label column 1, as for a file without a header (the
    # columns were looked up by the names "text" and "label", which this header does not have)
    rows = "".join(f"{text}{sep}{label}\n" for text, label in RECORDS)
    path = write(tmp_path, name, f"comment{sep}category\n" + rows)
    notes = []
    assert read_classification(path, log=notes.append) == RECORDS
    assert "read as the header" in notes[0]
    path = write(tmp_path, name, f"comment{sep}category\n" + rows.replace("buy now", "odd one"))
    assert read_classification(path, classes={"spam", "ham"}, log=notes.append) == [
        ("odd one", "spam")] + RECORDS[1:]


def test_case_variants_are_labels_alike_but_for_case_and_spacing():
    assert case_variants(["spam", "Ham", "Spam", "ham", "eggs"]) == [["Ham", "ham"],
                                                                    ["Spam", "spam"]]
    assert case_variants(["not spam", "Not  Spam", "spam"]) == [["Not  Spam", "not spam"]]
    assert case_variants(["0", "1", "10"]) == []
    # a zero-width space is a format character: invisible in a terminal, yet another class
    assert case_variants(["spam", "spam\u200b", "ham"]) == [["spam", "spam\u200b"]]


@pytest.mark.parametrize("name,content", [
    ("d.jsonl", '{"text": "a", "label": "spam "}\n{"text": "b", "label": " spam"}\n'),
    ("d.json", '[{"text": "a", "label": "spam "}, {"text": "b", "label": " spam"}]'),
    ("d.csv", "text,label\na,spam \nb, spam\n"),
    ("d.tsv", "text\tlabel\na\tspam \nb\t spam\n")])
def test_spaces_around_a_label_are_dropped_in_every_format(tmp_path, name, content):
    # a JSONL label "spam " was a class apart from "spam", where a CSV one was not
    assert read_classification(write(tmp_path, name, content)) == [("a", "spam"), ("b", "spam")]


LONG_NUMBER = "1" * 5000  # more digits than Python converts to an int (4,300 by default)


@pytest.mark.parametrize("name,text,message", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": %s}\n' % LONG_NUMBER,
     r"d\.jsonl:2: 'label' is a number of 5,000 digits"),
    ("d.json", '[{"text": "a", "label": "x"},\n\n {"text": %s, "label": "y"}]' % LONG_NUMBER,
     r"d\.json:3: 'text' is a number of 5,000 digits"),
    ("d.jsonl", '%s\n' % LONG_NUMBER, r"d\.jsonl:1: expected a JSON object, got int"),
    ("d.json", '[\n{"text": "a", "label": "x"},\n{"text": "b", "label": -%s}]' % LONG_NUMBER,
     r"d\.json:3: 'label' is a number of 5,000 digits"),
])
def test_a_number_of_too_many_digits_is_an_error_naming_its_line(tmp_path, name, text, message):
    with pytest.raises(TinyLLMError, match=message):
        read_classification(write(tmp_path, name, text))
    record = text.replace('"text"', '"instruction"').replace('"label"', '"output"')
    with pytest.raises(TinyLLMError, match=message.replace("text", "instruction")
                       .replace("label", "output")):
        read_instructions(write(tmp_path, name, record))


@pytest.mark.parametrize("name,text,message", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "sp\\ud800"}\n',
     r"d\.jsonl:2: 'label' holds a lone surrogate \(a \\udXXX escape"),
    ("d.json", '[{"text": "a", "label": "x"},\n {"text": "\\udfffb", "label": "y"}]',
     r"d\.json:2: 'text' holds a lone surrogate"),
])
def test_a_lone_surrogate_is_refused_with_its_line(tmp_path, name, text, message):
    # no UTF-8 text holds one: saving the labels (config.json) or printing them would fail
    with pytest.raises(TinyLLMError, match=message):
        read_classification(write(tmp_path, name, text))
    pair = '{"text": "smile \\ud83d\\ude00", "label": "x"}\n{"text": "b", "label": "y"}\n'
    assert read_classification(write(tmp_path, "p.jsonl", pair))[0] == ("smile \U0001F600", "x")
    record = '{"instruction": "a", "input": "\\ud800", "output": "b"}\n'
    with pytest.raises(TinyLLMError, match=r"i\.jsonl:1: 'input' holds a lone surrogate"):
        read_instructions(write(tmp_path, "i.jsonl", record))


@pytest.mark.parametrize("value,message", [
    ("NaN", "'label' is NaN, which is not a JSON number"),
    ("Infinity", "'label' is Infinity, which is not a JSON number"),
    ("-Infinity", "'label' is -Infinity, which is not a JSON number"),
    ("1e400", r"'label' is a number beyond a float's range \(1e400\)"),
])
def test_nan_and_infinities_are_refused_with_their_line(tmp_path, value, message):
    # Python's json reads them, but they are not JSON: a label "NaN" would be a class
    text = '[{"text": "a", "label": "x"},\n {"text": "b", "label": %s}]' % value
    with pytest.raises(TinyLLMError, match=r"d\.json:2: " + message):
        read_classification(write(tmp_path, "d.json", text))
    with pytest.raises(TinyLLMError, match=r"d\.jsonl:1: 'output' is"):
        read_instructions(write(tmp_path, "d.jsonl", '{"instruction": "a", "output": %s}' % value))


def test_a_field_given_twice_in_a_record_is_refused_with_its_line(tmp_path):
    # json keeps the last of a repeated key without a word: which text did the user mean?
    text = '{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "text": "c"}\n'
    with pytest.raises(TinyLLMError, match=r"d\.jsonl:2: the record gives 'text' more than once"):
        read_classification(write(tmp_path, "d.jsonl", text))
    record = '{"instruction": "a", "output": "b", "output": "c"}'
    with pytest.raises(TinyLLMError, match=r"d\.json:1: the record gives 'output' more than"):
        read_instructions(write(tmp_path, "d.json", f"[{record}]"))
    # a key repeated that no reader reads is left alone
    assert read_classification(write(tmp_path, "e.jsonl", '{"text": "a", "label": "x", "id": 1,'
                                     ' "id": 2}\n{"text": "b", "label": "y"}\n'),
                               classes={"x", "y"}) == [("a", "x"), ("b", "y")]


@pytest.mark.parametrize("text", ["[]", "[\n]\n"])
def test_an_empty_json_array_is_no_records(tmp_path, text):
    # it was read as no examples: a split error blaming --data, or a traceback when scored
    path = write(tmp_path, "e.json", text)
    with pytest.raises(TinyLLMError, match=r"^.*e\.json: no records$"):
        read_classification(path)
    with pytest.raises(TinyLLMError, match=r"^.*e\.json: no records$"):
        read_classification(path, classes={"a", "b"})
    with pytest.raises(TinyLLMError, match=r"^.*e\.json: no records$"):
        read_instructions(path)


@pytest.mark.parametrize("name,text", [("d.csv", "text,label\nhi,a\nyo,b\n"),
                                       ("d.tsv", "text\tlabel\nhi\ta\nyo\tb\n")])
@pytest.mark.parametrize("flag", ["text_column", "label_column"])
def test_only_ascii_digits_are_a_column_position_and_a_huge_one_is_refused(tmp_path, name, text,
                                                                         flag):
    # "²" passes str.isdigit() but int() refuses it: it is a name, and no column has it
    path = write(tmp_path, name, text)
    with pytest.raises(TinyLLMError, match=rf"d\.{name[-3:]}:1: no column named '²'"):
        read_classification(path, **{flag: "²"})
    shown = "--" + flag.replace("_", "-")
    with pytest.raises(TinyLLMError, match=rf"^{shown} 1{{20}}\.\.\.: a column position of 5,000"
                                           " digits; no file has that many columns"):
        read_classification(path, **{flag: "1" * 5000})  # int() refuses over 4,300 digits
    assert read_classification(path, text_column="0", label_column="1") == [("hi", "a"),
                                                                           ("yo", "b")]


def test_header_names_in_a_missing_column_error_are_shown_escaped(tmp_path):
    # a header is untrusted: its escape sequences would clear the screen, retitle the terminal
    path = write(tmp_path, "e.csv", "te\x1b[2J\x1b]0;pwned\x07xt,label\nhello,spam\nbye,ham\n")
    with pytest.raises(TinyLLMError) as err:
        read_classification(path, text_column="body")
    assert str(err.value) == (f"{path}:1: no column named 'body' (columns:"
                              " 'te\\x1b[2J\\x1b]0;pwned\\x07xt', 'label')")


@pytest.mark.parametrize("name,header,message", [
    ("d.csv", "text,category", "no column named 'label' (columns: 'text', 'category'); give"
                               " --label-column"),
    ("d.tsv", "Label\tcomment", "no column named 'text' (columns: 'Label', 'comment'); give"
                                " --text-column"),
])
def test_a_header_naming_text_or_label_alone_is_a_header_missing_the_other(tmp_path, name,
                                                                         header, message):
    # it was read as a record of text "text", class "category" (or split badly)
    sep = "\t" if name.endswith(".tsv") else ","
    fields = [(f"message {i}", "ab"[i % 2]) for i in range(20)]
    rows = "".join(sep.join(f if "text" in header else f[::-1]) + "\n" for f in fields)
    path = write(tmp_path, name, f"{header}\n{rows}")
    with pytest.raises(TinyLLMError) as err:
        read_classification(path)
    assert str(err.value) == f"{path}:1: {message}"
    with pytest.raises(TinyLLMError, match="no column named"):
        read_classification(path, classes={"a", "b"})
    # with the other column named, the file is read
    other = header.split(sep)[1]
    given = {"label_column": other} if "text" in header else {"text_column": other}
    assert len(read_classification(path, **given)) == 20


@pytest.mark.parametrize("first,fmt", [("[URGENT] win a prize,spam", "CSV"),
                                       ("{free} ringtones\tspam", "TSV")])
def test_a_first_text_that_starts_with_a_bracket_is_not_taken_for_json(tmp_path, first, fmt):
    # it was read as JSON and failed with "malformed JSON" at line 1
    sep = "\t" if fmt == "TSV" else ","
    rows = [first, f"spam again{sep}spam"] + [f"message {i}{sep}{'ab'[i % 2]}" for i in range(20)]
    notes = []
    path = write(tmp_path, "d.txt", "\n".join(rows) + "\n")
    examples = read_classification(path, log=notes.append)
    assert examples[0] == (first.split(sep)[0], "spam") and len(examples) == 22
    assert notes[0] == (f"note: {path}: no .csv, .tsv, .jsonl or .json extension: read as {fmt},"
                        f" as its first line holds {'a' if fmt == 'TSV' else 'no'} tab and,"
                        f" though it starts with {first[0]!r}, is not JSON")
    # JSON records are still read as JSON: a JSONL line, or an array over lines or on one
    records = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)]
    for text in ("".join(json.dumps(r) + "\n" for r in records), json.dumps(records, indent=2),
                 json.dumps(records)):
        assert len(read_classification(write(tmp_path, "j.txt", text))) == 4
