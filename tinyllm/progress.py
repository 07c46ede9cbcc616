"""Dependency-free progress on stderr: the training loop's bar (`Progress`), and a count for
other long jobs, such as scoring or embedding a large file (`Counting`).

On a terminal each redraws one line in place; elsewhere (a log file, CI, a test) it prints a
plain line every `every` updates so the output stays readable.
"""

import sys
import time


def format_seconds(seconds):
    """75 -> '1m15s', 3700 -> '1h01m', 9 -> '9s'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Shows `done/total`, a bar, the latest loss, ms per iteration, tokens/s and time left."""

    def __init__(self, total, start=0, stream=None, width=24, every=None):
        self.total, self.done, self.start = total, start, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.every = every or max(1, (total - start) // 10)
        self.t0 = time.perf_counter()

    def update(self, done, loss, ms_per_iter, tokens_per_s):
        self.done = done
        if not self.tty and (done - self.start) % self.every and done != self.total:
            return
        filled = int(self.width * done / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        rate = (time.perf_counter() - self.t0) / max(1, done - self.start)
        eta = format_seconds(rate * (self.total - done))
        self._show(f"iter {done}/{self.total} [{bar}] loss {loss:.4f} | {ms_per_iter:.0f} ms/it"
                   f" | {tokens_per_s:,.0f} tok/s | eta {eta}")

    def _show(self, line):
        """Redraw the line in place on a terminal; elsewhere print it as a line of its own."""
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text):
        """Print a line (an evaluation, a checkpoint) without garbling the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Counting(Progress):
    """`done/total` of a long job that is not training (scoring a file's texts, embedding its
    lines), with the time left: call `update(done)` as the work goes; `close()` at the end.

    Example line: "texts scored: 1,024/6,000 | 8s | eta 39s". With `after_seconds`, a job that
    is done sooner than that says nothing at all (a part of training that is usually short)."""

    def __init__(self, total, what, stream=None, every=None, after_seconds=0.0):
        super().__init__(total, stream=stream, every=every)
        self.what = what
        self.after_seconds = after_seconds
        self.last = 0  # `done` of the last line written
        self.shown = False  # has any line been written?

    def update(self, done):
        elapsed = time.perf_counter() - self.t0
        if elapsed < self.after_seconds:
            return
        if not self.tty and done - self.last < self.every and done != self.total:
            return
        self.last, self.shown = done, True
        eta = format_seconds(elapsed / max(1, done) * (self.total - done))
        self._show(f"{self.what}: {done:,}/{self.total:,} | {format_seconds(elapsed)} | eta {eta}")

    def close(self):
        if self.shown:
            super().close()
