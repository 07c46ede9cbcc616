"""Zero- and few-shot prompting, measured: task files, k-shot prompts, scoring, intervals, ICL score.

A pretrained base model can do a task it was never fine-tuned for when its prompt shows the task
(Brown et al. 2020, "Language Models are Few-Shot Learners"). Here that is measured honestly:
the same queries are scored with k = 0, 1, 2, ... demonstrations, and each accuracy comes with a
95% confidence interval and the chance level.

Task file (JSONL, UTF-8): one JSON object per line, blank lines ignored.

    {"instruction": "map each letter to a digit", "choices": ["0", "1", ...]}   <- optional header
    {"input": "q", "output": "7"}                                               <- records
    {"input": "c", "output": "0"}

The header line is optional and so are both its keys. "instruction" is put at the top of every
prompt (it is all a zero-shot prompt has); "choices" is the closed set of answers, when there
is one. Inputs, outputs and the instruction are single-line strings.

The template (tinyllm/fewshot_template.py; the generated corpus in tinyllm/icl_corpus.py is
written in the same one):

    {instruction}\\n              (only if the task has one)
    {input}{output}\\n            one line per demonstration: the answer right after its input
    {query input}                the model continues with the answer and a newline

Why no separator such as "->" between input and answer: a tiny model answers a query by an
induction head (Olsson et al. 2022): find the query's input earlier in the context and copy the
token that followed it. That lookup is learned fastest when the answer directly follows its
input. Measured (2-layer GPT, 2000 steps on the generated corpus, 8-shot exact match on unseen
functions): 0.39 with "->" in the template, 0.91 without. The cost: a task with multi-character
inputs and outputs runs them together ("cat" -> "tac" is the line "cattac"), which the model
must learn to split; the single-symbol tasks of the generated corpus have no such ambiguity.

Demonstrations for a query are drawn at random from the task's *other* records (never the query
itself). Each query gets one random order of the other records, and its k-shot prompt uses the
first k of them: the 4 demonstrations are part of the 8, so the curve over k compares like with
like rather than adding fresh noise at each k. A line repeated in the task file is another
record, so a query may be shown its copy: the held-out tasks repeat each input on purpose (the
model must find it in the prompt); in a task of distinct questions, a duplicate gives its
answer away.

Scoring:
- with "choices": the answer whose text plus the closing newline has the highest
  log-likelihood (summed over its tokens) after the prompt. The newline makes "1" and "12" two
  complete answers rather than one being a prefix of the other. Chance = 1 / len(choices).
- without: greedy decoding up to the end of the line, whose text must equal the output (as text,
  not token ids: a model may spell the answer in other tokens, or end it with a blank-line token).
  Chance = 1 / (number of distinct outputs in the task): the accuracy of a guesser that knows
  which answers occur but not which input gets which.
Queries are scored QUERY_BATCH at a time (`score_queries`): their prompts, right-padded in one
batch, get the answers each gets alone (the model is causal: padding after a row cannot change
its logits), for one forward pass per new token of the whole group.

The Wilson interval treats queries as independent draws. They are not quite: greedy zero-shot
answers depend only on the input, so a task with 4 distinct inputs gives 4 independent answers
at k = 0, however many queries repeat them. Pool several tasks (repeat --task) for honest
intervals, and read a zero-shot row on one small task with that in mind.

A prompt plus its answer must fit in the model's context (block_size tokens); a longer one is
an error naming the task file and line (no silent truncation, which would change k).

`run_fewshot` is what `tinyllm fewshot` does; it returns the results file's content:

    {"format": "tinyllm-fewshot-results", "version": 1, "checkpoint": absolute path, "iter": N,
     "seed": S, "shots": [0, 1, ...], "template": "...",
     "tasks": [{"path", "records", "scoring": "choices" | "exact-match", "results": [row, ...]}],
     "pooled": [row, ...], "icl_score": {...} or null}

where a row is {"k", "correct", "n", "accuracy", "ci95": [low, high], "chance"} (`accuracy_row`)
and the ICL score is described at `icl_score`.
"""

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as onp

