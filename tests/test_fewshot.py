"""Tests for few-shot prompting and its measurement (tinyllm/fewshot.py) and the `fewshot` and
`generate --examples` commands: task files and their errors, the template, demonstration
sampling, both scoring rules, Wilson intervals, the ICL score, results JSON."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as onp
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm import fewshot as fs
from tinyllm import fileio
from tinyllm.checkpoint import save_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig, TrainConfig
from tinyllm.errors import TinyLLMError
from tinyllm.generate import generate_ids, greedy_batch
from tinyllm.models import gpt_loss, init_gpt
from tinyllm.optim import adamw_init
from tinyllm.tokenizers import BPETokenizer, CharTokenizer

ALPHABET = "abcdefgh0123 \n"
TOKENIZER = CharTokenizer.train(ALPHABET)
CONFIG = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
RECORDS = [{"input": x, "output": y} for x, y in zip("abcdabcdab", "0120012001")]


@pytest.fixture(scope="module")
def params():
    return init_gpt(CONFIG, onp.random.default_rng(0))


def write_task(path, header=None, records=RECORDS):
    path.write_text("\n".join(fs.task_lines(header, records)) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- task files


def test_parse_task_reads_header_and_records_with_line_numbers():
    lines = ['{"instruction": "map a b", "choices": ["0", "1", "2"]}', "",
             '{"input": "a", "output": "0"}', '{"input": "b", "output": "1"}']
    task = fs.parse_task(lines, "t.jsonl")
    assert task.instruction == "map a b" and task.choices == ("0", "1", "2")
    assert [r["line"] for r in task.records] == [3, 4]  # blank lines skipped, numbering kept


@pytest.mark.parametrize("lines, line_no, words", [
    (['{"input": "a", "output": "0"}', "{oops"], 2, "not valid JSON"),
    (['{"input": "a"}'], 1, "'output'"),
    (['{"input": "a", "output": "0"}', "[1, 2]"], 2, "JSON object"),
    (['{"input": "a\\nb", "output": "0"}'], 1, "one-line"),
    (['{"choices": ["0", "1"]}', '{"input": "a", "output": "5"}'], 2, "choices"),
    (['{"input": "a", "output": "0"}', '{"instruction": "late header"}'], 2, "unexpected key"),
    (['{"instruction": "x", "colour": "red"}'], 1, "unknown header key"),
    (['{"input": "a", "output": "0"}', "[" * 100_000 + "]" * 100_000], 2, "deeply"),
])
def test_bad_lines_name_the_file_and_line(lines, line_no, words):
    with pytest.raises(TinyLLMError, match=f"t.jsonl, line {line_no}: .*{words}"):
        fs.parse_task(lines, "t.jsonl")


def test_every_bad_line_of_a_task_file_is_named_in_one_error():
    lines = ['{"choices": ["0", "1"]}', '{"input": "a", "output": "0"}', "{oops", "",
             '{"input": "b", "output": "5"}', '{"input": "c", "output": "1"}']
    with pytest.raises(TinyLLMError) as err:
        fs.parse_task(lines, "t.jsonl")
    assert str(err.value) == (
        "t.jsonl, line 3: not valid JSON (Expecting property name enclosed in double quotes)"
        " (and 1 more bad record: t.jsonl, line 5: output '5' is not one of the header's"
        " 'choices')")


def test_empty_and_missing_task_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(TinyLLMError, match="empty.jsonl: the task file has no records"):
        fs.read_task(str(tmp_path / "empty.jsonl"))
    with pytest.raises(TinyLLMError, match="not found"):
        fs.read_task(str(tmp_path / "nope.jsonl"))


def test_a_task_file_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n' * 4, encoding="utf-8")
    monkeypatch.setattr(fs, "MAX_TASK_BYTES", 100)
    monkeypatch.setattr(fileio, "read_fd",
                        lambda *a: pytest.fail("read before its size was checked"))
    with pytest.raises(TinyLLMError, match="big.jsonl' is 120 bytes, more than 100"):
        fs.read_task(str(path))


def test_a_task_file_with_a_byte_order_mark_crlf_and_u2028_in_a_string(tmp_path):
    # a Windows editor's BOM and line ends; U+2028 is a character of a JSON string, not a line end
    path = tmp_path / "t.jsonl"
    path.write_text('\ufeff{"choices": ["0", "1"]}\r\n{"input": "a", "output": "0"}\r\n'
                    '{"input": "b\u2028c", "output": "1"}\r\n', encoding="utf-8")
    task = fs.read_task(str(path))
    assert task.choices == ("0", "1")
    assert [(r["input"], r["line"]) for r in task.records] == [("a", 2), ("b\u2028c", 3)]


def test_task_lines_round_trip():
    header = {"instruction": "map", "choices": ["0", "1", "2"]}
    task = fs.parse_task(fs.task_lines(header, RECORDS))
    assert [{"input": r["input"], "output": r["output"]} for r in task.records] == RECORDS
    assert task.choices == ("0", "1", "2")


# ----------------------------------------------------------------------------- prompts


def test_build_prompt_worked_example():
    demos = [{"input": "a", "output": "x"}, {"input": "bc", "output": "yz"}]
    assert fs.build_prompt(None, demos, "d") == "ax\nbcyz\nd"
    assert fs.build_prompt("map it", [], "d") == "map it\nd"  # zero-shot: instruction only


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 1000))
def test_demonstrations_never_include_the_query(n, seed):
    queries = list(range(n))
    for q, order in zip(queries, fs.demo_orders(n, queries, onp.random.default_rng(seed))):
        assert q not in order and sorted(order + [q]) == queries  # every other record, once


def test_too_few_records_for_k():
    task = fs.parse_task(fs.task_lines(None, RECORDS[:4]), "small.jsonl")
    with pytest.raises(TinyLLMError, match=r"small.jsonl: 4 records, fewer than k \+ 1 = 5"):
        fs.check_enough_records(task, 4)


def test_parse_shots():
    assert fs.parse_shots("8,0, 2,2") == [0, 2, 8]
    for bad in ("", "a,1", "-1"):
        with pytest.raises(TinyLLMError, match="--shots"):
            fs.parse_shots(bad)


# ----------------------------------------------------------------------------- scoring


def test_sequence_logprobs_match_unpadded_forward_passes(params):
    """Right padding in the batch must not change any answer's log-likelihood (causality)."""
    prompt = TOKENIZER.encode("a0\nb")
    answers = [TOKENIZER.encode(a + "\n") for a in ("1", "12", "0123")]
    got = fs.sequence_logprobs(params, CONFIG, [(prompt, a) for a in answers])
    for value, answer in zip(got, answers):
        seq = onp.asarray(prompt + answer, dtype=onp.int32)[None, :]
        logp = fs.log_probs(params, CONFIG, seq)[0]
        want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
        assert value == pytest.approx(want, abs=1e-6)


