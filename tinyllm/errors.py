"""The one exception type that tinyllm raises for bad input a user can fix.

The CLI turns a `TinyLLMError` into a one-line message and a non-zero exit, so every message
should name what is wrong (the file, the line, the flag) and read well on its own.
"""

import contextlib


class TinyLLMError(Exception):
    """Bad input, a bad file or a bad setting, explained in one line."""


class RecordErrors:
    """The errors of a data file's records, gathered so that one run reports every bad record,
    not one per run: a user with a file of 10,000 lines and five mistakes mends them at once.

        errors = RecordErrors()
        for number, line in numbered_lines:
            with errors.gathered():
                records.append(parse(line, number))  # may raise TinyLLMError
        errors.raise_any()

    `raise_any` raises one TinyLLMError that gives the first error in full and the next few
    after it, on one line; example: "data.csv:4: empty text (and 2 more bad records:
    data.csv:9: empty label; data.csv:12: empty text)". Errors about the whole file (it is
    not valid JSON, a column is missing from the header) are raised at once, as before.
    """

    SHOWN = 3  # errors listed after the first; the rest are counted

    def __init__(self):
        self.count = 0
        self.kept = []  # the first 1 + SHOWN messages

    def add(self, error):
        """Keep one error (a TinyLLMError found without raising it) and go on."""
        self.count += 1
        if len(self.kept) <= self.SHOWN:
            self.kept.append(str(error))

    @contextlib.contextmanager
    def gathered(self):
        """A context manager that keeps a TinyLLMError raised inside it and goes on."""
        try:
            yield
        except TinyLLMError as error:
            self.add(error)

    def raise_any(self, hint=""):
        """Raise the gathered errors as one TinyLLMError, if there were any, ending with `hint`
        (what to do about them, "; --skip-long leaves such records out", say)."""
        if not self.count:
            return
        first, rest, more = self.kept[0], self.kept[1:], self.count - len(self.kept)
        if not rest:
            raise TinyLLMError(first + hint)
        others = self.count - 1
        listed = "; ".join(rest) + (f"; {more} more" if more else "")
        raise TinyLLMError(f"{first} (and {others} more bad record{'s' * (others > 1)}: {listed})"
                           + hint)