from .checkpoint import load_checkpoint
from .data import load_corpus, train_val_split
from .errors import RecordErrors, TinyLLMError
from .fewshot_template import build_prompt
from .fileio import atomic_write_json, decode_utf8, read_bounded, split_lines
from .generate import greedy_batch
from .lora import merged_gpt
from .models import gpt_forward
from .ops import log_softmax
from .rundir import run_corpus

RESULTS_FORMAT = "tinyllm-fewshot-results"
RESULTS_VERSION = 1
SHOTS = "0,1,2,4,8"  # the k evaluated by default: doublings show the curve at a few points
ICL_WINDOWS = 200  # context windows averaged for the ICL score (its standard error is reported)
HEADER_KEYS = {"instruction", "choices"}
QUERY_BATCH = 16  # queries scored together: their prompts (or candidates) in one padded batch
MAX_TASK_BYTES = 64 << 20  # a task file larger than this is not one: refused before it is read
Z_95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval


@dataclass(frozen=True)
class Task:
    """A parsed task file: records are dicts {"input", "output", "line"} (line: 1-based);
    header_line is the header's line, if there is a header."""

    path: str
    instruction: str
    choices: tuple
    records: tuple
    header_line: int = None


# ----------------------------------------------------------------------------- task files


def _text_field(obj, key, path, line):
    value = obj.get(key)
    if not isinstance(value, str) or not value or "\n" in value:
        raise TinyLLMError(f"{path}, line {line}: {key!r} must be a non-empty one-line string,"
                           f" got {value!r}")
    return value


def _task_object(raw, path, number):
    """The JSON object on one line of a task file, or a one-line error naming the line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise TinyLLMError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise TinyLLMError(f"{path}, line {number}: JSON nested too deeply to be a"
                           " record") from None
    if not isinstance(obj, dict):
        raise TinyLLMError(f"{path}, line {number}: expected a JSON object, got {raw.strip()[:40]}")
    return obj


def _task_record(obj, path, number):
    """{"input", "output", "line"} of a record line's object; its keys and fields checked."""
    if set(obj) - {"input", "output"}:
        extra = sorted(set(obj) - {"input", "output"})[0]
        raise TinyLLMError(f"{path}, line {number}: unexpected key {extra!r} (a record has"
                           " 'input' and 'output'; a header may only be the first line)")
    return {"input": _text_field(obj, "input", path, number),
            "output": _text_field(obj, "output", path, number), "line": number}


def _parse_header(obj, path, line):
    unknown = set(obj) - HEADER_KEYS
    if unknown:
        raise TinyLLMError(f"{path}, line {line}: unknown header key {sorted(unknown)[0]!r}"
                           " (a header has 'instruction' and/or 'choices')")
    instruction = _text_field(obj, "instruction", path, line) if "instruction" in obj else None
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2:
            raise TinyLLMError(f"{path}, line {line}: 'choices' must be a list of at least 2 answers")
        choices = tuple(_text_field({"choice": c}, "choice", path, line) for c in choices)
        if len(set(choices)) != len(choices):
            raise TinyLLMError(f"{path}, line {line}: 'choices' lists an answer twice")
    return instruction, choices


def parse_task(lines, path="<task>"):
    """Task from the lines of a task file; TinyLLMError naming the file and line for bad input.

    Example: ['{"choices": ["x", "y"]}', '{"input": "a", "output": "x"}']
        -> Task(path, None, ("x", "y"), ({"input": "a", "output": "x", "line": 2},), 1)
    """
    instruction, choices, records, header_line = None, None, [], None
    errors, first = RecordErrors(), True
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        with errors.gathered():  # a bad line is reported with the others, at the end
            obj = _task_object(raw, path, number)
            if first and "input" not in obj:  # the header: only ever the first line
                instruction, choices = _parse_header(obj, path, number)
                header_line = number
            else:
                record = _task_record(obj, path, number)
                if choices is not None and record["output"] not in choices:
                    raise TinyLLMError(f"{path}, line {number}: output {record['output']!r} is"
                                       " not one of the header's 'choices'")
                records.append(record)
        first = False
    errors.raise_any()
    if not records:
        raise TinyLLMError(f"{path}: the task file has no records"
                           ' (one JSON object per line: {"input": ..., "output": ...})')
    return Task(path, instruction, choices, tuple(records), header_line)


