"""Files a user keeps: written atomically and durably, read back as untrusted input.

Writing. We write to a temporary file `.tmp-*` in the same directory, flush it to the disk
(fsync), `os.replace` it onto the target name, then fsync the directory so the rename itself
survives a power cut. `os.replace` is atomic on POSIX and Windows when both names are on one file
system, so a crash, Ctrl-C or full disk mid-write leaves the previous file untouched; a temp
file left by a kill -9 is removed by the next run (see checkpoint.remove_leftovers).

Reading. A run directory may come from anyone, so the files it names are read with
`read_run_file`: the name must be a plain file name (no directory part, no "..", no leading
dot), a symbolic link is refused rather than followed, only a regular file is read (a FIFO
would block, /dev/zero would never end) and its size is checked before a byte is read.

Fault points. `fault_point(name)` does nothing unless the environment variable TINYLLM_FAULT
asks for a fault there. The fault tests and benchmarks/fault_trials.py use it to stop a save at
each step of the checkpoint protocol exactly, instead of hoping a timed kill lands there:

    TINYLLM_FAULT="kill@renamed:model-*"      SIGKILL this process once model-*.npz is renamed
    TINYLLM_FAULT="kill@switched#3"           ... at the third checkpoint switch
    TINYLLM_FAULT="enospc@writing:optim-*"    a full disk halfway through writing optim-*.npz
    TINYLLM_FAULT="sigint@written:model-*"    a Ctrl-C (or "sigterm") arriving right there

The part after "@" is matched with fnmatch against the point's name ("<stage>:<file name>"),
"#N" picks the N-th time a matching point is reached (default: the first).
"""

import errno
import fnmatch
import io
import json
import os
import re
import shlex
import signal
import stat
import tempfile

import numpy as onp

from .errors import TinyLLMError

TMP_PREFIX = ".tmp-"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how JSON spells half a surrogate pair
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no "/", no "..", no leading dot
MOST_DIGITS = 100  # the longest whole number a tinyllm JSON file may spell (a 128-bit state: 39)
_fault_hits = {}  # fault spec -> times its point was reached in this process


# ----------------------------------------------------------------------------- fault injection


def fault_point(name):
    """Kill this process, or raise a full-disk error, here if TINYLLM_FAULT says so (tests only)."""
    spec = os.environ.get("TINYLLM_FAULT")
    if not spec:
        return
    action, _, where = spec.partition("@")
    pattern, _, nth = where.partition("#")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _fault_hits[spec] = _fault_hits.get(spec, 0) + 1
    if _fault_hits[spec] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action in ("sigint", "sigterm"):  # a Ctrl-C or a `kill` arriving exactly here
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)


# ----------------------------------------------------------------------------- writing