def test_a_greedy_answer_is_temperature_zero_sampling_cut_at_the_newline(params):
    prompt = TOKENIZER.encode("a0\nb")
    newline = TOKENIZER.encode("\n")[0]
    got = greedy_batch(params, CONFIG, [prompt], [10], newline)[0]
    sampled = generate_ids(params, CONFIG, prompt, 10, onp.random.default_rng(0), temperature=0)
    cut = sampled.index(newline) if newline in sampled else len(sampled)
    assert got == sampled[:cut]


def test_evaluate_task_counts_and_reuses_queries(params):
    task = fs.parse_task(fs.task_lines({"choices": ["0", "1", "2"]}, RECORDS), "t")
    rows = fs.evaluate_task(params, CONFIG, TOKENIZER, task, [0, 2], n_queries=6, seed=1)
    assert [r["k"] for r in rows] == [0, 2] and all(r["n"] == 6 for r in rows)
    assert all(r["chance"] == pytest.approx(1 / 3, abs=1e-4) for r in rows)
    again = fs.evaluate_task(params, CONFIG, TOKENIZER, task, [0, 2], n_queries=6, seed=1)
    assert rows == again  # reproducible from the seed


def test_exact_match_compares_the_whole_greedy_line(params, monkeypatch):
    """Without choices, a query is right only if the greedy line equals the output exactly."""
    monkeypatch.setattr(fs, "greedy_batch", lambda *args, **kwargs: [TOKENIZER.encode("12")])
    task = fs.parse_task(fs.task_lines(None, RECORDS), "t")
    prompt = fs.build_prompt(None, [], "a")
    scores = {out: fs.score_query(params, CONFIG, TOKENIZER, task, prompt,
                                  {"input": "a", "output": out, "line": 1}, 0)
              for out in ("12", "1", "123", "21")}
    assert scores == {"12": 1, "1": 0, "123": 0, "21": 0}


