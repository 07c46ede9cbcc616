"""benchmarks/mutation_check.py plants each of its bugs where it means to.

A mutant is a literal edit whose `old` text must occur exactly once in its file; when the code
is rewritten (or the same lines are written twice), the mutant no longer plants its bug and the
README's "caught N of N" silently counts fewer. This test says which mutant went stale.

mutation_check.py leaves this file out of the suites it runs on mutated copies: a planted bug
removes its own pattern, so this test would "catch" every mutant.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_mutation_check():
    path = os.path.join(ROOT, "benchmarks", "mutation_check.py")
    spec = importlib.util.spec_from_file_location("mutation_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MUTATION_CHECK = load_mutation_check()


@pytest.mark.parametrize("mutant", MUTATION_CHECK.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_pattern_occurs_exactly_once(mutant):
    with open(os.path.join(ROOT, mutant.path), encoding="utf-8") as f:
        count = f.read().count(mutant.old)
    assert count == 1, f"{mutant.name}: {mutant.old!r} occurs {count} times in {mutant.path}"


def test_the_suites_run_on_mutants_leave_this_file_out():
    assert os.path.relpath(__file__, ROOT) in MUTATION_CHECK.NOT_RUN_ON_MUTANTS
