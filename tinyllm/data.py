"""Text in, batches out: reading corpora, the embedded default corpus, splits and random windows.

Pretraining is self-supervised: the labels come from the text itself. A window of T + 1 tokens
gives T inputs and T targets, each target being the token that follows its input:
    tokens  [5, 9, 2, 7]  ->  x = [5, 9, 2], y = [9, 2, 7]
"""

import ast
import collections
import functools
import os
import re
import select
import stat
import sysconfig

import numpy as onp

from .errors import TinyLLMError
from .fileio import available_memory, decode_utf8, read_fd

DEFAULT_CORPUS = "python-docs"
# Parts of the standard library whose docstrings are not ordinary prose about the library:
# test suites, the IDLE and turtle demos, and vendored or generated code.
SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings",
                    "pydoc_data", "site-packages", "dist-packages", "__pycache__"}
MIN_PARAGRAPH_CHARS = 40  # shorter docstring paragraphs are mostly signatures and fragments


def pydoc_corpus():
    """The embedded default corpus: the topic help texts that ship with CPython.

    Every CPython installation carries `pydoc_data.topics` (the text `help("if")` prints): about
    460 KB of English prose and code about Python itself, so `tinyllm pretrain` can train on real
    text with no download and no file to supply. The topics are joined in sorted order so the
    corpus is the same on every run of one Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data into a separate package
        raise TinyLLMError(
            "the default corpus needs the standard library's pydoc_data, which this Python lacks;"
            " pass --data FILE"
        ) from None
    return "\n\n".join(topics[name] for name in sorted(topics))


def prose_paragraphs(docstring):
    """The paragraphs of a docstring that read as prose: not indented (code and tables are), no
    doctest prompt, at least MIN_PARAGRAPH_CHARS long. Lines of a paragraph are joined by spaces.

    Example: "Return the sum.\n\nExample:\n\n    >>> add(1, 2)\n    3" -> [] (too short,
    then indented code); a 60-character unindented sentence -> [that sentence].
    """
    kept = []
    for paragraph in docstring.split("\n\n"):
        lines = paragraph.strip("\n").split("\n")
        if not lines[0] or lines[0][0].isspace() or ">>>" in paragraph:
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text) >= MIN_PARAGRAPH_CHARS:
            kept.append(text)
    return kept


def stdlib_python_files(root):
    """The .py files under the standard library folder `root`, in sorted (deterministic) order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_STDLIB_DIRS and not d.startswith("config-"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return paths


def file_docstrings(path):
    """The docstrings of a Python file's module, classes and functions, in source order.

    Read with `ast`, never imported: no module code runs.
    """
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a file this Python cannot parse (a template, a Python 2 leftover): skip it
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in walk_statements(tree) if isinstance(n, kinds)),
                   key=lambda n: getattr(n, "lineno", 0))
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def walk_statements(tree):
    """The nodes of `tree` in `ast.walk`'s order (breadth first), without expressions.

    No statement can sit inside an expression (a lambda's body is an expression), so every
    module, class and function node is found, and in the same order; expressions are most of a
    tree, and skipping them halves the time `file_docstrings` takes over the standard library.
    """
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if not isinstance(child, ast.expr))
        yield node