# A byte-level BPE whose merges are a blank line ("\n\n", id 256) and "ab" (id 257): the kind
# of tokens a model pretrained on prose has, which a greedy answer can end or be spelled with.
BLANK_LINE, AB = 256, 257
BPE = BPETokenizer([(10, 10), (97, 98)])
BPE_CONFIG = GPTConfig(vocab_size=BPE.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.mark.parametrize("greedy, context, right", [
    ([AB, 10], 16, 1),  # the answer's own tokens, then the newline
    ([AB, BLANK_LINE], 16, 1),  # the line ends in a blank-line token, not in id 10
    ([97, 98, 10, 99], 16, 1),  # "ab" spelled "a", "b"
    ([97, 98, BLANK_LINE, 99], 16, 1),
    ([97, 98, 32, 10], 16, 0),  # "ab " is another line
    ([97, 98, 98, 10], 16, 0),
    ([AB, 10], 6, 1),  # the context (6 tokens) holds the prompt (4) and the answer (2)
    ([97, 98, 10], 6, 0),  # there it ends at "ab", with no room for the newline: no answer
])
def test_exact_match_compares_the_text_of_the_greedy_line(monkeypatch, greedy, context, right):
    """The greedy line is right when its text is the output, however the model spelled it in
    tokens and whichever token carries its newline (comparing token ids scored a model that
    ends its line with a blank-line token wrong)."""
    def fake_greedy_batch(params, config, prompts, limits, stop_id, **kwargs):
        new = greedy[:limits[0]]  # what greedy_batch returns: to the stop id, without it
        return [new[:new.index(stop_id)] if stop_id in new else new]

    monkeypatch.setattr(fs, "greedy_batch", fake_greedy_batch)
    records = [{"input": "c", "output": "ab"}, {"input": "d", "output": "ab"}]
    task = fs.parse_task(fs.task_lines(None, records), "t")
    config = dataclasses.replace(BPE_CONFIG, block_size=context)
    prompt = fs.build_prompt(None, task.records[1:], "c")  # "dab\nc": 4 tokens, d ab \n c
    assert fs.score_query(None, config, BPE, task, prompt, task.records[0], 1) == right


def test_a_prompt_that_overflows_only_when_scored_is_refused_before_the_scoring(monkeypatch):
    """Every query's longest prompt is checked against the context before any is scored, in the
    tokens the scoring uses: the prompt and each answer encoded apart. (Encoded as one text,
    "...a" + "b" merged into fewer tokens, so the check passed and the error came only after
    the smaller k had been scored.)"""
    monkeypatch.setattr(fs, "greedy_batch", lambda *args, **kwargs: pytest.fail("scored"))
    records = [{"input": "a", "output": "b"}] * 3
    task = fs.parse_task(fs.task_lines(None, records), "t.jsonl")
    # 2-shot: "ab\nab\na" is 5 tokens, "b\n" 2 more = 7; "ab\nab\nab\n" as one text is 6
    config = dataclasses.replace(BPE_CONFIG, block_size=6)
    with pytest.raises(TinyLLMError, match=r"t.jsonl, line \d: the 2-shot prompt plus its answer"
                                           r" is 7 tokens"):
        fs.evaluate_task(None, config, BPE, task, [0, 2], seed=0)


def test_choices_pick_the_likeliest_answer(params):
    task = fs.parse_task(fs.task_lines({"choices": ["0", "1", "2"]}, RECORDS), "t")
    prompt = fs.build_prompt(None, RECORDS[:2], "c")
    prompt_ids = TOKENIZER.encode(prompt)
    logps = fs.sequence_logprobs(params, CONFIG,
                                 [(prompt_ids, TOKENIZER.encode(c + "\n")) for c in "012"])
    best = "012"[int(onp.argmax(logps))]
    for out in "012":
        got = fs.score_query(params, CONFIG, TOKENIZER, task, prompt,
                             {"input": "c", "output": out, "line": 1}, 2)
        assert got == int(out == best)


def alone_choice(params, task, prompt):
    """The choice a prompt scores highest, from one unpadded forward pass per candidate."""
    prompt_ids = TOKENIZER.encode(prompt)
    totals = []
    for c in task.choices:
        answer = TOKENIZER.encode(c + "\n")
        logp = fs.log_probs(params, CONFIG, onp.asarray([prompt_ids + answer]))[0]
        totals.append(sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(answer)))
    return task.choices[int(onp.argmax(totals))]


def alone_line(params, prompt, limit):
    """The greedy line a prompt gets by sampling at temperature 0, alone, to `limit` tokens."""
    ids = generate_ids(params, CONFIG, TOKENIZER.encode(prompt), limit, onp.random.default_rng(0),
                       temperature=0)
    newline = TOKENIZER.encode("\n")[0]
    return TOKENIZER.decode(ids[:ids.index(newline)] if newline in ids else ids)


