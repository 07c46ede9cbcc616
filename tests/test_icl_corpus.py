"""Tests for the generated in-context-learning corpus and its held-out tasks (tinyllm/icl_corpus.py)."""

import numpy as onp
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import icl_corpus as ic
from tinyllm.data import load_corpus
from tinyllm.fewshot import build_prompt, parse_task, task_lines

SMALL = 300  # episodes: enough to see every family, fast to generate


def episodes_of(text):
    """Split corpus text into episodes (lists of lines), at the blank lines."""
    return [block.split("\n") for block in text.strip("\n").split("\n\n")]


def test_corpus_is_deterministic_and_seeded():
    assert ic.icl_corpus(n_episodes=SMALL) == ic.icl_corpus(n_episodes=SMALL)
    assert ic.icl_corpus(seed=1, n_episodes=SMALL) != ic.icl_corpus(n_episodes=SMALL)


def test_registered_as_embedded_corpus():
    text = load_corpus("icl")
    assert text == ic.icl_corpus()
    assert 200_000 < len(text) < 1_500_000  # big enough to be varied, small enough to be quick


def test_every_episode_demonstrates_one_function_in_the_template():
    """Each line is the instruction of the episode's family or "xy", and an input always
    gets the same output within its episode (it is a function); or the episode repeats one
    random string on 3 to 6 lines."""
    instructions = {family[2] for family in ic.FAMILIES.values()} | {ic.REPEAT_INSTRUCTION}
    seen_instruction, repeats = 0, 0
    for lines in episodes_of(ic.icl_corpus(n_episodes=SMALL)):
        if lines[0] in instructions:
            seen_instruction += 1
            lines = lines[1:]
        if len(lines[0]) > 2:  # a repeat episode
            repeats += 1
            assert 3 <= len(lines) <= 6 and len(set(lines)) == 1 and 4 <= len(lines[0]) <= 10
            continue
        assert ic.DEMOS_PER_EPISODE[0] <= len(lines) <= ic.DEMOS_PER_EPISODE[1]
        mapping = {}
        for line in lines:
            assert len(line) == 2, line
            x, y = line
            assert mapping.setdefault(x, y) == y, f"input {x!r} maps to two outputs"
        assert len(mapping) <= ic.DOMAIN_SIZES[1]
    assert 0.3 * SMALL < seen_instruction < 0.7 * SMALL  # half the episodes carry an instruction
    assert 0.15 * SMALL < repeats < 0.45 * SMALL  # REPEAT_FRACTION = 0.3


def test_episode_text_is_the_fewshot_prompt_plus_answer():
    """The corpus and `tinyllm fewshot` use the same template, character for character."""
    records = [{"input": "a", "output": "7"}, {"input": "b", "output": "1"}]
    prompt = build_prompt("map each letter to a digit", records[:1], "b")
    assert ic.episode_text("map each letter to a digit", records) == prompt + "1\n\n"


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), family=st.sampled_from(sorted(ic.FAMILIES)),
       size=st.integers(2, 8))
def test_draw_function_has_the_asked_domain(seed, family, size):
    inputs, outputs, _ = ic.FAMILIES[family]
    f = ic.draw_function(onp.random.default_rng(seed), family, size)
    assert len(f) == size
    assert set(f) <= set(inputs) and set(f.values()) <= set(outputs)


def test_heldout_tasks_never_occur_in_the_corpus_and_are_reproducible():
    for seed in range(6):
        family = sorted(ic.FAMILIES)[seed % 3]
        header, records = ic.heldout_task(seed, family=family, domain_size=4, n_records=40)
        function = {r["input"]: r["output"] for r in records}
        assert len(records) == 40 and len(function) <= 4
        assert all(function[r["input"]] == r["output"] for r in records)  # consistent
        assert not ic.occurs_in_corpus(function)
        assert header == {"instruction": ic.FAMILIES[family][2]}
        assert ic.heldout_task(seed, family=family, domain_size=4, n_records=40)[1] == records


def test_occurs_in_corpus_finds_a_corpus_function():
    function = next(f for f, _ in ic.corpus_episodes()[17:] if f)
    assert ic.occurs_in_corpus(function)
    assert ic.occurs_in_corpus(dict(list(function.items())[:1]))  # a part of one occurs too


def test_heldout_task_is_a_valid_task_file():
    header, records = ic.heldout_task(3, n_records=12)
    task = parse_task(task_lines(header, records), "held-out")
    assert task.instruction == header["instruction"] and len(task.records) == 12
    assert [r["input"] for r in task.records] == [r["input"] for r in records]


def test_the_corpus_does_not_import_the_evaluation():
    # Data never imports evaluation code: the corpus and the few-shot evaluation share the
    # template module, and loading the corpus leaves tinyllm.fewshot unimported.
    import os
    import subprocess
    import sys

    code = "import sys, tinyllm.icl_corpus; print('tinyllm.fewshot' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True).stdout.strip()
    assert out == "False"


def test_shipped_heldout_tasks_are_what_heldout_task_draws():
    """examples/tasks/heldout/ (the README's unseen tasks) holds heldout_task(seed) for seeds 0 to
    11, cycling through the families: generated, never edited by hand, so never in the corpus."""
    import os

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "examples", "tasks", "heldout")
    names = sorted(os.listdir(folder))
    assert names == [f"heldout-{seed:02d}.jsonl" for seed in range(12)]
    for seed, name in enumerate(names):
        family = sorted(ic.FAMILIES)[seed % len(ic.FAMILIES)]
        header, records = ic.heldout_task(seed, family=family, domain_size=4, n_records=60)
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            assert f.read().splitlines() == task_lines(header, records)
