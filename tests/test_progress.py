"""Tests for tinyllm/progress.py: the training bar and the counting line, on a terminal and off."""

import io

import pytest

from tinyllm.progress import Counting, Progress, format_seconds


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds_examples():
    assert (format_seconds(9), format_seconds(75), format_seconds(3700)) == ("9s", "1m15s", "1h01m")


def test_off_a_terminal_a_line_every_tenth_and_the_last():
    stream = io.StringIO()
    progress = Counting(95, "texts scored", stream)
    for done in range(5, 96, 5):  # batches of 5: a line each time 9 more are done, and at 95
        progress.update(done)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        f"texts scored: {n}/95" for n in (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)]
    assert all("| eta " in line for line in lines)


def test_on_a_terminal_one_line_redrawn_in_place():
    stream = Terminal()
    progress = Counting(3, "lines embedded", stream)
    for done in (1, 2, 3):
        progress.update(done)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "lines embedded: 3/3" in text


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()])
def test_a_count_done_before_its_after_seconds_writes_nothing_and_a_later_one_does(stream,
                                                                                 monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0, 9.0, 10.0, 11.0, 12.0])  # each start, each update
    monkeypatch.setattr("tinyllm.progress.time.perf_counter", lambda: next(clock))
    progress = Counting(5, "batches", stream, after_seconds=5.0)
    for done in (1, 2, 3):
        progress.update(done)
    assert stream.getvalue() == ""  # 3 s: quiet
    progress.update(4)  # 9 s: lines from here on
    progress.update(5)
    progress.close()
    assert "batches: 5/5" in stream.getvalue() and stream.getvalue().endswith("\n")
    quiet = Counting(5, "batches", stream=Terminal(), after_seconds=float("inf"))
    quiet.update(5)
    quiet.close()  # not even the newline that ends a redrawn line
    assert quiet.stream.getvalue() == ""


def test_the_training_bar_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(100, stream=stream)
    for it in range(1, 101):
        progress.update(it, 2.5, 40.0, 1000.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("iter 100/100 [########################]")
    assert "loss 2.5000 | 40 ms/it | 1,000 tok/s" in lines[-1]