@pytest.mark.parametrize("choices", [("0", "1", "2", "3"), None])
def test_queries_scored_in_groups_get_the_answers_each_gets_alone(params, choices):
    """Prompts of different lengths, grouped by 3 (the last group short): each query is right
    exactly when its output is the answer the model gives that prompt alone (for exact match:
    its greedy line, to as many tokens as the scoring lets it run)."""
    params = dict(params, wte=params["wte"].copy())
    params["wte"][TOKENIZER.encode("\n")[0]] *= 8  # the model ends some lines early
    task = fs.parse_task(fs.task_lines(choices and {"choices": list(choices)}, RECORDS), "t")
    prompts = [fs.build_prompt(None, RECORDS[:k], x) for k, x in enumerate("abcdabc")]
    if choices:  # every other query's output is the model's own choice, the others another
        answers = [alone_choice(params, task, p) for p in prompts]
        outputs = [a if i % 2 == 0 else ("2" if a != "2" else "1") for i, a in enumerate(answers)]
        want = [1, 0, 1, 0, 1, 0, 1]
    else:  # the model's own line where it ends one early, else the start of its longer line
        lines = [alone_line(params, p, 20) for p in prompts]
        outputs = [line if 0 < len(line) < 8 else (line[:3] or "0") for line in lines]
        want = [int(alone_line(params, p, min(CONFIG.block_size - len(p), len(out) + 9)) == out)
                for p, out in zip(prompts, outputs)]
        assert 0 < sum(want) < len(want)  # some right, some wrong
    records = [{"input": "x", "output": out, "line": i + 1} for i, out in enumerate(outputs)]
    calls = []
    scores = fs.score_queries(params, CONFIG, TOKENIZER, task, prompts, records, 4,
                              on_query=lambda: calls.append(1), batch_size=3)
    assert scores == want and len(calls) == 7


def test_a_choice_task_runs_no_more_sequences_a_pass_than_the_group_has_queries(params,
                                                                                monkeypatch):
    """Memory must not grow with the number of choices: 3 queries of 4 choices are 12
    sequences, run 3 at a time (that the scores are right when the candidates are split so is
    `test_queries_scored_in_groups_get_the_answers_each_gets_alone`)."""
    task = fs.parse_task(fs.task_lines({"choices": ["0", "1", "2", "3"]}, RECORDS), "t")
    prompts = [fs.build_prompt(None, RECORDS[:k], "a") for k in range(3)]
    sizes, real = [], fs.sequence_logprobs

    def counting(params_, config, pairs):
        sizes.append(len(pairs))
        return real(params_, config, pairs)

    monkeypatch.setattr(fs, "sequence_logprobs", counting)
    fs.score_queries(params, CONFIG, TOKENIZER, task, prompts, task.records[:3], 2, batch_size=3)
    assert sizes == [3, 3, 3, 3]


def test_prompt_longer_than_the_context_names_file_and_line(params):
    long_records = [{"input": "abcdefgh", "output": "0123"} for _ in range(6)]
    task = fs.parse_task(fs.task_lines(None, long_records), "long.jsonl")
    with pytest.raises(TinyLLMError, match=r"long.jsonl, line \d: the 4-shot prompt .* longer than"
                                           r" the model's context of 32"):
        fs.evaluate_task(params, CONFIG, TOKENIZER, task, [0, 4], seed=0)


def test_unknown_character_names_file_and_line(params):
    task = fs.parse_task(fs.task_lines(None, RECORDS + [{"input": "Z", "output": "0"}]), "z.jsonl")
    with pytest.raises(TinyLLMError, match=r"z.jsonl, line 11: .*'Z'"):
        fs.evaluate_task(params, CONFIG, TOKENIZER, task, [0], seed=0)


@pytest.mark.parametrize("seed", range(4))
def test_unknown_character_in_a_demonstration_names_its_own_line(params, seed):
    """Not the line of the query whose prompt shows it as a demonstration."""
    records = RECORDS[:4] + [{"input": "Z", "output": "0"}] + RECORDS[4:]
    task = fs.parse_task(fs.task_lines(None, records), "z.jsonl")
    with pytest.raises(TinyLLMError, match=r"z.jsonl, line 5: .*'Z'"):
        fs.evaluate_task(params, CONFIG, TOKENIZER, task, [0, 4], seed=seed)


def test_unknown_character_in_the_header_names_its_line(params):
    lines = ["", '{"instruction": "a b Z"}'] + fs.task_lines(None, RECORDS)
    with pytest.raises(TinyLLMError, match=r"h.jsonl, line 2: .*'Z'"):
        fs.evaluate_task(params, CONFIG, TOKENIZER, fs.parse_task(lines, "h.jsonl"), [0])