def read_task(path):
    """Read and parse a task file (see the module docstring)."""
    if not os.path.isfile(path):
        raise TinyLLMError(f"task file {path!r} not found")
    data = read_bounded(path, MAX_TASK_BYTES, "task file")
    return parse_task(split_lines(decode_utf8(data, path)), path)


def task_files(paths):
    """Task file paths, with each directory among them replaced by its *.jsonl files, sorted.

    Example: ["a.jsonl", "heldout/"] -> ["a.jsonl", "heldout/h0.jsonl", "heldout/h1.jsonl"].
    A file named twice (say, by itself and by its directory) is an error.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".jsonl"))
            if not found:
                raise TinyLLMError(f"--task {path}: the directory holds no .jsonl task files")
            files += found
        else:
            files.append(path)
    seen = {}
    for path in files:  # a task scored twice would count its queries twice in the pooled rows
        if os.path.realpath(path) in seen:
            raise TinyLLMError(f"--task {path}: the same task file as"
                               f" {seen[os.path.realpath(path)]}, given twice (each task is"
                               " scored once)")
        seen[os.path.realpath(path)] = path
    return files


def task_lines(header, records):
    """The lines of a task file for (header dict or None, records): the inverse of parse_task."""
    lines = [json.dumps(header)] if header else []
    return lines + [json.dumps({"input": r["input"], "output": r["output"]}) for r in records]


# ----------------------------------------------------------------------------- prompts


def examples_prompt(path, shots, prompt, tokenizer, block_size):
    """`tinyllm generate --examples FILE --shots K`: K demonstrations, then the user's prompt.

    The demonstrations are the task file's first K records, in the fewshot template, so a person
    can try by hand exactly the prompts `tinyllm fewshot` measures: `prompt` is the query input.
    A prompt that leaves no room for an answer in the context (block_size tokens) is an error,
    as in `tinyllm fewshot`: the model would read only its end, so fewer demonstrations than K.
    """
    if shots < 0:
        raise TinyLLMError(f"--shots must be >= 0, got {shots}")
    task = read_task(path)
    if shots > len(task.records):
        raise TinyLLMError(f"{task.path}: --shots {shots} asks for more demonstrations than its"
                           f" {len(task.records)} records")
    for record in task.records[:shots]:
        encode_for(tokenizer, record["input"] + record["output"], task, record)
    if task.instruction:
        encode_for(tokenizer, task.instruction, task, {"line": task.header_line})
    text = build_prompt(task.instruction, task.records[:shots], prompt)
    n_tokens = len(tokenizer.encode(text))
    if n_tokens >= block_size:
        raise TinyLLMError(f"{task.path}: the {shots}-shot prompt is {n_tokens:,} tokens, and the"
                           f" model's context of {block_size} must hold it and the answer: use"
                           " fewer --shots or a shorter --prompt")
    return text


def demo_orders(n_records, queries, rng):
    """For each query index, a random order of the other record indices (demos = its first k).

    Example: n_records 3, queries [0] -> e.g. [[2, 1]]: never the query itself.
    """
    orders = []
    for q in queries:
        others = onp.delete(onp.arange(n_records), q)  # (n_records - 1,)
        orders.append([int(i) for i in rng.permutation(others)])
    return orders


def check_enough_records(task, max_k):
    """A k-shot prompt needs k demonstrations besides the query: at least k + 1 records."""
    if len(task.records) < max_k + 1:
        raise TinyLLMError(f"{task.path}: {len(task.records)} records, fewer than k + 1 ="
                           f" {max_k + 1} for --shots {max_k} (a query is never its own example)")


# ----------------------------------------------------------------------------- scoring


def encode_for(tokenizer, text, task, record):
    """tokenizer.encode, with an error naming the task file and line on an unknown character."""
    try:
        return tokenizer.encode(text)
    except TinyLLMError as err:
        raise TinyLLMError(f"{task.path}, line {record['line']}: {err}") from None


def check_encodable(tokenizer, task):
    """Every text of the task encodes, or an error naming the line it is on: a prompt shows
    other records as demonstrations, so its error would name the query's line instead."""
    header = {"line": task.header_line}
    for text in ([task.instruction] if task.instruction else []) + list(task.choices or ()):
        encode_for(tokenizer, text, task, header)
    for record in task.records:
        encode_for(tokenizer, record["input"], task, record)
        encode_for(tokenizer, record["output"], task, record)


