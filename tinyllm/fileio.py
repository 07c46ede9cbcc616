"""Atomic file writes: a file a user keeps is either the old version or the new one, never half.

We write to a temporary file in the same directory, flush it to disk, then `os.replace` it onto
the target name. `os.replace` is atomic on POSIX and Windows when both names are on one file
system, so a crash or Ctrl-C mid-write leaves the previous file untouched.
"""

import io
import json
import os
import tempfile

import numpy as onp


def atomic_write_bytes(path, data):
    """Write `data` (bytes) to `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Ctrl-C or a full disk mid-write: drop the partial temp file, keep the old target.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text):
    """Write `text` (str, UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write `obj` as indented, human-readable JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_npz(path, arrays):
    """Save a dict of name -> array as an uncompressed .npz to `path` atomically.

    The arrays must be plain numeric arrays so that `numpy.load(path, allow_pickle=False)` reads
    them back; we build the archive in memory first so the temp file is written in one go.
    """
    buffer = io.BytesIO()
    onp.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