# ----------------------------------------------------------------------------- statistics


def test_wilson_interval_worked_example():
    low, high = fs.wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert fs.wilson_interval(0, 20)[0] == 0.0 and fs.wilson_interval(20, 20)[1] == 1.0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1))
def test_wilson_interval_contains_the_estimate_and_shrinks_with_n(n, frac):
    k = round(frac * n)
    low, high = fs.wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    low4, high4 = fs.wilson_interval(4 * k, 4 * n)
    assert high4 - low4 < high - low


def test_pool_results_adds_counts():
    a = [fs.accuracy_row(0, 1, 10, 0.5), fs.accuracy_row(8, 9, 10, 0.5)]
    b = [fs.accuracy_row(0, 3, 30, 0.1), fs.accuracy_row(8, 27, 30, 0.1)]
    pooled = fs.pool_results([a, b])
    assert [(r["correct"], r["n"]) for r in pooled] == [(4, 40), (36, 40)]
    assert pooled[0]["chance"] == pytest.approx(0.2)


def test_icl_positions_scale_olsson():
    assert fs.icl_positions(96) == (10, 95)
    assert fs.icl_positions(512) == (51, 511)


def test_icl_score_is_the_loss_at_its_late_position_minus_its_early_one(params):
    """Held-out text exactly one window long, so every window is that one: the early and late
    losses must be the next-token losses at the two positions, computed here by gpt_loss with
    only that position counted."""
    ids = onp.asarray(TOKENIZER.encode(("a0\nb1\nc2\n" * 4)[:CONFIG.block_size + 1]))
    result = fs.icl_score(params, CONFIG, ids, n_windows=5, seed=0, batch=2)
    assert (result["early_position"], result["late_position"]) == (4, 32)
    x, y = ids[None, :-1], ids[None, 1:]

    def loss_at(t):
        mask = onp.zeros(x.shape)
        mask[0, t] = 1.0
        return float(gpt_loss(params, x, y, CONFIG, mask=mask))

    assert result["early_loss"] == pytest.approx(loss_at(3), rel=1e-5)
    assert result["late_loss"] == pytest.approx(loss_at(31), rel=1e-5)
    assert result["score"] == pytest.approx(loss_at(31) - loss_at(3), rel=1e-4, abs=1e-6)
    # five copies of one window: no spread, but for float32 rounding (batches of 2, 2 and 1
    # take other BLAS kernels, and differ in the last bits)
    assert result["stderr"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(TinyLLMError, match="at least 33 tokens"):
        fs.icl_score(params, CONFIG, ids[:20])


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, params):
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(str(out), params, adamw_init(params), onp.random.default_rng(0).bit_generator.state,
                    CONFIG, TrainConfig(), TOKENIZER, 0, extra={"data": None})
    (out.parent / "heldout.txt").write_text("a0\nb1\n" * 30, encoding="utf-8")
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fewshot_command_prints_table_and_writes_json(run_dir, tmp_path):
    task = write_task(tmp_path / "task.jsonl", {"choices": ["0", "1", "2"]})
    out = tmp_path / "results.json"
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", task, "--shots", "0,1,4",
                    "--queries", 5, "--out", out, "--icl-data", run_dir.parent / "heldout.txt",
                    "--icl-windows", 10)
    assert result.exit_code == 0, result.output
    assert "shots  accuracy" in result.output and "in-context learning score" in result.output
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["format"] == "tinyllm-fewshot-results" and saved["version"] == 1
    assert [r["k"] for r in saved["pooled"]] == [0, 1, 4]
    assert saved["tasks"][0]["scoring"] == "choices" and saved["icl_score"]["n_windows"] == 10


def test_fewshot_command_prints_a_row_per_task(run_dir, tmp_path):
    """Two tasks: each gets its own row of accuracies by k, equal to its results in the JSON,
    besides the pooled table."""
    first = write_task(tmp_path / "first.jsonl", {"choices": ["0", "1", "2"]})
    second = write_task(tmp_path / "second.jsonl", {"instruction": "add 1"})
    out = tmp_path / "results.json"
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", first, "--task", second,
                    "--shots", "0,2", "--queries", 4, "--out", out, "--icl-windows", 0)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text(encoding="utf-8"))
    lines = result.output.splitlines()  # the progress log (stderr) comes first
    start = lines.index(next(line for line in lines if line.startswith("task ")))
    assert lines[start].split() == ["task", "k=0", "k=2", "queries", "chance"]
    for line, task in zip(lines[start + 1:start + 3], saved["tasks"], strict=True):
        path, acc0, acc2, n, chance = line.split()
        assert path == task["path"] and int(n) == 4
        assert [float(acc0), float(acc2)] == [round(r["accuracy"], 3) for r in task["results"]]
    assert "pooled over 2 task(s):" in result.output and "shots  accuracy" in result.output