def check_fits(n_tokens, block_size, task, record, k, demos=()):
    """An error naming the query's line, and its longest demonstration's (the record that most
    likely needs shortening), if the k-shot prompt and its answer overflow the context."""
    if n_tokens > block_size:
        longest = max([record, *demos], key=lambda r: len(r["input"]) + len(r["output"]))
        shown = (f" (its longest demonstration is line {longest['line']})"
                 if longest is not record else "")
        raise TinyLLMError(
            f"{task.path}, line {record['line']}: the {k}-shot prompt plus its answer is"
            f" {n_tokens} tokens, longer than the model's context of {block_size}{shown}:"
            " use fewer --shots or shorter records")


def log_probs(params, config, ids):
    """Next-token log-probabilities, in float64 for exact sums: ids (B, T) -> (B, T, V)."""
    return log_softmax(onp.asarray(gpt_forward(params, ids, config), dtype=onp.float64))


def sequence_logprobs(params, config, pairs):
    """Summed log p(answer | prompt) for each (prompt ids, answer ids) pair, in one padded
    batch -> (N,).

    Sequences are right-padded: the model is causal, so padding after an answer cannot change
    the logits that score it. Only the rows that predict an answer token are turned into
    log-probabilities (in float64, for exact sums).
    Example: pairs [("ax\nb", "x\n"), ("ax\nb", "y\n")] (as ids) -> [-0.1, -2.4].
    """
    seqs = [prompt + answer for prompt, answer in pairs]
    ids = onp.zeros((len(seqs), max(len(s) for s in seqs)), dtype=onp.int32)  # (N, T), pad 0
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
    logits = onp.asarray(gpt_forward(params, ids, config))  # (N, T, V)
    rows, positions, targets = [], [], []  # one entry per answer token
    for row, (prompt, answer) in enumerate(pairs):
        for j, token in enumerate(answer):  # the logits at position t predict token t + 1
            rows.append(row)
            positions.append(len(prompt) - 1 + j)
            targets.append(token)
    logp = log_softmax(onp.asarray(logits[rows, positions], dtype=onp.float64))  # (M, V)
    per_token = logp[onp.arange(len(targets)), targets]  # (M,)
    return onp.bincount(rows, weights=per_token, minlength=len(pairs))  # summed by pair


def score_query(params, config, tokenizer, task, prompt, record, k, use_cache=True):
    """1 if the model answers this prompt with the record's output, else 0 (see module docstring).

    `use_cache=False` decodes the greedy answer without the key/value cache (same answer)."""
    return score_queries(params, config, tokenizer, task, [prompt], [record], k, use_cache)[0]


def score_queries(params, config, tokenizer, task, prompts, records, k, use_cache=True,
                  on_query=None, batch_size=QUERY_BATCH):
    """`score_query` for many prompts at once -> [1 or 0] for each, batch_size at a time.

    A group's greedy answers are decoded together (`greedy_batch`: one forward pass per new
    token for the whole group), and a choice task's candidates for every query of a group are
    scored in padded batches of batch_size sequences (so that memory does not grow with the
    number of choices): the same answers as one query at a time, in a fraction of the forward
    passes. on_query(), if given, is called once per query as its group finishes.
    """
    scores = []
    for start in range(0, len(prompts), batch_size):
        group = list(zip(prompts[start:start + batch_size], records[start:start + batch_size]))
        scores += _score_group(params, config, tokenizer, task, group, k, use_cache)
        for _ in group if on_query else ():
            on_query()
    return scores


