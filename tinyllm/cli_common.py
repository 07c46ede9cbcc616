"""What every tinyllm command shares: error handling and validation.

Every user-fixable problem surfaces as a `TinyLLMError` and is printed as one line,
`Error: ...`, with exit code 1. Ctrl-C during training saves a checkpoint and exits with 130
(SIGTERM: the same, exit code 143).
"""

import functools
import math
import signal
import sys
import unicodedata

import click

from .config import MAX_SIZE, MAX_STEPS
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
        except MemoryError:  # an array numpy could not allocate; a training run keeps its last
            # checkpoint, as after any stop, and the estimate the big cases are checked by first
            # (train.check_memory) cannot foresee every array
            raise click.ClickException("out of memory: try a smaller --batch-size, a smaller model"
                                       " or context, or a smaller input") from None
        except TrainingInterrupted as stop:
            _ignore_further_interrupts()  # the checkpoint is saved: a second Ctrl-C changes nothing
            ctx = click.get_current_context(silent=True)
            command_name = "tinyllm " + ctx.command_path.split(" ", 1)[-1] if ctx else "tinyllm"
            click.echo(f"\n{stop}. Continue with: {command_name} --out {stop.out_dir} --resume",
                       err=True)
            sys.exit(128 + stop.signum)  # 130 after Ctrl-C, 143 after SIGTERM, as shells report
        except KeyboardInterrupt:
            _ignore_further_interrupts()
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


def _ignore_further_interrupts():
    """On the way out after an interrupt: one more Ctrl-C or SIGTERM must not turn exit code 130
    (or 143) into a death by signal halfway through the exit."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------------------- flag checks
# Click callbacks for numeric flags, one per kind of value, so that a bad number is a one-line
# "Invalid value for '--flag': ..." before any work starts. Click's float type accepts "nan" and
# "inf", and its int type any size, so every check also refuses those where they make no sense.

# MAX_SIZE and MAX_STEPS (config.py) bound sizes and step counts, as a run's config.json is.


def _number(value):
    """The value as a number, refusing NaN and infinities."""
    if isinstance(value, float) and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def positive(ctx, param, value):
    """A size or count: a finite number above zero, at most MAX_SIZE if a whole number."""
    if value is None:
        return value
    if not _number(value) > 0:
        raise click.BadParameter(f"must be positive, got {value}")
    if isinstance(value, int) and value > MAX_SIZE:
        raise click.BadParameter(f"must be at most {MAX_SIZE:,} (more cannot fit in memory),"
                                 f" got {value:,}")
    return value


def non_negative(ctx, param, value):
    """A finite number that may be zero (a rate, a decay, warm-up steps), below 2^31."""
    if value is None:
        return value
    if not _number(value) >= 0:
        raise click.BadParameter(f"must be zero or more, got {value}")
    if isinstance(value, int) and value > MAX_STEPS:
        raise click.BadParameter(f"must be at most {MAX_STEPS:,}, got {value:,}")
    return value


def count(ctx, param, value):
    """A count that may be zero (shots, windows, tokens to sample, a rank, an index): a whole
    number from 0 to MAX_SIZE."""
    if value is not None and not 0 <= value <= MAX_SIZE:
        raise click.BadParameter(f"must be from 0 to {MAX_SIZE:,}, got {value}")
    return value


def step_count(ctx, param, value):
    """A number of optimizer steps or of tokens: positive, below 2^31."""
    if value is None:
        return value
    if not _number(value) > 0:
        raise click.BadParameter(f"must be positive, got {value}")
    if value > MAX_STEPS:
        raise click.BadParameter(f"must be at most {MAX_STEPS:,}, got {value:,}")
    return value


def fraction(ctx, param, value):
    """A probability that must stay below one (dropout, label smoothing): 0 <= p < 1."""
    if value is not None and not 0 <= _number(value) < 1:
        raise click.BadParameter(f"must be at least 0 and below 1, got {value}")
    return value


def share(ctx, param, value):
    """A share of a whole that may be none or all of it (of a run's steps): 0 <= s <= 1."""
    if value is not None and not 0 <= _number(value) <= 1:
        raise click.BadParameter(f"must be from 0 to 1, got {value}")
    return value


def probability_mass(ctx, param, value):
    """A share of the probability mass (top-p): 0 < p <= 1."""
    if value is not None and not 0 < _number(value) <= 1:
        raise click.BadParameter(f"must be above 0 and at most 1, got {value}")
    return value


def random_seed(ctx, param, value):
    """A random seed: a whole number from 0 (numpy refuses negative seeds) below 2^63."""
    if value is not None and not 0 <= value < 1 << 63:
        raise click.BadParameter(f"must be a whole number from 0 to 2^63 - 1, got {value}")
    return value


# ----------------------------------------------------------------------------- --resume


def flag_given(name):
    """Whether the flag `name` of the running command was set by the user, not left at its
    default: a flag given and not used must be refused or noted, never dropped unseen."""
    source = click.get_current_context().get_parameter_source(name)
    return source is not click.core.ParameterSource.DEFAULT


def note_flags_resume_ignores(still_used):
    """With --resume a run keeps the settings it began with: name on stderr each flag given on
    the command line that therefore does nothing, so that a changed --lr or --data is not
    dropped unseen. `still_used`: the parameter names the resumed command does read."""
    ctx = click.get_current_context()
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    ignored = [_flag_name(p, ctx.params[p.name]) for p in ctx.command.params
               if p.name not in still_used and ctx.get_parameter_source(p.name) in given]
    if ignored:
        click.echo(f"note: --resume continues the run with the settings it began with; not used:"
                   f" {', '.join(ignored)}", err=True)


def _flag_name(param, value):
    """The flag as given: --no-bias for a False --bias/--no-bias."""
    return param.secondary_opts[0] if param.secondary_opts and value is False else param.opts[0]


# ----------------------------------------------------------------------------- reports


def shown_text(text, keep="\t"):
    r"""A text from a user's file as printed to a terminal: each control character but those in
    `keep` written as its escape, so that an escape sequence in a file reaches the screen as
    letters, not as a command. Example: "ok\x1b[2J" -> "ok\\x1b[2J" (printed: ok\x1b[2J)."""
    return "".join(c if c in keep or unicodedata.category(c) != "Cc"
                   else repr(c)[1:-1] for c in text)


def shown_generation(text):
    """Text a model wrote, as printed: its lines and tabs as they are, any other control
    character as its escape. A model learns the characters of its data, escape sequences
    included, and a sampled one must not command the terminal."""
    return shown_text(text, keep="\t\n")


def loss_text(value):
    """A loss from metrics.jsonl for a report line: 1.23456 -> "1.2346"; anything that is not a
    number (a run directory is untrusted, and may be edited by hand) -> "unknown"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "unknown"


def training_time(part, total):
    """This part's training time, and a resumed run's over all its parts (None: unknown), in
    words: (12, 40) -> "12 s (40 s in all, over every --resume)"; (12, 12) -> "12 s"."""
    if total is None:
        return (f"{part:.0f} s (the run's time before --resume is unknown: the tinyllm that"
                " trained it did not keep it)")
    return f"{part:.0f} s" + (f" ({total:.0f} s in all, over every --resume)" if total != part else "")


# ----------------------------------------------------------------------------- shared options


def no_cache_option(command):
    """The --no-cache flag of every command that generates text (passed on as use_cache)."""
    return click.option(
        "--no-cache", "no_cache", is_flag=True,
        help="Generate without the key/value cache: the plain loop that feeds the model the whole"
             " context at every step (the same tokens, slower; for reading and checking)."
             "  [default: off, the cache is used]")(command)