def test_fewshot_shows_how_many_queries_are_scored(run_dir, tmp_path):
    """Each k scored every query before a line was printed: minutes of silence on a large task."""
    first = write_task(tmp_path / "first.jsonl", {"choices": ["0", "1", "2"]})
    second = write_task(tmp_path / "second.jsonl", None, RECORDS[:5])
    updates, lines = [], []

    class Shown:
        def __init__(self, total):
            self.total = total

        def update(self, done):
            updates.append((done, self.total))

        def message(self, line):
            lines.append(line)

        def close(self):
            updates.append("closed")

    fs.run_fewshot(str(run_dir), [str(first), str(second)], [0, 2], n_queries=8, icl_windows=0,
                   progress=Shown)
    total = 2 * (8 + 5)  # 8 queries of the first task, all 5 of the second, at two k each
    assert updates == [(done, total) for done in range(1, total + 1)] + ["closed"]
    assert lines[0].startswith(str(first)) and len(lines) == 6  # a line per task and per k
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", second, "--shots", "0,1",
                    "--icl-windows", 0)
    assert result.exit_code == 0 and "queries scored: 10/10" in result.stderr, result.output


def test_more_queries_than_a_task_has_records_is_said(run_dir, tmp_path):
    """--queries 8 on a task of 5 records scores 5 queries: said in one line naming the task
    (it was used quietly), not refused, since pooled tasks may differ in size."""
    big = write_task(tmp_path / "big.jsonl")  # 10 records
    small = write_task(tmp_path / "small.jsonl", None, RECORDS[:5])
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", big, "--task", small,
                    "--shots", "0", "--queries", 8, "--icl-windows", 0)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --queries 8 is more than the records of 1 task(s), so all of their"
                     f" records are queries: {small} (5)"]
    assert "queries scored: 13/13" in result.stderr  # 8 of the big task, all 5 of the small
    enough = invoke("fewshot", "--checkpoint", run_dir, "--task", big, "--shots", "0",
                    "--queries", 8, "--icl-windows", 0)
    assert enough.exit_code == 0 and "note:" not in enough.stderr, enough.output


