"""The one exception type that tinyllm raises for bad input a user can fix.

The CLI turns a `TinyLLMError` into a one-line message and a non-zero exit, so every message
should name what is wrong (the file, the line, the flag) and read well on its own.
"""


class TinyLLMError(Exception):
    """Bad input, a bad file or a bad setting, explained in one line."""
