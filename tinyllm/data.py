"""Text in, batches out: reading corpora, the embedded default corpus, splits and random windows.

Pretraining is self-supervised: the labels come from the text itself. A window of T + 1 tokens
gives T inputs and T targets, each target being the token that follows its input:
    tokens  [5, 9, 2, 7]  ->  x = [5, 9, 2], y = [9, 2, 7]
"""

import os
import select
import stat

import numpy as onp

from .errors import TinyLLMError
from .fileio import available_memory, read_fd

DEFAULT_CORPUS = "pydoc"


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


def icl_corpus():
    """Generated in-context-learning episodes (random functions; see tinyllm/icl_corpus.py)."""
    from .icl_corpus import icl_corpus as generate  # imported late: only this corpus needs it

    return generate()


EMBEDDED_CORPORA = {"pydoc": pydoc_corpus, "icl": icl_corpus}


MAX_TEXT_BYTES = 1 << 30  # 1 GiB of text: far more than a CPU trains on in a day
BYTES_PER_CHARACTER = 16  # memory to hold and tokenize one character (text, id list, id array)
PIPE_WAIT_SECONDS = 10.0  # how long a FIFO may stay without a writer before it is an error


def read_text_file(path, allow_pipe=True):
    """Read a UTF-8 text file, with one-line errors for a missing, empty, binary, special or
    too large file.

    A regular file's size is checked (against MAX_TEXT_BYTES and the free memory) before a byte
    is read. A FIFO or pipe (`--data <(zcat corpus.gz)`) is read as it comes, up to the same
    bound, unless allow_pipe is False (a path stored in a run directory); if no writer shows
    up within PIPE_WAIT_SECONDS it is an error, not a hang. Devices (/dev/zero) are refused.
    """
    if not os.path.exists(path):
        raise TinyLLMError(f"data file {path!r} not found")
    if os.path.isdir(path):
        raise TinyLLMError(f"data file {path!r} is a directory, not a text file")
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
        raise TinyLLMError(f"data file {path!r} is empty")
    if b"\x00" in raw:
        raise TinyLLMError(f"data file {path!r} looks binary (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TinyLLMError(
            f"data file {path!r} is not UTF-8 text (bad byte at offset {err.start})"
        ) from None


def _check_text_size(size, path, fd=None):
    """Refuse a text too large to read or to tokenize in the memory this machine has free."""
    needed, free = size * BYTES_PER_CHARACTER, available_memory()
    if size > MAX_TEXT_BYTES or needed > free:
        if fd is not None:
            os.close(fd)
        raise TinyLLMError(
            f"data file {path!r} is {size / 1e6:,.0f} MB: too large (at most"
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
            total += len(chunk)
            _check_text_size(total, path)
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


def train_val_split(ids, train_fraction=0.9):
    """Split token ids in two at one point: the first 90% to train on, the last 10% to validate.

    A single cut (not a shuffle) keeps the validation text unseen as a whole.
    Example: ids of length 100 -> ids[:90], ids[90:].
    """
    cut = int(len(ids) * train_fraction)
    return ids[:cut], ids[cut:]


def check_long_enough(ids, block_size, what):
    """Raise TinyLLMError unless `ids` holds at least one window of block_size + 1 tokens."""
    if len(ids) < block_size + 1:
        raise TinyLLMError(
            f"{what} has {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}:"
            " use more text or a smaller --block-size"
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