def test_a_lora_instruction_run_is_scored_with_its_adapters_merged(params, tmp_path):
    """`generate` and `embed` accept a LoRA run (kind gpt-lora) by merging its adapters; fewshot
    refused it. Its scores equal those of a plain run holding the merged weights."""
    from tinyllm.lora import LoRAGPTConfig, init_lora, merge_lora

    config = LoRAGPTConfig(**CONFIG.__dict__, lora_rank=2, lora_alpha=4.0)
    adapters = init_lora(params, 2, onp.random.default_rng(1))
    for entry in adapters["h"]:  # B = 0 would change nothing: give the adapters a real effect
        for layer in (*entry["attn"].values(), *entry["mlp"].values()):
            layer["b"] = onp.random.default_rng(2).standard_normal(layer["b"].shape).astype("f4")
    adapted = {**params, "lora": adapters}
    runs = {"lora": (tmp_path / "lora", adapted, config, "gpt-lora"),
            "merged": (tmp_path / "merged", merge_lora(adapted, 4.0, 2), CONFIG, "gpt")}
    task = write_task(tmp_path / "task.jsonl", {"choices": ["0", "1", "2"]})
    (tmp_path / "heldout.txt").write_text("a0\nb1\nc2 d3\n" * 20, encoding="utf-8")
    scores = {}
    for name, (out, weights, cfg, kind) in runs.items():
        save_checkpoint(str(out), weights, adamw_init(weights),
                        onp.random.default_rng(0).bit_generator.state, cfg, TrainConfig(),
                        TOKENIZER, 0, extra={"finetune": {"task": "instruct"}}, kind=kind)
        result = invoke("fewshot", "--checkpoint", out, "--task", task, "--shots", "0,2",
                        "--icl-data", tmp_path / "heldout.txt", "--icl-windows", 4,
                        "--out", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        scores[name] = saved["pooled"], saved["icl_score"]  # the losses show any weight change
    assert scores["lora"] == scores["merged"]
    unmerged = fs.icl_score(params, CONFIG, TOKENIZER.encode("a0\nb1\nc2 d3\n" * 20), 4)
    assert unmerged["early_loss"] != scores["lora"][1]["early_loss"]  # the adapters count


def test_a_fine_tuning_run_asks_for_icl_data_rather_than_blame_a_changed_corpus(params,
                                                                              tmp_path):
    """A fine-tuning run keeps no pretraining text: the ICL score was refused as "the data
    'pydoc' of the run ... has changed", which it had not. Now it says what to give."""
    out = tmp_path / "instruct"
    save_checkpoint(str(out), params, adamw_init(params),
                    onp.random.default_rng(0).bit_generator.state, CONFIG, TrainConfig(),
                    TOKENIZER, 0, extra={"finetune": {"task": "instruct"}})
    task = write_task(tmp_path / "task.jsonl")
    error = one_error_line(invoke("fewshot", "--checkpoint", out, "--task", task, "--shots", "0"))
    assert "fine-tuning run" in error and "--icl-data" in error and "changed" not in error
    (tmp_path / "heldout.txt").write_text("a0\nb1\n" * 30, encoding="utf-8")
    given = invoke("fewshot", "--checkpoint", out, "--task", task, "--shots", "0",
                   "--icl-data", tmp_path / "heldout.txt", "--icl-windows", 4)
    assert given.exit_code == 0 and "in-context learning score" in given.stdout, given.output


@pytest.mark.parametrize("secret", [b"a0\nb1 caf\xe9 pin 4711\n", None])  # not UTF-8, or gone
def test_a_stored_data_file_that_cannot_be_read_is_one_line_naming_icl_data(params, tmp_path,
                                                                           secret):
    """The path comes from config.json: what is wrong inside the file (its line, byte, a
    character) is not shown, and the way out is fewshot's own flag (fewshot has no --resume)."""
    path = tmp_path / "secret.txt"
    if secret is not None:
        path.write_bytes(secret)
    out = tmp_path / "run"
    save_checkpoint(str(out), params, adamw_init(params),
                    onp.random.default_rng(0).bit_generator.state, CONFIG, TrainConfig(),
                    TOKENIZER, 0, extra={"data": str(path), "data_sha256": "0" * 64})
    task = write_task(tmp_path / "task.jsonl")
    error = one_error_line(invoke("fewshot", "--checkpoint", out, "--task", task, "--shots", "0"))
    assert str(path) in error and str(out) in error and "--icl-data FILE" in error
    assert "--resume" not in error and ":2" not in error and "0xe9" not in error
    assert "é" not in error and "4711" not in error


@pytest.mark.parametrize("text, words", [("a0\n", "--icl-data"), ("a0Z\n" * 20, "'Z'")])
def test_bad_icl_data_is_refused_before_the_scoring(run_dir, tmp_path, text, words):
    """A held-out text too short for the ICL score, or with a character the model never saw,
    was found only after every task had been scored."""
    task = write_task(tmp_path / "task.jsonl")
    (tmp_path / "heldout.txt").write_text(text, encoding="utf-8")
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", task, "--shots", "0",
                    "--icl-data", tmp_path / "heldout.txt")
    error = one_error_line(result)
    assert "heldout.txt" in error and words in error and "records," not in result.output


