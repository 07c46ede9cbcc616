"""Labelled data for fine-tuning: file readers, splits, balancing, the embedded default data
sets and the char-tokenizer fallback for characters the pretraining text never had.

Classification files (one example per line, `text` and `label`; labels are arbitrary strings,
the spaces around one dropped in every format):
    .csv    comma-separated, read with Python's csv module (quoted fields may contain commas
            and line ends; a double quote inside one is written twice, and a lone one is an
            error naming its line rather than a field that swallows the rows after it)
    .tsv    tab-separated, each line split into as many fields as the header has columns (two
            without a header, or as many as the columns given by position need), the last field
            keeping any further tabs; never unquoted: csv's default quoting would silently join
            lines that contain a double quote and lose rows
    .jsonl  one JSON object per line: {"text": "...", "label": "..."}
    .json   a JSON array of such objects (or JSONL under that name)
A file with no extension, or .txt (as some public data sets come), is read by its first
non-blank line (`_format_of`): "{" first makes it JSONL, "[" a JSON array (when that line is
JSON, or opens an array or object spread over lines: a first text "[URGENT] win" is no JSON), a
tab TSV, anything else CSV; a note says which.

A CSV/TSV header is optional. The first row is the header when (`first_row_is_header`, the one
place this rule lives):
    1. a column is given by name (`--text-column review`): the row must hold that name;
    2. it holds the names "text" and "label" (in any case: "Text" is "text"), or, no column
       given, one of them ("text,category": the missing column is then an error that lists the
       header's columns, not a first record of text "text" and class "category"); or
    3. read by position, its label cannot be a class while every other row's can: it is not one
       of the classes trained on and every other row's label is (a --val-data or --test-data
       file, `tinyllm classify --data`), or, in a training file, no other row has that label
       while every other row's label is on two rows or more ("category,comment" above rows
       labelled spam and ham).
Otherwise the file has no header, and the columns are given by position (`--text-column 0
--label-column 1` is the default meaning for a headerless file: text first), unless neither is
given and column 0 holds what labels look like while column 1 holds what texts look like
(`columns_by_content`): then the label is column 0 and the text column 1, with a note, as in
files that put the label first. A header found by rule 3 is said in a one-line note, and its
columns are still given by position (its names are not "text" and "label"); a first record it
takes for a header is kept by putting a header row that names the columns "text" and "label"
above it. A training file whose label column holds more distinct values than half its records
(`_check_labels_repeat`) is refused: that column holds texts or ids, not classes.

Instruction files: a JSON array, or JSONL, of records {"instruction": ..., "input": ...,
"output": ...} (the Alpaca layout; "input" may be absent or empty, meaning none).

Every problem a user can fix is a TinyLLMError naming the file and the line.
Plain numpy only: nothing here is differentiated.
"""

import csv
import io
import json
import math
import os
import random
import re
import sysconfig
import unicodedata
from collections import Counter
from typing import NamedTuple

import numpy as onp

from .data import (file_docstrings, module_name, prose_paragraphs, stdlib_docstrings_corpus,
                   read_text_file, stdlib_functions, stdlib_python_files)
from .errors import RecordErrors, TinyLLMError
from .fileio import split_lines

UNK_TOKEN = "<|unk|>"  # the char tokenizer's fallback token, added at fine-tuning time
SPLIT_CLASSIFY = (0.7, 0.1, 0.2)  # train / validation / test
SPLIT_INSTRUCT = (0.85, 0.05, 0.10)


# ----------------------------------------------------------------------------- reading files


def _read_text(path):
    """The text of a UTF-8 data file (a byte-order mark dropped), read as pretraining text is
    (data.read_text_file: its size bounded before it is read), with one-line errors. A pipe is
    refused: a fine-tuning run hashes its data files, to read them again on --resume."""
    return read_text_file(path, allow_pipe=False)