def _score_group(params, config, tokenizer, task, group, k, use_cache):
    """[1 or 0] for each (prompt, record) of a group; see `score_queries`."""
    encoded = [encode_query(tokenizer, task, prompt, record, k, config.block_size)
               for prompt, record in group]  # (prompt ids, [answer ids]) per query
    if task.choices:
        pairs = [(prompt_ids, candidate) for prompt_ids, candidates in encoded
                 for candidate in candidates]  # the candidates of each query in turn
        logps = onp.concatenate([  # as many sequences a pass as the group has queries
            sequence_logprobs(params, config, pairs[start:start + len(group)])
            for start in range(0, len(pairs), len(group))]).reshape(len(group), -1)
        return [int(task.choices[int(onp.argmax(row))] == record["output"])
                for row, (_, record) in zip(logps, group)]
    # a right answer is its tokens and a newline; a few tokens more let a model that spells the
    # answer in other tokens end its line too (a longer line is wrong however it goes on)
    limits = [min(config.block_size - len(p), len(answer) + 8) for p, (answer,) in encoded]
    newline = encode_for(tokenizer, "\n", task, group[0][1])[-1]
    greedy = greedy_batch(params, config, [p for p, _ in encoded], limits, newline,
                          batch_size=len(group), use_cache=use_cache)  # each to its line's end
    return [int(greedy_line(tokenizer, new, limit) == record["output"])
            for new, limit, (_, record) in zip(greedy, limits, group)]


def encode_query(tokenizer, task, prompt, record, k, block_size, demos=()):
    """(prompt ids, [answer ids]) of one query: the answers to score after the prompt are the
    task's choices, or the record's output, each with the closing newline, and each encoded
    apart from the prompt, as they are scored. An error names the record's line, and the
    longest of `demos` (the demonstrations in the prompt) if it is longer, when the prompt and
    its longest answer do not fit the context."""
    newline = encode_for(tokenizer, "\n", task, record)
    if task.choices:
        header = {"line": task.header_line}  # the choices are on the header's line
        answers = [encode_for(tokenizer, c, task, header) + newline for c in task.choices]
    else:
        answers = [encode_for(tokenizer, record["output"], task, record) + newline]
    prompt_ids = encode_for(tokenizer, prompt, task, record)
    check_fits(len(prompt_ids) + max(len(a) for a in answers), block_size, task, record, k,
               demos)
    return prompt_ids, answers


def greedy_line(tokenizer, new, limit):
    """The text of a greedy answer's line, or None if it did not end within `limit` tokens.

    `new` is what greedy_batch gave: the tokens up to the newline token (without it), or
    `limit` tokens when none came. The line is compared as text, not as token ids: a model may
    spell the answer in other tokens, or end it with a token that holds more than the newline
    (a blank line "\n\n" is one token in a BPE trained on prose).
    Example: the tokens "a", "b", "\n\n" with limit 3 -> "ab"; "a", "b" cut at limit 2 -> None.
    """
    text = tokenizer.decode(new) + ("\n" if len(new) < limit else "")
    return text[:text.index("\n")] if "\n" in text else None


def chance_level(task):
    """1/len(choices), or 1/(number of distinct outputs) for exact-match tasks."""
    if task.choices:
        return 1.0 / len(task.choices)
    return 1.0 / len({r["output"] for r in task.records})


def query_plan(task, n_queries=None, seed=0):
    """(queries, orders): the indices of the records asked, a random sample of n_queries (all
    when None or more than the records), and for each its order of the other records (its
    k-shot prompt shows the first k). The same seed gives the same plan, so the check before
    the scoring sees the very prompts the scoring asks."""
    rng = onp.random.default_rng(seed)
    n = len(task.records)
    queries = [int(i) for i in rng.permutation(n)[:n_queries or n]]
    return queries, demo_orders(n, queries, rng)


def query_prompt(task, query, order, k):
    """The k-shot prompt of record `query`, its demonstrations the first k of `order`."""
    return build_prompt(task.instruction, [task.records[i] for i in order[:k]],
                        task.records[query]["input"])


