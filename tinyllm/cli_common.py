"""What every tinyllm command shares: error handling and validation.

Every user-fixable problem surfaces as a `TinyLLMError` and is printed as one line,
`Error: ...`, with exit code 1. Ctrl-C during training saves a checkpoint and exits with 130
(SIGTERM: the same, exit code 143).
"""

import functools
import sys

import click

from .errors import TinyLLMError


def user_errors(command):
    """Turn library errors into one-line messages and exit codes instead of tracebacks."""
    from .train import TrainingInterrupted

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TinyLLMError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:  # the file system said no: a full disk, a read-only mount, ...
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from None
        except TrainingInterrupted as stop:
            ctx = click.get_current_context(silent=True)
            command_name = "tinyllm " + ctx.command_path.split(" ", 1)[-1] if ctx else "tinyllm"
            click.echo(f"\n{stop}. Continue with: {command_name} --out {stop.out_dir} --resume",
                       err=True)
            sys.exit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM, as shells report
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


def positive(ctx, param, value):
    """Click callback: reject zero and negative sizes with the flag's name."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value