def fsync_directory(directory):
    """Make the names in `directory` (new files, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` atomically and durably (see the module docstring)."""
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + name, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            fault_point(f"writing:{name}")  # a full disk strikes here in the fault tests
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"written:{name}")
        os.replace(tmp, path)
    except BaseException as err:
        # Ctrl-C or a full disk mid-write: drop the partial temp file, keep the old target.
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename:
            err.filename = path  # so the message can say which file could not be written
        raise
    fault_point(f"renamed:{name}")
    fsync_directory(directory)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_bytes(obj):
    """`obj` as indented, human-readable UTF-8 JSON; NaN and infinities are refused (strict JSON)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def npz_bytes(arrays):
    """A dict of name -> array as the bytes of an uncompressed .npz (no pickled objects)."""
    buffer = io.BytesIO()
    onp.savez(buffer, **arrays)
    return buffer.getvalue()


def atomic_write_text(path, text):
    """Write `text` (str, UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write `obj` as indented, human-readable JSON to `path` atomically."""
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npz(path, arrays):
    """Save a dict of name -> array as an uncompressed .npz to `path` atomically.

    The arrays must be plain numeric arrays so that `numpy.load(path, allow_pickle=False)` reads
    them back; we build the archive in memory first so the temp file is written in one go.
    """
    atomic_write_bytes(path, npz_bytes(arrays))


# ----------------------------------------------------------------------------- reading


def available_memory():
    """Bytes of memory this machine can still give (MemAvailable on Linux; else a large guess)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 40


def check_plain_name(name, where):
    """A file name stored in a run directory must name a file inside it: no path, no "..".

    Example: "model-000500.npz" is fine; "/etc/passwd", "../x", ".hidden" and "a/b" are refused.
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise TinyLLMError(f"{where}: {shown} is not a plain file name inside the run directory")
    return name


def open_regular(path, what, follow_symlinks=True):
    """Open `path` for reading; refuse anything but a regular file without blocking on a FIFO.

    Returns (fd, size). With follow_symlinks=False a symbolic link is refused, not followed.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TinyLLMError(f"{what} {path} is missing") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TinyLLMError(f"{what} {path} is a symbolic link; a run directory's files must"
                               " be plain files inside it") from None
        raise TinyLLMError(f"cannot read {what} {path}: {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TinyLLMError(f"{what} {path} is not a regular file (a {_file_kind(info.st_mode)})")
    return fd, info.st_size


def read_fd(fd, size, what, path):
    """Read exactly `size` bytes from `fd` (then close it); a file that changes size is an error."""
    try:
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as err:
        raise TinyLLMError(f"cannot read {what} {path}: {err.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size:
        raise TinyLLMError(f"{what} {path} changed size while being read")
    return data


def decode_utf8(data, path, drop_bom=True):
    """UTF-8 bytes -> str, with a leading byte-order mark dropped (Windows editors write one);
    bytes that are not UTF-8 are a one-line error naming the line, as an editor counts lines.

    Example: b"ok\\nbad \\xe9\\n" -> TinyLLMError("x.csv:2: not UTF-8 text (byte 0xe9 at column 5);
    save the file as UTF-8"). The column counts bytes from 1.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start]  # line ends as split_lines counts them: \n, \r\n or \r
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        column = err.start - max(before.rfind(b"\n"), before.rfind(b"\r"))
        raise TinyLLMError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at"
                           f" column {column}){_encoding_hint(data, err.start, path)}") from None
    return text[1:] if drop_bom and text.startswith("\ufeff") else text


def _encoding_hint(data, start, path):
    """What to do about bytes that are not UTF-8: save the file as UTF-8, and, where the bytes
    read as Windows-1252 (Latin-1 with a few more letters, which older spreadsheets and many
    public data sets are saved in) and no character of the file is UTF-8 beyond ASCII, the
    character they would be and a command that converts it (or, for standard input or a pipe,
    which have no file to convert, the command to pipe it through).

    Example: b"caf\xe9", 3, "d.csv" -> "; in Windows-1252 it is 'é': convert the file with
    `iconv -f cp1252 -t utf-8 d.csv > utf8-d.csv`, or save it as UTF-8"."""
    if not data.decode("utf-8", errors="ignore").isascii():  # UTF-8 elsewhere: a damaged file
        return "; save the file as UTF-8"
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return "; save the file as UTF-8"
    char = data[start:start + 1].decode("cp1252")
    if path.startswith("/dev/") or not os.path.isfile(path):  # standard input, a pipe
        return (f"; in Windows-1252 it is {char!r}: pipe it through `iconv -f cp1252 -t utf-8`"
                " first, or save it as UTF-8")
    folder, name = os.path.split(path)
    return (f"; in Windows-1252 it is {char!r}: convert the file with `iconv -f cp1252 -t utf-8"
            f" {shlex.quote(path)} > {shlex.quote(os.path.join(folder, 'utf8-' + name))}`, or"
            " save it as UTF-8")


def split_lines(text):
    """The lines of a text as an editor counts them: a line ends at "\\n", "\\r\\n" or "\\r" only,
    and a line end at the very end does not start another, empty, line.

    str.splitlines would also end a line at U+2028, U+0085, a form feed and other separators that
    real records hold inside one text (a comment, a JSON string), and so cut a record in two.
    Every reader of line-per-record files uses this, so that line N is the same line everywhere.

    Example: "a\\r\\nb\\u2028c\\rd\\n" -> ["a", "b\\u2028c", "d"]
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def read_run_file(run_dir, name, max_bytes, what):
    """The bytes of the file `name` inside `run_dir`, read as untrusted input (module docstring)."""
    check_plain_name(name, f"{run_dir}/config.json")
    return read_bounded(os.path.join(run_dir, name), max_bytes, what, follow_symlinks=False)


def read_bounded(path, max_bytes, what, follow_symlinks=True):
    """The bytes of a regular file of at most `max_bytes`, its size checked before a byte is read
    (a FIFO, a device or a file too large for what it claims to be is a one-line error)."""
    fd, size = open_regular(path, what, follow_symlinks=follow_symlinks)
    if size > max_bytes:
        os.close(fd)
        raise TinyLLMError(f"{what} {path!r} is {size:,} bytes, more than {max_bytes:,}")
    return read_fd(fd, size, what, path)


def parse_json(data, path):
    """Strict JSON from bytes, with a one-line error that never quotes the file's contents.

    Every string must be text: JSON may spell a lone surrogate ("\\ud800"), which no UTF-8
    text holds, and a label or token made of one would crash the command that prints or saves
    it. Only a file that has such an escape is checked (by encoding what it holds).
    """
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant,
                         parse_int=_whole_number)
        if SURROGATE_ESCAPE.search(data):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj
    except UnicodeEncodeError:
        raise TinyLLMError(f"{path} holds a lone surrogate (a \\ud800-\\udfff escape), which is"
                           " not text") from None
    except UnicodeDecodeError:
        raise TinyLLMError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise TinyLLMError(f"{path} is not valid JSON (corrupted or truncated? line {err.lineno},"
                           f" column {err.colno})") from None
    except RecursionError:
        raise TinyLLMError(f"{path} is nested too deeply to be a tinyllm file") from None
    except ValueError as err:
        raise TinyLLMError(f"{path}: {err}") from None


def _whole_number(spelling):
    """json's parse_int hook: no field of a tinyllm file needs more than a few digits, and
    Python refuses to read more than 4,300, with advice about sys.set_int_max_str_digits."""
    if len(spelling.lstrip("-")) > MOST_DIGITS:
        raise ValueError(f"a whole number of {len(spelling.lstrip('-')):,} digits, more than any"
                         " tinyllm file holds")
    return int(spelling)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number (write null for a missing figure)")


def _file_kind(mode):
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"