def check_task(tokenizer, block_size, task, shots, n_queries=None, seed=0):
    """Every text of the task encodes, and every query's longest prompt fits the context with
    its answer, or an error naming the line: what can fail, checked before the slow part."""
    check_enough_records(task, max(shots))
    check_encodable(tokenizer, task)
    k = max(shots)
    for q, order in zip(*query_plan(task, n_queries, seed)):
        encode_query(tokenizer, task, query_prompt(task, q, order, k), task.records[q], k,
                     block_size, demos=[task.records[i] for i in order[:k]])


def evaluate_task(params, config, tokenizer, task, shots, n_queries=None, seed=0, log=None,
                  use_cache=True, on_query=None):
    """Accuracy of the model on `task` for each k in `shots`: a list of per-k result dicts.

    The queries (`query_plan`) are the same for every k.
    on_query(), if given, is called once per query scored (len(shots) times per query).
    """
    check_task(tokenizer, config.block_size, task, shots, n_queries, seed)
    queries, orders = query_plan(task, n_queries, seed)
    results = []
    for k in shots:
        prompts = [query_prompt(task, q, order, k) for q, order in zip(queries, orders)]
        correct = sum(score_queries(params, config, tokenizer, task, prompts,
                                    [task.records[q] for q in queries], k, use_cache=use_cache,
                                    on_query=on_query))
        results.append(accuracy_row(k, correct, len(queries), chance_level(task)))
        if log:
            log(format_row(results[-1]))
    return results


def wilson_interval(successes, n, z=Z_95):
    """Wilson score interval for a binomial proportion (Wilson 1927): (low, high).

    Better than p +- z sqrt(p(1-p)/n) at small n and near 0 or 1, where that one leaves [0, 1]
    or collapses to a point. Example: 8 of 10 -> (0.490, 0.943).
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))  # p in, despite rounding


def accuracy_row(k, correct, n, chance):
    """One row of the results table, with its Wilson 95% interval."""
    low, high = wilson_interval(correct, n)
    return {"k": k, "correct": correct, "n": n, "accuracy": correct / n,
            "ci95": [round(low, 4), round(high, 4)], "chance": round(chance, 4)}


def pool_results(per_task):
    """Pool per-task result lists (same shots) into one: counts add; chance is query-weighted."""
    pooled = []
    for rows in zip(*per_task):
        correct, n = sum(r["correct"] for r in rows), sum(r["n"] for r in rows)
        chance = sum(r["chance"] * r["n"] for r in rows) / n
        pooled.append(accuracy_row(rows[0]["k"], correct, n, chance))
    return pooled


def format_row(row):
    """Example: 'k=8    0.900  [0.818, 0.947]  n=100  chance 0.250'."""
    low, high = row["ci95"]
    return (f"k={row['k']:<4d} {row['accuracy']:.3f}  [{low:.3f}, {high:.3f}]  n={row['n']}"
            f"  chance {row['chance']:.3f}")


def format_table(rows):
    """The accuracy-by-k table a person reads, as lines of text."""
    lines = ["shots  accuracy  95% CI (Wilson)   queries  chance",
             "-----  --------  ----------------  -------  ------"]
    for r in rows:
        low, high = r["ci95"]
        lines.append(f"{r['k']:>5d}  {r['accuracy']:>8.3f}  [{low:.3f}, {high:.3f}]"
                     f"    {r['n']:>7d}  {r['chance']:>6.3f}")
    return lines


def format_task_table(tasks):
    """One line per task with its accuracy at each k, so that a task the model cannot do shows
    rather than being averaged away in the pooled table. `tasks` is the results' "tasks" list.

    Example: one task of 40 queries at k = 0 and 8 ->
        task                    k=0    k=8  queries  chance
        tasks/phone.jsonl     0.250  0.925       40   0.125
    """
    shots = [r["k"] for r in tasks[0]["results"]] if tasks else []
    width = max([len("task")] + [len(t["path"]) for t in tasks])
    heads = "".join(f"  {'k=' + str(k):>5s}" for k in shots)
    lines = [f"{'task':<{width}s}{heads}  queries  chance"]
    for t in tasks:
        rows = t["results"]
        cells = "".join(f"  {r['accuracy']:>5.3f}" for r in rows)
        lines.append(f"{t['path']:<{width}s}{cells}  {rows[0]['n']:>7d}  {rows[0]['chance']:>6.3f}")
    return lines


def parse_shots(text):
    """'0,1,2,4,8' -> [0, 1, 2, 4, 8]; TinyLLMError on anything else."""
    try:
        shots = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TinyLLMError(f"--shots must be comma-separated whole numbers, got {text!r}") from None
    if not shots or any(k < 0 for k in shots):
        raise TinyLLMError(f"--shots must list numbers >= 0, got {text!r}")
    return sorted(set(shots))


# ----------------------------------------------------------------------------- ICL score


def position_losses(params, config, windows):
    """Next-token loss at each position of each window: windows (B, T + 1) -> (B, T)."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) inputs and their next tokens
    logp = log_probs(params, config, x)  # (B, T, V)
    return -onp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (B, T)