def module_name(path, root):
    """The dotted module name of a standard library file: root/json/decoder.py -> "json.decoder"."""
    parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def documented_functions(path, root):
    """(module, function name, docstring) for the public top-level functions of a file that have
    a docstring, in source order; read with `ast`, never imported."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    module = module_name(path, root)
    return [(module, node.name, ast.get_docstring(node)) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not node.name.startswith("_") and ast.get_docstring(node)]


@functools.lru_cache(maxsize=1)  # parsing the library takes seconds; a tuple is immutable
def stdlib_functions():
    """Every public, documented top-level function of the standard library (see
    `documented_functions`), modules in sorted order, as a tuple."""
    root = sysconfig.get_paths()["stdlib"]
    return tuple(entry for path in stdlib_python_files(root)
                 for entry in documented_functions(path, root)
                 if not entry[0].split(".")[-1].startswith("_"))


@functools.lru_cache(maxsize=1)  # parsing the library takes seconds; the text is immutable
def stdlib_docstrings_corpus():
    """English prose from the docstrings of the standard library's modules, classes and functions.

    Every Python installation carries its standard library's source. Its docstrings are ordinary
    technical English written by many people ("Return a new list containing all items from the
    iterable in ascending order."). We walk the library's folder in sorted order, parse each file
    with `ast` (nothing is imported or run), keep the prose paragraphs of each docstring
    (`prose_paragraphs`) and drop repeats, so the text is the same on every run of one Python
    version: about 1 MB on CPython 3.11.
    """
    seen, paragraphs = set(), []
    for path in stdlib_python_files(sysconfig.get_paths()["stdlib"]):
        for doc in file_docstrings(path):
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def python_docs_corpus():
    """The embedded default corpus: the pydoc topics, then the standard library's docstrings.

    About 1.5 MB of English about Python (prose, with some code in the topics); see
    `pydoc_corpus` and `stdlib_docstrings_corpus`.
    """
    return pydoc_corpus() + "\n\n" + stdlib_docstrings_corpus()


def icl_corpus():
    """Generated in-context-learning episodes (random functions; see tinyllm/icl_corpus.py)."""
    from .icl_corpus import icl_corpus as generate  # imported late: only this corpus needs it

    return generate()


EMBEDDED_CORPORA = {"python-docs": python_docs_corpus, "pydoc": pydoc_corpus,
                    "stdlib-docstrings": stdlib_docstrings_corpus, "icl": icl_corpus}


MAX_TEXT_BYTES = 1 << 30  # 1 GiB of text: far more than a CPU trains on in a day
BYTES_PER_CHARACTER = 16  # memory to hold and tokenize one character (text, id list, id array)
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian
PIPE_WAIT_SECONDS = 10.0  # how long a FIFO may stay without a writer before it is an error


def read_text_file(path, allow_pipe=True):
    """Read a UTF-8 text file (a byte-order mark, which Windows editors write, dropped), with
    one-line errors for a missing, empty, binary, special or too large file.

    A regular file's size is checked (against MAX_TEXT_BYTES and the free memory) before a byte
    is read. A FIFO or pipe (`--data <(zcat corpus.gz)`) is read as it comes, up to the same
    bound, unless allow_pipe is False (a path stored in a run directory); if no writer shows
    up within PIPE_WAIT_SECONDS it is an error, not a hang. Devices (/dev/zero) are refused.
    """
    if not os.path.exists(path):
        raise TinyLLMError(f"data file {path!r} not found")
    if os.path.isdir(path):
        raise TinyLLMError(f"data file {path!r} is a directory, not a text file")
    if not allow_pipe and not stat.S_ISREG(os.stat(path).st_mode):  # not even opened
        raise TinyLLMError(f"data file {path!r} is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise TinyLLMError(f"cannot read data file {path!r}: {err.strerror}") from None
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        _check_text_size(info.st_size, path, fd)
        raw = read_fd(fd, info.st_size, "data file", path)
    elif stat.S_ISFIFO(info.st_mode) and allow_pipe:
        raw = _read_pipe(fd, path)
    else:
        os.close(fd)
        raise TinyLLMError(f"data file {path!r} is not a regular file")
    if not raw.strip():
        raise TinyLLMError(f"data file {path!r} is empty" + (" (only whitespace)" if raw else ""))
    check_not_binary(raw, path)
    return decode_utf8(raw, path)  # a byte-order mark dropped: it is no part of the text


def check_not_binary(raw, path):
    """Refuse the bytes of a text file that are UTF-16 (they start with its byte-order mark) or
    binary (they hold a NUL byte, which no UTF-8 text has), naming the file as such: every
    reader of text files calls this before it decodes them."""
    if raw.startswith(UTF16_BOMS):  # Windows Notepad's "Unicode": every ASCII character has a NUL
        raise TinyLLMError(f"data file {path!r} is UTF-16 text (it starts with a UTF-16 byte-order"
                           " mark): save it as UTF-8")
    if b"\x00" in raw:
        raise TinyLLMError(f"data file {path!r} looks binary (it contains NUL bytes), not text")


def _check_text_size(size, path, fd=None, so_far=False):
    """Refuse a text too large to read or to tokenize in the memory this machine has free;
    `so_far`: `size` is what a pipe has given until now, and more may follow."""
    needed, free = size * BYTES_PER_CHARACTER, available_memory()
    if size > MAX_TEXT_BYTES or needed > free:
        if fd is not None:
            os.close(fd)
        raise TinyLLMError(
            f"data file {path!r} is {'more than ' if so_far else ''}{size / 1e6:,.0f} MB: too"
            f" large (at most"
            f" {MAX_TEXT_BYTES / 1e6:,.0f} MB, and tokenizing needs about {needed / 1e9:,.1f} GB"
            f" of the {free / 1e9:,.1f} GB of memory free)")


def _read_pipe(fd, path):
    """Read a FIFO or pipe to its end, waiting at most PIPE_WAIT_SECONDS for a writer."""
    try:
        ready, _, _ = select.select([fd], [], [], PIPE_WAIT_SECONDS)
        if not ready:
            raise TinyLLMError(f"data file {path!r} is a FIFO that nothing wrote to in"
                               f" {PIPE_WAIT_SECONDS:g} s")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            if not chunks:  # `cat /dev/zero |` is refused now, not after a gigabyte of it
                check_not_binary(chunk, path)
            total += len(chunk)
            _check_text_size(total, path, so_far=True)
            chunks.append(chunk)
    except OSError as err:
        raise TinyLLMError(f"cannot read data file {path!r}: {err.strerror}") from None
    finally:
        os.close(fd)


def load_corpus(name_or_path):
    """Text from a file path, or from an embedded corpus by name (a file of that name wins)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CORPUS
    if not os.path.exists(name_or_path) and name_or_path in EMBEDDED_CORPORA:
        return EMBEDDED_CORPORA[name_or_path]()
    if not os.path.exists(name_or_path):
        names = ", ".join(sorted(EMBEDDED_CORPORA))
        raise TinyLLMError(f"data file {name_or_path!r} not found (embedded corpora: {names})")
    return read_text_file(name_or_path)


PIECE_CHARACTERS = 1 << 20  # characters encoded at a time where progress is shown (BPE: < 1 s)
_CUT = re.compile(r"(?<=\S)\s")  # whitespace after a non-space: BPE's pre-split cuts there


def text_pieces(text, size=PIECE_CHARACTERS):
    """`text` cut into pieces of at least `size` characters (the last may be shorter), each cut
    just before a whitespace character that follows a non-space, so that the pieces encode one by
    one to the ids of the whole text. A char tokenizer may be cut anywhere; BPE's pre-split
    (tokenizers.SPLIT_PATTERN) always cuts there, as a run of letters, digits or symbols takes a
    space only at its start, and a run of whitespace takes no non-space. Where no such place
    follows, the rest of the text is one piece.

    Example: size 3: "ab cd  ef\ngh" -> ["ab cd", "  ef", "\ngh"].
    """
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def encode_in_pieces(tokenizer, text, size=PIECE_CHARACTERS):
    """Yield (ids, characters) for each of `text_pieces(text, size)`: the ids of the pieces,
    joined, are tokenizer.encode(text), so a caller can show progress as it goes, or keep only the
    ids it needs. An error names its position in the whole text, as encode(text) does."""
    for piece in text_pieces(text, size):
        try:
            ids = tokenizer.encode(piece)
        except TinyLLMError:
            tokenizer.encode(text)  # raises the same error, at its position in the whole text
            raise
        yield ids, len(piece)


def encode_corpus(tokenizer, text, progress=None, size=PIECE_CHARACTERS):
    """tokenizer.encode(text) as an int32 array, made a piece at a time (`encode_in_pieces`),
    with progress(characters encoded, characters in all), if given, after each piece."""
    parts, done = [], 0
    for ids, characters in encode_in_pieces(tokenizer, text, size):
        parts.append(onp.asarray(ids, dtype=onp.int32))
        done += characters
        if progress:
            progress(done, len(text))
    return onp.concatenate(parts)


def train_val_split(ids, train_fraction=0.9):
    """Split token ids in two at one point: the first 90% to train on, the last 10% to validate.

    A single cut (not a shuffle) keeps the validation text unseen as a whole.
    Example: ids of length 100 -> ids[:90], ids[90:].
    """
    cut = int(len(ids) * train_fraction)
    return ids[:cut], ids[cut:]


def check_long_enough(ids, block_size, what, tokenizer_kind="char", next_token=True):
    """Raise TinyLLMError unless `ids` holds at least one window: block_size + 1 tokens for
    next-token prediction (`get_batch`: the last input's target follows it), block_size for
    masked-token prediction (the targets are the window's own tokens: `get_windows`)."""
    window = block_size + 1 if next_token else block_size
    if len(ids) < window:
        # BPE trained on a small text merges it into few tokens: 3,000 characters of Shakespeare
        # are 778 tokens with 2048 in the vocabulary, 2,023 with 300
        vocab = ", or a smaller --vocab-size (each BPE merge shortens the text)"
        raise TinyLLMError(
            f"{what} has {len(ids)} tokens, fewer than block_size{' + 1' if next_token else ''}"
            f" = {window}: use more text or a smaller --block-size"
            f"{vocab if tokenizer_kind == 'bpe' else ''}"
        )


def get_batch(ids, batch_size, block_size, rng):
    """Random windows with next-token targets: ids (N,) -> x (B, T), y (B, T), int32.

    Example: ids = [5, 9, 2, 7], T = 3, start 0 -> x = [[5, 9, 2]], y = [[9, 2, 7]].
    """
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,)
    offsets = onp.arange(block_size)  # (T,)
    x = ids[starts[:, None] + offsets]  # (B, 1) + (T,) -> (B, T) indices
    y = ids[starts[:, None] + offsets + 1]  # the same windows, shifted one to the right
    return x, y


def get_windows(ids, batch_size, block_size, rng):
    """Random windows without targets (masked-token prediction): ids (N,) -> x (B, T), int32.

    The starts are drawn as `get_batch` draws them, so a seed gives both objectives the same
    windows, and a text of exactly T tokens, which has no next token after its window, gives
    its one window. Example: ids = [5, 9, 2], T = 3 -> x = [[5, 9, 2]].
    """
    starts = rng.integers(0, max(1, len(ids) - block_size), size=batch_size)  # (B,)
    return ids[starts[:, None] + onp.arange(block_size)]  # (B, 1) + (T,) -> (B, T) indices