def _format_of(path, text=None, log=None):
    """"csv", "tsv", "jsonl" or "json", by the file's extension. A file with no extension, or
    .txt, as some public data sets come (a tab-separated file named `SMSSpamCollection`, say),
    is read by what its first non-blank line holds when its `text` is given: "{" first -> JSONL,
    "[" -> a JSON array (either only if the line is JSON or opens it: `_opens_json`), a tab ->
    TSV, else CSV; `log` is told which. Without `text`, or with another extension, an unknown
    format is an error."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".jsonl", ".json"):
        return ext[1:]
    if text is not None and ext in ("", ".txt"):
        first = next((line for line in split_lines(text) if line.strip()), "").lstrip()
        json_like = _opens_json(first)
        fmt, why = (("jsonl", "its first line starts with '{'") if json_like and first[0] == "{"
                    else ("json", "it starts with '['") if json_like and first[0] == "["
                    else ("tsv", "its first line holds a tab") if "\t" in first
                    else ("csv", "its first line holds no tab"))
        if first.startswith(("{", "[")) and not json_like:
            why += f" and, though it starts with {first[0]!r}, is not JSON"
        if log is not None:
            log(f"note: {path}: no .csv, .tsv, .jsonl or .json extension: read as {fmt.upper()},"
                f" as {why}")
        return fmt
    raise TinyLLMError(f"{path}: unknown data format {ext or '(no extension)'!r};"
                       " use .csv, .tsv, .jsonl or .json")


def _opens_json(first):
    """Does a file whose first non-blank line is `first` (its leading spaces stripped) hold JSON
    records? Yes when that line is JSON or opens an array or object spread over lines ("[",
    "{" or "[{..."); a first text that only starts with a bracket ("[URGENT] win,spam") is no.
    """
    if not first.startswith(("{", "[")):
        return False
    if first.rstrip() in ("{", "[") or re.match(r"\[\s*\{", first):
        return True
    try:
        _loads(first)
    except json.JSONDecodeError:
        return False
    except RecursionError:  # "[[[[...": JSON, too deep to be a record (an error says so)
        return True
    return True


def _header_index(header, name):
    """Index of `name` in a header row, matched exactly or else in any case; None if absent.

    Example: ["Label", "Text"], "text" -> 1 (a header written "Text" is still a header).
    """
    if name in header:
        return header.index(name)
    folded = [column.casefold() for column in header]
    return folded.index(name.casefold()) if folded.count(name.casefold()) == 1 else None


def _column(header, name, path, default_index, line=1, flag=None):
    """Index of column `name` (a header name, or a 0-based position given as digits); an error
    names the header's `line` and, when `flag` is given (the name was not), the flag that names
    another column. The header's names are shown escaped: no escape sequence of a file's reaches
    the terminal."""
    if name is None:
        return default_index
    index = None if header is None else _header_index(header, name)
    if index is not None:
        return index
    if _by_position(name):
        return int(name)
    have = _shown_fields(header) if header else "no header"
    raise TinyLLMError(f"{path}:{line}: no column named {name!r} (columns: {have})"
                       + (f"; give {flag}" if flag else ""))


def _rows_tsv(text, width=2):
    """(line number, fields) for each non-blank line, split on its first `width` - 1 tabs only:
    the last field keeps any further tabs (a text there may hold them), and quotes are kept.

    Example: 'ham\\tSay "hi", ok\\tbye' -> ['ham', 'Say "hi", ok\\tbye'] (width 2).
    """
    for number, line in enumerate(split_lines(text), start=1):
        if line.strip():
            yield number, line.split("\t", width - 1)


def _tsv_width(text, text_column, label_column):
    """How many fields each line of a TSV text is split into: as many as its header has columns
    (rules 1 and 2 of the module docstring), or, without one, as the columns given by position
    need. Example: a header "id\\tlabel\\ttext" -> 3; no header, --text-column 2 -> 3; none -> 2."""
    first = next((line for line in split_lines(text) if line.strip()), "")
    names = [f.strip() for f in first.split("\t")]
    if _named_header(names, text_column, label_column):
        return len(names)
    return max(int(text_column or 0), int(label_column or 1)) + 1


def _rows_csv(text, path):
    """(line number, fields) for each non-blank record of a CSV text.

    Lines end as in fileio.split_lines (the csv module's own rule is the same). Quoting is
    strict: a lone double quote would otherwise open a field that swallows the rows after it.
    """
    # csv refuses a field over 128 KiB; a long text is data, so lift that while reading this one
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))
    reader, start = csv.reader(io.StringIO(text, newline=""), strict=True), 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                yield start, fields
            start = reader.line_num + 1
    except csv.Error as err:
        raise TinyLLMError(f"{path}:{start}: malformed CSV in the row that starts on this line"
                           f" ({err}); is a double quote unbalanced? (inside a quoted field,"
                           " write it twice)") from None
    finally:
        csv.field_size_limit(limit)


def read_classification(path, text_column=None, label_column=None, classes=None, log=print):
    """Read (text, label) pairs from a .csv, .tsv, .jsonl or .json (an array) file; errors name
    file:line (or record). `classes`: the labels a model was (or will be) trained on, when they
    are known, which tells a CSV/TSV header apart from a record (see `first_row_is_header`);
    `log` is told when a header is found that way."""
    for flag, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column == "":  # an unset shell variable, say: not the default column, unseen
            raise TinyLLMError(f"{flag} is empty: give a column name or position, or leave it out")
        if column is not None and _DIGITS.fullmatch(str(column)) and len(str(column)) > 6:
            shown = str(column) if len(str(column)) <= 20 else f"{str(column)[:20]}..."
            raise TinyLLMError(f"{flag} {shown}: a column position of {len(str(column)):,} digits;"
                               " no file has that many columns (positions count from 0)")
    text = _read_text(path)  # first: a missing file is "not found", whatever its name
    fmt = _format_of(path, text, log)
    if fmt in ("jsonl", "json"):
        if (text_column or "text") == (label_column or "label"):
            raise TinyLLMError(f"{path}: --text-column and --label-column name the same field")
        errors, examples = RecordErrors(), []
        for n, rec in _json_records(text, path, errors):
            with errors.gathered():
                examples.append((_str_field(rec, text_column or "text", path, n),
                                 _str_field(rec, label_column or "label", path, n).strip()))
        errors.raise_any()
        if not examples:  # "[]": named here, not taken for a split too small to make
            raise TinyLLMError(f"{path}: no records")
        if classes is None:
            _check_labels_repeat(examples, path, f"field {label_column or 'label'!r}")
        return examples
    rows = list(_rows_tsv(text, _tsv_width(text, text_column, label_column)) if fmt == "tsv"
                else _rows_csv(text, path))
    if not rows:
        raise TinyLLMError(f"{path}: no records: every line is blank")
    if text_column is None and label_column is None and not _named_header(
            [f.strip() for f in rows[0][1]], None, None):
        text_column, label_column = columns_by_content(rows, path, log, classes)
    has_header, note = first_row_is_header(rows, text_column, label_column, classes)
    if note:
        log(f"note: {path}:{rows[0][0]}: read as the header, not a record: {note}; if it is a"
            " record, put a header row naming the columns text and label above it")
    header = [f.strip() for f in rows[0][1]] if has_header else None
    named = has_header and not note  # a header found by its labels (rule 3) has other names:
    # its columns stay positions, text 0 and label 1 unless given
    line = rows[0][0]
    ti = _column(header, text_column or ("text" if named else None), path, 0, line,
                 None if text_column else "--text-column")
    li = _column(header, label_column or ("label" if named else None), path, 1, line,
                 None if label_column else "--label-column")
    if ti == li:
        raise TinyLLMError(f"{path}: --text-column and --label-column name the same column ({ti})")
    first_row = rows[0][1]
    errors, examples, label_of = RecordErrors(), [], {}
    for k, (number, fields) in enumerate(rows):
        rows[k] = None  # each row's fields go as its example comes: a file of many short rows
        # is held once, not twice (a list and a tuple a row cost some 40 bytes a byte of file)
        if k or not has_header:
            with errors.gathered():
                text, label = _row_example(fields, ti, li, path, number, fmt)
                examples.append((text, label_of.setdefault(label, label)))  # one string a class
    errors.raise_any()
    if not examples:
        raise TinyLLMError(f"{path}: no examples after the header")
    if classes is None:
        where = f"column {li}" + (f" ({header[li]!r})" if header and li < len(header) else "")
        first = "" if header else f" (its first row: {_shown_fields(first_row)})"
        _check_labels_repeat(examples, path, where, first)
    return examples


def _check_labels_repeat(examples, path, where, first=""):
    """Refuse a training file whose labels are mostly one of a kind (10 records or more, more
    distinct labels than half of them): its label column holds texts or ids, not classes, and
    the run would fail later with one class after another found in a single record.

    Example: 350 records of a CSV whose column 1 is an author's name -> "d.csv: column 1 holds
    342 different labels in 350 records: ... choose the columns with --text-column and
    --label-column"."""
    labels = {label for _, label in examples}
    if len(examples) >= 10 and len(labels) > len(examples) / 2:
        raise TinyLLMError(f"{path}: {where} holds {len(labels):,} different labels in"
                           f" {len(examples):,} records, so most classes would have one record:"
                           " it is not a label column; choose the columns with --text-column and"
                           f" --label-column{first}")


def _row_example(fields, ti, li, path, number, fmt):
    """(text, label) of one row of a file read as `fmt` ("csv" or "tsv"); a missing column or an
    empty field names its line."""
    if max(ti, li) >= len(fields):
        raise TinyLLMError(f"{path}:{number}: missing column {max(ti, li)} (this line has"
                           f" {len(fields)} field{'s' * (len(fields) != 1)})"
                           + _separator_hint(fmt, fields))
    label = fields[li].strip()
    if not label:
        raise TinyLLMError(f"{path}:{number}: empty label")
    if not fields[ti].strip():  # named here: once shuffled into a split it cannot be found
        raise TinyLLMError(f"{path}:{number}: empty text")
    return fields[ti], label


def _separator_hint(fmt, fields):
    """Why a line read as `fmt` ("csv" or "tsv") may have come out as one field: spreadsheets in
    many languages save "CSV" separated by semicolons, some tools save tabs in a .csv, and a
    comma-separated file may be named .tsv. "" when nothing suggests it.

    Example: ("csv", ["spam;Check out my channel"]) -> "; it holds ';' and no comma: save it
    with commas (or with tabs, as .tsv)"; ("csv", ['spam, "hi"']) -> "" (a comma: the row is
    short for another reason); ("tsv", ["spam,hi"]) -> "; it holds commas and no tab: name a
    comma-separated file .csv"."""
    if len(fields) != 1:
        return ""
    if fmt == "tsv":
        return "; it holds commas and no tab: name a comma-separated file .csv" if (
            "," in fields[0] and "\t" not in fields[0]) else ""
    if "," in fields[0]:
        return ""
    if "\t" in fields[0]:
        return "; it holds tabs and no comma: name a tab-separated file .tsv"
    if ";" in fields[0]:
        return "; it holds ';' and no comma: save it with commas (or with tabs, as .tsv)"
    return ""


def columns_by_content(rows, path, log=print, classes=None):
    """(text column, label column) of a file read by position, its columns not named: text 0 and
    label 1, unless column 0 holds what labels look like and column 1 what texts look like, as
    in files that put the label first (`ham<TAB>Ok, see you at six`); `log` is told of a swap.

    Labels look like few values, each on four rows or more on average: at most a quarter as many
    distinct ones as rows. Texts look like many values: more distinct ones than half the rows,
    or ten times as many as column 0 has (texts may repeat, as a file of messages repeats some).
    Each is counted over every row, a header among them. Example: eight rows of "spam" or "ham"
    and eight different texts -> ("1", "0"); two rows "ham<TAB>hello", "spam<TAB>buy" -> (None,
    None), too few to tell, so text first. With the `classes` a model was trained on known (a
    file to score), column 0 holds the labels when every row's value there but the first (a
    header, perhaps) is one of them and column 1's are not: ("1", "0") for those two rows and
    the classes {"ham", "spam"}."""
    def distinct(i):
        return len({fields[i].strip() for _, fields in rows if i < len(fields)})

    def all_classes(i):
        return all(i < len(fields) and fields[i].strip() in classes for _, fields in rows[1:])

    n, first, second = len(rows), distinct(0), distinct(1)
    labels_by_count = first <= n / 4 and (second > n / 2 or second >= 10 * first)
    labels_by_class = classes is not None and n > 1 and all_classes(0) and not all_classes(1)
    if not (labels_by_count or labels_by_class):
        return None, None
    log(f"note: {path}: column 0 holds {first:,} distinct values in {n:,} rows and column 1 holds"
        f" {second:,}: read column 0 as the label and column 1 as the text (give --text-column"
        " and --label-column to choose)")
    return "1", "0"


def _by_position(column):
    """Is a --text-column/--label-column value a position (or left out), not a name? A position
    is ASCII digits only: "²" is a digit to str.isdigit() but no number int() reads."""
    return column is None or bool(_DIGITS.fullmatch(str(column)))


_DIGITS = re.compile("[0-9]+")  # ASCII only, as a position on the command line is typed


def _named_header(first, text_column, label_column):
    """Rules 1 and 2 of the module docstring: a column given by name (looked up in the header),
    or a first row (its fields stripped) that names the columns "text" and "label", or, no
    column given, one of the two (its other column is then missing: an error naming the
    header's columns, rather than a first record of text "text" or of class "label")."""
    if not (_by_position(text_column) and _by_position(label_column)):
        return True
    named = [_header_index(first, name) is not None for name in ("text", "label")]
    return any(named) if text_column is None and label_column is None else all(named)


def first_row_is_header(rows, text_column, label_column, classes=None):
    """(is the first of `rows` a header?, why, when only its labels tell): the rule of the module
    docstring. `rows` are (line number, fields) as the CSV/TSV readers give them.

    Examples, label in column 0 given by position: "category,comment" above rows labelled spam,
    ham, spam, ham -> (True, "its label 'category' is on no other row, ..."); "spam,buy now" above
    ham, spam, ham -> (False, None): its class is on another row, so it is a record.
    """
    if _named_header([f.strip() for f in rows[0][1]], text_column, label_column):
        return True, None
    li = int(label_column or 1)
    labels = [fields[li].strip() if li < len(fields) else None for _, fields in rows]
    if len(labels) < 2 or None in labels or not labels[0]:
        return False, None  # a row without the column, or without a label, is an error later
    head, others = labels[0], labels[1:]
    if classes is not None:  # rule 3, the classes known
        if head not in classes and all(label in classes for label in others):
            return True, (f"its label {head!r} is not one of the {len(classes)} classes trained"
                          " on, and every other row's is")
        return False, None
    counts = Counter(others)  # rule 3, a training file
    if head not in counts and min(counts.values()) >= 2:
        return True, (f"its label {head!r} is on no other row, while every other row's label is"
                      " on two rows or more")
    return False, None


class _Unreadable(NamedTuple):
    """What a record holds in place of a JSON value that is no text and no number: NaN or
    Infinity (not JSON, though Python's json reads them), a number beyond a float's range, or an
    integer of more digits than Python converts (sys.get_int_max_str_digits, 4,300 by default).
    A JSON array is parsed whole before its records' lines are known, so the value is kept and
    refused where a field is read (`_str_field`), naming the record's line."""
    kind: str  # the Python type it would be: "float" or "int"
    why: str  # what is wrong, as an error says it after the field's name


def _json_constant(name):
    """json.loads's parse_constant hook: NaN, Infinity and -Infinity."""
    return _Unreadable("float", f"is {name}, which is not a JSON number")


def _json_float(spelling):
    """json.loads's parse_float hook: a float, or _Unreadable beyond a float's range (1e400)."""
    value = float(spelling)
    return value if math.isfinite(value) else _Unreadable(
        "float", f"is a number beyond a float's range ({spelling[:20]})")


def _json_int(spelling):
    """json.loads's parse_int hook: an int, or _Unreadable when it has too many digits."""
    try:
        return int(spelling)
    except ValueError:  # more digits than sys.get_int_max_str_digits allows
        return _Unreadable("int", f"is a number of {len(spelling.lstrip('-')):,} digits, more"
                                  " than can be read; quote it if it is text")


class _Record(dict):
    """A JSON object, with the keys it spells more than once (`repeated`): json keeps the last
    value of a repeated key without a word, and {"text": "a", "text": "b"} is more likely a
    mistake than a choice. A field read that is repeated is refused (`_str_field`), with the
    record's line, which the parser does not know."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.repeated = {key for key, n in Counter(key for key, _ in pairs).items() if n > 1}


# json.loads, with the values of `_Unreadable` kept as such rather than raising an error (a
# ValueError without a line) or reading as the float nan or inf, and objects as `_Record`s
_DECODER = json.JSONDecoder(parse_constant=_json_constant, parse_float=_json_float,
                            parse_int=_json_int, object_pairs_hook=_Record)


def _loads(text):
    """A JSON text -> its value, read by _DECODER."""
    return _DECODER.decode(text)


def _parse_json(text, path, line=None):
    """json.loads with one-line errors naming the file and the line: `line` when `text` is one
    line of a JSONL file, else the line the parser stopped at."""
    try:
        return _loads(text)
    except json.JSONDecodeError as err:
        raise TinyLLMError(f"{path}:{line or err.lineno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        where = path if line is None else f"{path}:{line}"
        raise TinyLLMError(f"{where}: JSON nested too deeply to be a record") from None


def _json_records(text, path, errors):
    """(line number, dict) for each record of a JSON array of objects or of a JSONL text: the two
    layouts data sets are exported in, in file order. The number is the line the record starts
    on. A JSONL line that is not a JSON object, or an array item that is not one, goes to
    `errors` (a RecordErrors) and is passed over; an array that is not valid JSON is an error
    at once."""
    array = text.lstrip().startswith("[")
    if array:
        numbered = _json_array_records(text, path)  # (line, value): parsed already
    else:
        _refuse_one_spread_object(text, path)
        numbered = ((number, line) for number, line in enumerate(split_lines(text), start=1)
                    if line.strip())
    for number, item in numbered:
        record = None
        with errors.gathered():
            record = item if array else _parse_json(item, path, number)
            if not isinstance(record, dict):
                kind = record.kind if isinstance(record, _Unreadable) else type(record).__name__
                raise TinyLLMError(f"{path}:{number}: expected a JSON object, got {kind}")
        if isinstance(record, dict):
            yield number, record


def _shown_fields(names, most=8):
    """Field or column names as an error shows them: quoted and escaped (a file is untrusted:
    no escape sequence of its reaches the terminal), each cut at 40 characters, the first `most`
    of them. Example: ["id", "text"] -> "'id', 'text'"."""
    shown = [repr(name.strip() if len(name.strip()) <= 40 else name.strip()[:40] + "...")
             for name in list(names)[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _fields_of(record):
    """The field names a record has, as an error shows them, so that a file whose fields have
    other names ("sentence" for the text) can be read with --text-column at once. Example:
    {"sentence": "hi", "label": 1} -> " (its fields: 'sentence', 'label')"; {} -> ""."""
    return f" (its fields: {_shown_fields(record)})" if record else ""


def _str_field(record, key, path, number, required=True):
    if key in getattr(record, "repeated", ()):
        raise TinyLLMError(f"{path}:{number}: the record gives {key!r} more than once")
    value = record.get(key)
    if value is None or (required and str(value).strip() == ""):
        if not required:
            return ""
        raise TinyLLMError(f"{path}:{number}: record has no {key!r}{_fields_of(record)}"
                           if value is None else f"{path}:{number}: empty {key!r}")
    if isinstance(value, (dict, list)):
        raise TinyLLMError(f"{path}:{number}: {key!r} must be a string")
    if isinstance(value, _Unreadable):
        raise TinyLLMError(f"{path}:{number}: {key!r} {value.why}")
    if isinstance(value, str) and _SURROGATE.search(value):
        # JSON can spell half of a UTF-16 pair alone ("\ud800"): no UTF-8 text holds one, and
        # saving or printing it would fail far from here
        raise TinyLLMError(f"{path}:{number}: {key!r} holds a lone surrogate (a \\udXXX escape"
                           " without its pair), which is not text")
    # a number or true/false as the file spells it: str(True) would be Python's "True"
    return value if isinstance(value, str) else json.dumps(value)


def _json_array_records(text, path):
    """(line number, item) for each item of a JSON array text; the line is where the item starts,
    so that an error (or a record found too long later) can be found in the file.

    Example: '[\n {"a": 1},\n {"a": 2}\n]' -> [(2, {"a": 1}), (3, {"a": 2})].
    """
    items = _parse_json(text, path)
    numbered = []
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    for item in items:  # the text is valid JSON: walk it again to find where each item starts
        start = _ITEM_GAP.match(text, pos).end()
        line += text.count("\n", pos, start)
        numbered.append((line, item))
        _, end = _DECODER.raw_decode(text, start)
        line, pos = line + text.count("\n", start, end), end
    return numbered


_ITEM_GAP = re.compile(r"[ \t\r\n]*,?[ \t\r\n]*")  # JSON whitespace and the comma between items
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a pair: one left is alone


# The fields an instruction record's input and output may be under: Alpaca's names first, then
# those of the other common layout (Dolly's "context" and "response").
INPUT_FIELDS = ("input", "context")
OUTPUT_FIELDS = ("output", "response")


def _first_field(record, names):
    """The first of `names` that `record` has (the first name when it has none of them)."""
    return next((name for name in names if name in record), names[0])


def read_instructions(path):
    """Read instruction records from a JSON array or JSONL file: a list of dicts with string
    "instruction", "input" ("" when absent) and "output", and "line": where the record starts
    in the file (1-based). A record may give its input as "context" and its output as
    "response" (INPUT_FIELDS, OUTPUT_FIELDS), as Dolly's layout has them. Errors name file:line."""
    text = _read_text(path)  # first: a missing file is "not found", whatever its name
    fmt = _format_of(path, text)
    if fmt not in ("jsonl", "json") and not text.lstrip().startswith(("[", "{")):
        raise TinyLLMError(f"{path}: instruction data must be a JSON array or JSONL")
    errors, records = RecordErrors(), []
    for number, rec in _json_records(text, path, errors):
        with errors.gathered():
            records.append({"instruction": _str_field(rec, "instruction", path, number),
                            "input": _str_field(rec, _first_field(rec, INPUT_FIELDS), path,
                                                number, required=False),
                            "output": _str_field(rec, _first_field(rec, OUTPUT_FIELDS), path,
                                                 number),
                            "line": number})
    errors.raise_any()
    if not records:
        raise TinyLLMError(f"{path}: no records")
    return records


def _refuse_one_spread_object(text, path):
    """A file that is one JSON object over several lines (`{"data": [...]}`, pretty-printed) is
    neither layout: say so, rather than 'malformed JSON' at line 1 of what is valid JSON."""
    if "\n" not in text.strip() or not text.lstrip().startswith("{"):
        return
    try:
        whole = _loads(text)
    except (json.JSONDecodeError, RecursionError):
        return  # JSONL (several values) or broken: the line-by-line reader names the line
    if isinstance(whole, dict):
        lines = text.strip().count("\n") + 1
        raise TinyLLMError(f"{path}: one JSON object over {lines} lines, not a list of records;"
                           " the data must be a JSON array of records or JSONL (one record"
                           " per line)")


# ----------------------------------------------------------------------------- labels, splits


def control_character(text):
    r"""The first control character in `text` (a newline, a tab, an escape...), or None. A class
    name is printed as it is (`tinyllm classify` prints one per line), so one with an escape
    sequence would reach the user's terminal as a command, and one with a newline would break
    the one-line-per-class listing.

    Example: "spam" -> None; "sp\x1b[2Jam" -> "\x1b".
    """
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def label_ids(labels, where="the data"):
    """Sorted distinct labels -> {label: id}; a single class, or a class whose name holds a
    control character, is an error that names `where`, the file the labels come from.

    Example: ["spam", "ham", "spam"] -> {"ham": 0, "spam": 1}.
    """
    names = sorted(set(labels))
    bad = next((name for name in names if control_character(name)), None)
    if bad is not None:
        raise TinyLLMError(f"{where}: the label {bad!r} holds a control character"
                           f" ({control_character(bad)!r}); class names are printed as they are")
    if len(names) < 2:
        raise TinyLLMError(f"{where} has a single class {names!r}: classification needs two or more")
    return {name: i for i, name in enumerate(names)}


def case_variants(labels):
    r"""The groups of distinct labels that differ only in case, in their spaces inside, or in
    invisible format characters (a zero-width space pasted from a web page), each sorted, in
    the order of their first label: a spreadsheet typed by hand spells a class "Spam" on some
    rows and "spam" on others, and each spelling would be a class of its own.

    Example: ["spam", "Ham", "Spam", "ham", "eggs", "eggs\u200b"] -> [["Ham", "ham"], ["Spam",
    "spam"], ["eggs", "eggs\u200b"]].
    """
    groups = {}
    for label in sorted(set(labels)):
        visible = "".join(c for c in label if unicodedata.category(c) != "Cf")
        groups.setdefault(" ".join(visible.casefold().split()), []).append(label)
    return [group for group in groups.values() if len(group) > 1]


def split_three(items, fractions, seed):
    """Shuffle with `seed` and cut into (train, val, test) by `fractions`.

    Example: 10 items, (0.7, 0.1, 0.2) -> 7, 1 and 2 items. Each part gets at least one item
    when there are at least three.
    """
    order = onp.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    n = len(items)
    n_val = max(1, int(round(n * fractions[1]))) if n >= 3 else 0
    n_test = max(1, int(round(n * fractions[2]))) if n >= 3 else 0
    n_train = n - n_val - n_test
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def balance(examples, seed):
    """Downsample every class to the size of the smallest one (order kept, choice seeded).

    Example: labels [a, a, a, b] -> one a (chosen at random) and the b.
    """
    by_label = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    smallest = min(len(ix) for ix in by_label.values())
    rng = onp.random.default_rng(seed)
    keep = sorted(i for ix in by_label.values() for i in rng.choice(ix, smallest, replace=False))
    return [examples[i] for i in keep]


def without_repeats(examples, earlier=()):
    """The examples whose text occurs neither in `earlier` nor in an example before it (word for
    word; the first record of a text is kept, whatever its label), and how many were dropped.

    A file that repeats a record can put one copy in training and another in the test split,
    where the model is then scored on a text it has learned. Example: [("hi", "a"), ("yo", "b"),
    ("hi", "b")], earlier=[("yo", "a")] -> ([("hi", "a")], 2).
    """
    seen, kept = {text for text, _ in earlier}, []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept, len(examples) - len(kept)


# ----------------------------------------------------------------------------- char fallback


def with_case_copies(examples):
    """The training examples, then each of their texts in upper case, then each in lower case,
    with its label: three times as many. Example: [("Hi Bob", "ham")] -> [("Hi Bob", "ham"),
    ("HI BOB", "ham"), ("hi bob", "ham")].

    Real short messages mix cases freely ("CHECK OUT MY CHANNEL", "best song ever"), and a
    byte-level BPE learnt from edited prose reads an upper-case word as rare fragments that
    pretraining seldom saw. The copies show the classifier the same words in every case with
    the same label (case data augmentation); the validation and test texts are left as they
    are. A task where case decides the label wants `--no-case-copies`.
    """
    return (examples + [(text.upper(), label) for text, label in examples]
            + [(text.lower(), label) for text, label in examples])


def with_unknown_token(tokenizer):
    """A char tokenizer that also has the fallback token UNK_TOKEN (same ids for everything
    it already knew, the new token last); other tokenizers are returned unchanged.

    Byte-level BPE can encode every string, so it needs no fallback.
    """
    if tokenizer.kind != "char" or UNK_TOKEN in tokenizer.special_tokens:
        return tokenizer
    names = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    return type(tokenizer)(tokenizer.chars, tuple(names) + (UNK_TOKEN,))


def encode_with_fallback(tokenizer, text):
    """Text -> (ids, number of characters that fell back to UNK_TOKEN).

    Example (a char tokenizer that knows 'a' and 'b' only): "abé" -> ([0, 1, unk], 1).
    """
    if tokenizer.kind != "char":
        return tokenizer.encode(text), 0
    unk = tokenizer.special_tokens.get(UNK_TOKEN)
    known = {c: i for i, c in enumerate(tokenizer.chars)}
    ids = [known.get(c, unk) for c in text]
    missing = sum(1 for c in text if c not in known)
    if missing and unk is None:
        raise TinyLLMError("text has characters the char tokenizer never saw and it has no"
                           f" {UNK_TOKEN} token")
    return ids, missing


# ----------------------------------------------------------------------------- embedded data


# The embedded classification set's four subjects, and the standard library's top-level modules
# whose docstrings give each one its sentences. A sentence's label is the subject of the module it
# documents, so a nearest neighbour or a classifier can find it from what the sentence is about.
SUBJECT_MODULES = {
    "internet": "base64 email ftplib http imaplib ipaddress mailbox mimetypes nntplib poplib quopri"
                " selectors smtplib socket socketserver ssl telnetlib urllib uu webbrowser wsgiref"
                " xmlrpc",
    "files": "bz2 dbm filecmp fileinput fnmatch genericpath glob gzip io lzma ntpath os pathlib"
             " posixpath shelve shutil stat tarfile tempfile zipfile zipimport",
    "concurrency": "_threading_local asyncio concurrent multiprocessing queue sched signal"
                   " subprocess threading",
    "numbers": "_pydecimal _strptime calendar cmath colorsys datetime decimal fractions numbers"
               " random statistics",
}


def subject_sentences(min_words=6, max_words=25):
    """{subject: sorted sentences}: the first sentence of each prose paragraph in the docstrings
    of the modules of SUBJECT_MODULES, 6 to 25 words, each sentence once (under the subject
    where it first appears). Read with `ast` from the standard library's source, never imported.
    """
    subject_of = {module: subject for subject, modules in SUBJECT_MODULES.items()
                  for module in modules.split()}
    root = sysconfig.get_paths()["stdlib"]
    found, seen = {subject: [] for subject in SUBJECT_MODULES}, set()
    for path in stdlib_python_files(root):
        subject = subject_of.get(module_name(path, root).split(".")[0])
        if subject is None:
            continue
        for doc in file_docstrings(path):
            for paragraph in prose_paragraphs(doc):
                sentence = first_sentence(paragraph)
                if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                    seen.add(sentence)
                    found[subject].append(sentence)
    return {subject: sorted(sentences) for subject, sentences in found.items()}


def default_classification_data(n=1500, seed=0):
    """The embedded classification set: sentences of the standard library's documentation,
    labelled by the subject of the module they document: "internet", "files", "concurrency" or
    "numbers" (n / 4 of each, shuffled).

    Examples: "Format a Decimal instance according to the given specifier." -> numbers;
    "Check for errors before writing a file to the archive." -> files. Some sentences name
    their subject ("socket", "thread"); many only hint at it ("The result (or exception) of
    source will be copied to destination." is from asyncio), and a few could be any subject.
    A base pretrained on the same docstrings has read these sentences, in context, without
    their labels; a model from scratch learns every word's meaning from the 1,050 training
    sentences. (This set's earlier forms: sentences vs their letters scrambled, which a BPE model
    told apart from the rare byte tokens alone, and sentences vs their words shuffled, which the
    tiny models classified at 52-63% and whose vectors had nearest neighbours at chance.)
    """
    rng = random.Random(seed)
    examples = []
    for subject, found in subject_sentences().items():
        rng.shuffle(found)
        examples += [(sentence, subject) for sentence in found[:n // len(SUBJECT_MODULES)]]
    rng.shuffle(examples)
    return examples


WORDS = ("cat dog sun map pen cup box red sky fox owl bee car bus hat ice jam key log net oak pig"
         " rat sea tea toy van web yak zip art bag bed cow egg fan gum hen ink jar kit lip mud"
         " nut pot rug tin").split()
INSTRUCTIONS = {"reverse": "reverse the words", "upper": "uppercase", "sort": "sort the words",
                "add": "add"}


def _instruction_record(task, rng):
    """One generated record for `task` (see default_instruction_data)."""
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return {"instruction": INSTRUCTIONS[task], "input": f"{a} {b}", "output": str(a + b)}
    if task == "upper":
        phrase = " ".join(rng.sample(WORDS, 2))
        return {"instruction": INSTRUCTIONS[task], "input": phrase, "output": phrase.upper()}
    words = rng.sample(WORDS, rng.randint(3, 4))
    done = words[::-1] if task == "reverse" else sorted(words)
    return {"instruction": INSTRUCTIONS[task], "input": " ".join(words), "output": " ".join(done)}


def default_instruction_data(n=2000, seed=0):
    """The embedded instruction set: four tasks a tiny model learns in minutes, in equal shares.

        reverse the words  "cat dog sun"  -> "sun dog cat"   (3-4 words from a list of 3-letter words)
        uppercase          "cat dog"      -> "CAT DOG"       (two such words)
        sort the words     "dog cat sun"  -> "cat dog sun"
        add                "3 4"          -> "7"             (two digits)

    The tasks work on whole words: the default model reads byte-level BPE tokens, in which a
    common word is one token, so reversing or sorting the letters of a word (this set's first
    form, made for a character-level model) asks it for spelling its tokens hide.
    """
    rng = random.Random(seed)
    tasks = sorted(INSTRUCTIONS)
    return [_instruction_record(tasks[i % len(tasks)], rng) for i in range(n)]


# ----------------------------------------------------------------------------- instructions from Python's own docs


def first_sentence(text):
    """The first sentence of a paragraph: up to the first ". " (or the end), with its period.

    Example: "Return the sum. It is an int." -> "Return the sum."
    """
    cut = text.find(". ")
    return text if cut < 0 else text[:cut + 1]


def sentences(text):
    """A paragraph split after each ". ": "A b. C d. E." -> ["A b.", "C d.", "E."]."""
    parts = text.split(". ")
    return [p + "." for p in parts[:-1]] + [parts[-1]]


def python_docs_instructions(n=1000, seed=0):
    """An Alpaca-layout instruction set of ordinary requests made from text every Python
    installation carries, in five equal shares:

        "What does the function `dumps` of the `json` module do?"       -> its docstring's first sentence
        "Give the first sentence of this text." + a docstring paragraph -> that paragraph's first sentence
        "Repeat the last sentence of this text." + a paragraph          -> its last sentence
        "Which module of the standard library has a function named `dumps`?" -> "The `json` module."
        "Rewrite this sentence in capital letters." + a short sentence  -> the sentence upper-cased

    Responses are a sentence or so. The paragraphs come from the standard library's docstrings
    (`data.stdlib_docstrings_corpus`), 2 to 4 sentences and at most 400 characters. The first
    and fourth kinds can only be answered from what pretraining saw; the others from the input.
    """
    rng = random.Random(seed)
    functions = [(m, f, first_sentence(" ".join(d.split("\n\n")[0].split())))
                 for m, f, d in stdlib_functions()]
    functions = [entry for entry in functions if 20 <= len(entry[2]) <= 200]
    paragraphs = [p for p in stdlib_docstrings_corpus().split("\n\n")
                  if len(p) <= 400 and 2 <= len(sentences(p)) <= 4
                  and min(len(part) for part in sentences(p)) >= 10]
    short = [p for p in paragraphs if len(first_sentence(p)) <= 100]
    makers = [
        lambda: (lambda m, f, d: {"instruction": f"What does the function `{f}` of the `{m}`"
                                  " module do?", "input": "", "output": d})(*rng.choice(functions)),
        lambda: (lambda p: {"instruction": "Give the first sentence of this text.", "input": p,
                            "output": first_sentence(p)})(rng.choice(paragraphs)),
        lambda: (lambda p: {"instruction": "Repeat the last sentence of this text.", "input": p,
                            "output": sentences(p)[-1]})(rng.choice(paragraphs)),
        lambda: (lambda m, f, d: {"instruction": "Which module of the standard library has a"
                                  f" function named `{f}`?", "input": "",
                                  "output": f"The `{m}` module."})(*rng.choice(functions)),
        lambda: (lambda p: {"instruction": "Rewrite this sentence in capital letters.",
                            "input": first_sentence(p), "output": first_sentence(p).upper()}
                 )(rng.choice(short)),
    ]
    return [makers[i % len(makers)]() for i in range(n)]