def icl_positions(block_size):
    """(early, late) token positions for the ICL score, scaled from Olsson et al.'s 50 and 500.

    They compare the loss of the 500th token of the context with the 50th; we keep the ratio
    1:10 and put the late position at the end of the context. Example: 96 -> (10, 95).
    """
    late = block_size - 1
    return max(1, round(late / 10)), late


def icl_score(params, config, ids, n_windows=ICL_WINDOWS, seed=0, batch=16):
    """In-context learning score (Olsson et al. 2022): mean loss late minus early in the context.

    Negative means the model predicts better with more context, i.e. it learns in context.
    `ids` is held-out text as token ids; windows of block_size + 1 tokens start at random.
    Returns a dict with both positions, both mean losses, the score and its standard error.
    """
    t = config.block_size
    if len(ids) < t + 1:
        raise TinyLLMError(f"the ICL score needs held-out text of at least {t + 1} tokens,"
                           f" got {len(ids)}")
    rng = onp.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - t, size=n_windows)  # (N,)
    windows = onp.asarray(ids)[starts[:, None] + onp.arange(t + 1)]  # (N, T + 1)
    losses = onp.concatenate([position_losses(params, config, windows[i:i + batch])
                              for i in range(0, n_windows, batch)])  # (N, T)
    early, late = icl_positions(t)
    diff = losses[:, late] - losses[:, early]  # (N,): paired, one difference per window
    return {"early_position": early + 1, "late_position": late + 1,  # 1-based, as in the paper
            "early_loss": float(losses[:, early].mean()), "late_loss": float(losses[:, late].mean()),
            "score": float(diff.mean()), "stderr": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "n_windows": int(n_windows)}


def heldout_ids(ckpt, data=None, ckpt_dir="the checkpoint"):
    """Token ids of held-out text for the ICL score: `data`, or the checkpoint corpus's val split.

    Pretraining validates on the last 10% of its corpus and never trains on it, so that part is
    held out. A file or corpus named by `data` (--icl-data) is used whole. `ckpt_dir`, the
    checkpoint's directory, is named in errors. Returns (ids, description).
    """
    if data is None and "finetune" in ckpt.meta:
        raise TinyLLMError("the checkpoint is a fine-tuning run, which keeps no record of the"
                           " text its base was pretrained on: give --icl-data FILE|NAME for the"
                           " in-context learning score, or --icl-windows 0 to skip it")
    if data is None:
        data = ckpt.meta.get("data") or "pydoc"  # runs that stored no name trained on pydoc
        # a file is read only if its sha256 matches; one moved since is given with --icl-data
        text = run_corpus(ckpt.meta, ckpt_dir, way_out="--icl-data FILE")
        return train_val_split(ckpt.tokenizer.encode(text))[1], f"{data} (validation split)"
    try:
        return ckpt.tokenizer.encode(load_corpus(data)), data
    except TinyLLMError as err:
        raise TinyLLMError(f"--icl-data {data}: {err}") from None