def test_a_task_directory_means_its_jsonl_files(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (folder / name).write_text("", encoding="utf-8")
    single = tmp_path / "single.jsonl"
    assert fs.task_files([str(single), str(folder)]) == [
        str(single), str(folder / "a.jsonl"), str(folder / "b.jsonl")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TinyLLMError, match="no .jsonl task files"):
        fs.task_files([str(empty)])


def test_a_task_given_twice_is_refused_not_pooled_twice(tmp_path):
    """Its queries were counted twice in the pooled rows, which narrowed the interval."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    task = write_task(folder / "a.jsonl")
    again = tmp_path / "tasks" / ".." / "tasks" / "a.jsonl"
    for paths in ([task, task], [folder, task], [task, again]):
        with pytest.raises(TinyLLMError, match=r"the same task file as .*a\.jsonl, given twice"):
            fs.task_files([str(p) for p in paths])


def one_error_line(result):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_fewshot_command_bad_input_is_one_line(run_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert "no records" in one_error_line(invoke("fewshot", "--checkpoint", run_dir, "--task", empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "0"}\n{"input": \n', encoding="utf-8")
    assert "bad.jsonl, line 2" in one_error_line(invoke("fewshot", "--checkpoint", run_dir,
                                                        "--task", bad))
    few = write_task(tmp_path / "few.jsonl", None, RECORDS[:3])
    assert "fewer than k + 1" in one_error_line(invoke("fewshot", "--checkpoint", run_dir,
                                                       "--task", few, "--shots", "0,8"))


def test_a_prompt_too_long_names_its_longest_demonstration():
    task = SimpleNamespace(path="t.jsonl")
    query = {"line": 2, "input": "ab", "output": "0"}
    demos = [{"line": 5, "input": "a" * 30, "output": "1"},
             {"line": 3, "input": "a", "output": "1"}]
    with pytest.raises(TinyLLMError, match=r"t.jsonl, line 2: the 2-shot prompt .* 40 tokens,"
                                           r" longer than the model's context of 32 \(its"
                                           r" longest demonstration is line 5\)"):
        fs.check_fits(40, 32, task, query, 2, demos)
    long_query = {**query, "input": "a" * 40}  # the query itself is the longest: no more said
    with pytest.raises(TinyLLMError) as err:
        fs.check_fits(40, 32, task, long_query, 2, demos)
    assert "demonstration" not in str(err.value)


def test_check_task_gives_each_query_the_demonstrations_of_its_prompt(monkeypatch):
    task = fs.parse_task([json.dumps(r) for r in RECORDS], "t.jsonl")
    seen = []
    monkeypatch.setattr(fs, "check_fits", lambda n, size, task, record, k, demos=(): seen.append(
        (record["line"], [d["line"] for d in demos], k)))
    fs.check_task(CharTokenizer.train("".join(r["input"] + r["output"] for r in RECORDS) + "\n:",
                                      special_tokens=("<|endoftext|>",)), 999, task, [0, 2],
                  seed=3)
    queries, orders = fs.query_plan(task, None, 3)
    assert seen == [(task.records[q]["line"], [task.records[i]["line"] for i in order[:2]], 2)
                    for q, order in zip(queries, orders)]


@pytest.mark.parametrize("bad_record, words", [
    ({"input": "abcdefgh" * 4, "output": "0"}, "longer than the model's context of 32"),
    ({"input": "Z", "output": "0"}, "'Z'"),
])
def test_a_bad_second_task_is_refused_before_the_first_is_scored(run_dir, tmp_path, monkeypatch,
                                                                  bad_record, words):
    """Every task's texts and prompts are checked before any task is scored, not after the first
    task's slow part."""
    monkeypatch.setattr(fs, "greedy_batch", lambda *args, **kwargs: pytest.fail("scored"))
    good = write_task(tmp_path / "a.jsonl")
    bad = write_task(tmp_path / "b.jsonl", None, RECORDS[:4] + [bad_record])
    with pytest.raises(TinyLLMError, match=r"b.jsonl, line \d: .*" + words):
        fs.run_fewshot(str(run_dir), [str(good), str(bad)], [0, 2], icl_windows=0)


def test_an_out_file_in_a_missing_directory_is_refused_before_the_scoring(run_dir, tmp_path):
    """Not after the whole run, by the name of a temporary file the user never gave."""
    task = write_task(tmp_path / "task.jsonl")
    out = tmp_path / "no" / "results.json"
    result = invoke("fewshot", "--checkpoint", run_dir, "--task", task, "--shots", "0",
                    "--icl-windows", 0, "--out", out)
    assert f"--out {out}: the directory" in one_error_line(result)
    assert "records," not in result.output  # no task was scored


def test_generate_with_examples_puts_demonstrations_first(run_dir, tmp_path):
    task = write_task(tmp_path / "task.jsonl", {"instruction": "add 1"})
    result = invoke("generate", "--checkpoint", run_dir, "--examples", task, "--shots", 2,
                    "--prompt", "c", "--temperature", 0, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("add 1\na0\nb1\nc")
    assert result.output.count("\n") == 4  # the completion stops at the end of its line
    error = one_error_line(invoke("generate", "--checkpoint", run_dir, "--examples", task,
                                  "--shots", 99))
    assert "task.jsonl" in error and "--shots 99" in error


def test_generate_refuses_examples_that_overflow_the_context(run_dir, tmp_path):
    """The model would read only the prompt's end: fewer demonstrations than --shots said."""
    task = write_task(tmp_path / "task.jsonl", {"instruction": "add 1"},
                      [{"input": "abcdabcd", "output": "0123"}] * 3)
    fits = invoke("generate", "--checkpoint", run_dir, "--examples", task, "--shots", 2,
                  "--prompt", "a", "--max-new-tokens", 1)  # 6 + 2 x 13 + 1 = 33 tokens: too many
    error = one_error_line(fits)
    assert "task.jsonl: the 2-shot prompt is 33 tokens" in error and "context of 32" in error
    one = invoke("generate", "--checkpoint", run_dir, "--examples", task, "--shots", 1,
                 "--prompt", "a", "--max-new-tokens", 1)  # 20 tokens
    assert one.exit_code == 0, one.output
