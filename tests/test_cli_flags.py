"""Every numeric flag of every command, probed with NaN, infinities, negative, zero and huge
values: each is either refused at once with Click's one-line "Invalid value for '--flag'" (exit
code 2) or accepted, and never gives a traceback or starts work that cannot fit in memory.

To keep this fast, every command points at a run directory that cannot be used (a file), so an
accepted value ends in a one-line error as soon as the command starts.
"""

import click
import pytest
from click.testing import CliRunner

from tinyllm.cli import main

BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "5000000", "100000000", "99999999999999999999"]
# Flags that rightly take zero (off, none, greedy, an index, a count).
ZERO_OK = {"--min-lr", "--warmup-iters", "--weight-decay", "--grad-clip", "--dropout",
           "--label-smoothing", "--sample-tokens", "--max-new-tokens", "--temperature", "--shots",
           "--icl-windows", "--lora-rank", "--length-penalty", "--show", "--layer", "--head",
           "--seed", "--split-seed", "--patience", "--short-context", "--short-share"}
# Flags that rightly take large values (step counts, rates and decays have no memory cost).
# Not --length-penalty: past 10 its ((5 + n) / 6)^alpha overflows a float (MAX_LENGTH_PENALTY).
LARGE_OK = {"--max-iters", "--eval-interval", "--warmup-iters", "--weight-decay", "--grad-clip",
            "--temperature", "--lr", "--min-lr", "--seed", "--split-seed", "--epochs"}
LEAD_OWNED = {"--lora-alpha"}  # fine-tuning-run settings checked by tinyllm/finetune_runs.py


def commands(group=main, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, path + (name,))
        else:
            yield path + (name,), command


def numeric_flags():
    for path, command in commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.type.name in ("integer", "float"):
                yield path, param.opts[0], param.type.name


@pytest.fixture(scope="module")
def unusable(tmp_path_factory):
    """A directory path under a file: any command that gets as far as using it stops."""
    path = tmp_path_factory.mktemp("flags") / "a-file"
    path.write_text("not a run directory\n", encoding="utf-8")
    return str(path / "run")


def where_args(path, unusable):
    if path in (("pretrain",), ("finetune", "classify"), ("finetune", "instruct"),
                ("seq2seq", "train")):
        return ["--out", unusable]
    args = ["--checkpoint", unusable]
    if path == ("fewshot",):
        args += ["--task", unusable]
    if path == ("attention",):
        args += ["--prompt", "x"]
    return args


def expected_refusal(flag, kind, value):
    """Should this value be refused at the flag?"""
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        return True
    if kind == "integer" and "." in value:
        return True
    if number < 0:
        return True
    if number == 0:
        return flag not in ZERO_OK
    if number > 1 and flag in ("--dropout", "--label-smoothing"):
        return True
    if number > (1 << 20):
        if flag not in LARGE_OK:
            return True
        if kind == "float":
            return False
        limit = 1 << 63 if flag in ("--seed", "--split-seed") else 1 << 31
        return number >= limit
    return False


@pytest.mark.parametrize("path, flag, kind", list(numeric_flags()),
                         ids=lambda x: " ".join(x) if isinstance(x, tuple) else str(x))
def test_bad_numbers_are_refused_at_the_flag_or_handled(path, flag, kind, unusable):
    for value in BAD_VALUES:
        result = CliRunner().invoke(main, [*path, flag, value, *where_args(path, unusable)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            value, result.output)
        assert result.exit_code in (1, 2), (value, result.output)
        assert result.output.strip().splitlines()[-1].startswith("Error:"), (value, result.output)
        if flag in LEAD_OWNED:
            continue
        refused = result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output
        assert refused == expected_refusal(flag, kind, value), (value, result.output)


@pytest.mark.parametrize("args, flag", [
    (["pretrain", "--seed", "-1"], "--seed"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["finetune", "classify", "--epochs", "nan"], "--epochs"),
    (["finetune", "instruct", "--epochs", "inf"], "--epochs"),
    (["finetune", "classify", "--lora-rank", "-2"], "--lora-rank"),
    (["pretrain", "--batch-size", "5000000"], "--batch-size"),
    (["pretrain", "--min-lr", "nan"], "--min-lr"),
    (["fewshot", "--icl-windows", "100000000"], "--icl-windows"),
    (["seq2seq", "translate", "--length-penalty", "nan"], "--length-penalty"),
    (["seq2seq", "train", "--seed", "-1"], "--seed"),
    (["fewshot", "--seed", "-1"], "--seed"),
])
def test_the_issue_s_examples_are_one_line_errors(args, flag):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output
    assert "Traceback" not in result.output


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("a few words of text to train on\n" * 20, encoding="utf-8")
    result = CliRunner().invoke(main, ["pretrain", "--data", str(data), "--out",
                                       str(tmp_path / "run"), "--n-embd", "1048576", "--n-head", "1"])
    assert result.exit_code == 1 and "GB of memory" in result.output
    assert not (tmp_path / "run").exists()