def format_icl(icl):
    """The ICL score as the line `tinyllm fewshot` prints."""
    return (f"in-context learning score on {icl['data']}: {icl['score']:+.3f} nats"
            f" (+/- {icl['stderr']:.3f}) = loss at token {icl['late_position']}"
            f" ({icl['late_loss']:.3f}) - loss at token {icl['early_position']}"
            f" ({icl['early_loss']:.3f}), {icl['n_windows']} windows")


# ----------------------------------------------------------------------------- the run


def run_fewshot(checkpoint, task_paths, shots, n_queries=None, seed=0, icl_data=None,
                icl_windows=ICL_WINDOWS, log=None, use_cache=True, progress=None):
    """What `tinyllm fewshot` does: score a checkpoint on task files for each k in `shots`.

    Every task file is read and checked before the model is loaded, and every task's texts and
    prompts against its tokenizer and context before any task is scored (the slow part).
    Returns the results file's content (see the module docstring); `write_results` saves it.
    `use_cache=False` decodes greedy answers without the key/value cache (same answers).
    `progress(total)`, if given, makes a `progress.Counting` (or alike) of the queries to score:
    it is updated after each, and the log lines go through its `message` so as not to garble it.
    """
    log = log or (lambda line: None)
    if icl_windows < 0:
        raise TinyLLMError(f"--icl-windows must be >= 0, got {icl_windows}")
    tasks = [read_task(p) for p in task_files(task_paths)]
    for task in tasks:
        check_enough_records(task, max(shots))
    short = [t for t in tasks if n_queries and n_queries > len(t.records)]
    if short:  # not refused: pooled tasks may differ in size, and each row gives its n
        log(f"note: --queries {n_queries} is more than the records of {len(short)} task(s), so"
            " all of their records are queries: " + ", ".join(f"{t.path} ({len(t.records)})"
                                                             for t in short))
    ckpt = load_checkpoint(checkpoint, kind=("gpt", "gpt-lora"))
    params, config = merged_gpt(ckpt.params, ckpt.model_config)  # LoRA adapters merged, if any
    if icl_windows:  # read before the slow part: a bad or short --icl-data is said at once
        heldout, source = heldout_ids(ckpt, icl_data, checkpoint)
        if len(heldout) < config.block_size + 1:
            raise TinyLLMError(f"{'--icl-data ' if icl_data else ''}{source}: {len(heldout):,}"
                               " tokens, too few for the in-context learning score (it needs"
                               f" {config.block_size + 1}): give a longer text, or"
                               " --icl-windows 0 to skip it")
    for task in tasks:  # every task's texts and prompts, before any is scored
        check_task(ckpt.tokenizer, config.block_size, task, shots, n_queries, seed)
    total = len(shots) * sum(min(n_queries or len(t.records), len(t.records)) for t in tasks)
    shown = progress(total) if progress else None
    say = shown.message if shown else log
    scored = itertools.count(1)
    on_query = (lambda: shown.update(next(scored))) if shown else None
    per_task = []
    for task in tasks:
        say(f"{task.path}: {len(task.records)} records,"
            f" {'choices (log-likelihood)' if task.choices else 'exact match (greedy)'}")
        per_task.append(evaluate_task(params, config, ckpt.tokenizer, task,
                                      shots, n_queries, seed, log=lambda line: say("  " + line),
                                      use_cache=use_cache, on_query=on_query))
    if shown:
        shown.close()
    icl = None
    if icl_windows:
        icl = {"data": source, **icl_score(params, config, onp.asarray(heldout), icl_windows,
                                           seed)}
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "checkpoint": os.path.abspath(checkpoint), "iter": ckpt.iter, "seed": seed,
        "shots": list(shots), "template": "{instruction}\\n{input}{output}\\n...{input}",
        "tasks": [{"path": t.path, "records": len(t.records),
                   "scoring": "choices" if t.choices else "exact-match", "results": rows}
                  for t, rows in zip(tasks, per_task)],
        "pooled": pool_results(per_task), "icl_score": icl,
    }


def write_results(path, results):
    """Save the dict `run_fewshot` returns as JSON, atomically."""
    atomic_write_json(path, results)
