"""Instruction runs: what `tinyllm finetune instruct` and `tinyllm generate --instruction` do.

`run_instruct` fine-tunes a causal base model on instruction/response records, walking the
seven steps of finetune_runs; the loss counts the response tokens only (unless
--include-prompt), and a record longer than the context keeps the end of its prompt and its
whole response (finetune.fit_prompt). The test records' responses are generated greedily and
scored by exact match and token F1.
"""

import json
import os
from dataclasses import dataclass

import numpy as onp

from .bleu import exact_match
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import SINGLE_PROCESS
from .errors import RecordErrors, TinyLLMError
from .fileio import atomic_write_text
from .finetune import fit_prompt, format_prompt, instruction_example, length_groups, token_f1
from .finetune_runs import (EOT, EVAL_TRAIN_EXAMPLES, FinetuneSettings, add_unknown_token,
                            check_data_unchanged, check_flag, check_splits, check_step_memory,
                            data_fingerprints, load_base, log_trainable, make_train_config,
                            note_batch_over_split, resumed_train_config, settings_from_run,
                            start_finetune_dir, stored_settings, train_run, with_moved_data,
                            write_report)
from .generate import greedy_batch
from .labelled_data import (SPLIT_INSTRUCT, UNK_TOKEN, default_instruction_data,
                            encode_with_fallback, read_instructions, split_three)
from .lora import LoRAGPTConfig, apply_lora, init_lora, merge_lora, merged_gpt
from .models import gpt_loss
from .rundir import check_same_ranks, prepare_out_dir
from .train import read_metrics
from .tree import flatten


@dataclass(frozen=True)
class InstructSettings(FinetuneSettings):
    """`tinyllm finetune instruct`."""

    include_prompt: bool = False  # count the prompt tokens in the loss too
    skip_long: bool = False  # leave out (and count) the records whose response alone is longer
    # than the context, instead of refusing the file: public files have some
    max_new_tokens: int = 64  # most tokens of a generated test response
    max_iters: int = 1500
    lr: float = 1e-3
    warmup_iters: int = 50
    eval_interval: int = 100

    def validate(self):
        super().validate()
        check_flag(self.max_new_tokens > 0, "--max-new-tokens must be positive",
                   self.max_new_tokens)
        return self


# ----------------------------------------------------------------------------- instruction


# How the error of `response_too_long` records ends: how to train without them
SKIP_LONG_HINT = "; --skip-long leaves such records out"


def encode_instructions(tokenizer, records, block_size, include_prompt, where):
    """Rows (x, y, m) stacked into arrays, the number of records whose prompt lost its start
    to fit the context, and the characters that fell back to the unknown token.

    Records whose response alone (with the end-of-text token) does not fit are an error naming
    the first few by their line in `where` (the file), or their place in `records` for records
    read from no file, and counting the rest."""
    eot = tokenizer.special_tokens[EOT]
    rows, shortened, fallback, errors = [], 0, 0, RecordErrors()
    for number, record in enumerate(records, 1):
        prompt, n1 = encode_with_fallback(tokenizer, format_prompt(record))
        response, n2 = encode_with_fallback(tokenizer, record["output"])
        fallback += n1 + n2
        kept = fit_prompt(prompt, response, block_size)
        if kept is None:
            errors.add(response_too_long(where, record, number, len(response), block_size))
            continue
        shortened += len(kept) < len(prompt)
        rows.append(instruction_example(kept, response, eot, block_size, include_prompt))
    errors.raise_any(SKIP_LONG_HINT)
    longest = max(int(m.nonzero()[0].max()) + 1 for _, _, m in rows)  # trim shared padding
    x, y, m = (onp.stack([r[i][:longest] for r in rows]) for i in range(3))
    return (x, y, m), shortened, fallback


def response_too_long(where, record, number, n_tokens, block_size):
    """The error for a record whose response alone (with the end-of-text token and one prompt
    token) does not fit the context, naming its line in `where` (the file), or its place
    `number` in its split for a record read from no file (a split is shuffled: only the file's
    line finds the record)."""
    place = f":{record['line']}" if "line" in record else f": record {number}"
    return TinyLLMError(f"{where}{place}: its response alone has {n_tokens} tokens, more than the"
                        f" context ({block_size} tokens, with one for the prompt and one to end)")


def long_responses(tokenizer, records, block_size):
    """{place in `records` (1-based): response tokens} of the records whose response alone does
    not fit the context with one prompt token and the end-of-text token (`fit_prompt`).
    Example: responses of 3 and 300 tokens, a 256-token context -> {2: 300}."""
    responses = (encode_with_fallback(tokenizer, record["output"])[0] for record in records)
    return {number: len(response) for number, response in enumerate(responses, 1)
            if fit_prompt([], response, block_size) is None}


def check_responses_fit(tokenizer, records, block_size, where):
    """Raise `response_too_long` for the records whose response alone does not fit the context
    (the first few named, the rest counted): a test record's response is generated, not trained
    on, but one that cannot fit could never be written whole, so it is refused as a training
    record's is, before training."""
    errors = RecordErrors()
    for number, n_tokens in long_responses(tokenizer, records, block_size).items():
        errors.add(response_too_long(where, records[number - 1], number, n_tokens, block_size))
    errors.raise_any(SKIP_LONG_HINT)


def generation_prompts(tokenizer, records, max_new_tokens, block_size):
    """(prompts, limits, shortened, fallback) for greedy responses to records. A response may
    take `max_new_tokens`, at most the reference's length plus a margin (a longer one is wrong
    anyway) and the context less one token; a prompt keeps its last tokens so that it and the
    response fit the context. `shortened` counts the prompts so cut, `fallback` their characters
    read as the unknown token."""
    prompts, limits, shortened, fallback = [], [], 0, 0
    for record in records:
        ids, missing = encode_with_fallback(tokenizer, format_prompt(record))
        reference = encode_with_fallback(tokenizer, record["output"])[0]
        limits.append(min(max_new_tokens, len(reference) + 8, block_size - 1))
        prompts.append(ids[-(block_size - limits[-1]):])
        shortened += len(prompts[-1]) < len(ids)
        fallback += missing
    return prompts, limits, shortened, fallback


def references_cut(tokenizer, records, limits):
    """How many records' references have more tokens than their response may (`limits`, from
    `generation_prompts`): --max-new-tokens or the context cuts such a response before it could
    match. Example: references of 3 and 70 tokens, limits 11 and 64 -> 1."""
    return sum(len(encode_with_fallback(tokenizer, r["output"])[0]) > limit
               for r, limit in zip(records, limits))


def score_responses(params, config, tokenizer, records, max_new_tokens, use_cache=True):
    """Greedy responses to records (decoded as one batch), with mean exact match and token F1.

    Prompts as `generation_prompts` makes them. `use_cache=False` decodes without the key/value
    cache (same responses, slower)."""
    eot = tokenizer.special_tokens[EOT]
    prompts, limits = generation_prompts(tokenizer, records, max_new_tokens, config.block_size)[:2]
    responses = greedy_batch(params, config, prompts, limits, eot, use_cache=use_cache)
    rows = [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
             "response": tokenizer.decode(new)} for r, new in zip(records, responses)]
    em = exact_match([r["response"] for r in rows], [r["reference"] for r in rows])
    f1 = sum(token_f1(r["response"], r["reference"]) for r in rows) / max(1, len(rows))
    return rows, {"exact_match": round(em, 4), "token_f1": round(f1, 4)}


def prompts_also_in(train, split):
    """How many records of `split` have the instruction and input of a record of `train`, word
    for word (the response trained on may differ). Example: train [{"instruction": "add",
    "input": "3 4", ...}], split [the same prompt, {"instruction": "add", "input": "4 3", ...}]
    -> 1."""
    seen = {(r["instruction"], r["input"]) for r in train}
    return sum((r["instruction"], r["input"]) in seen for r in split)


def instruct_splits(s):
    """(train, val, test) instruction records, from files or the embedded tasks."""
    records = read_instructions(s.data) if s.data else default_instruction_data()
    if s.val_data:
        splits = records, read_instructions(s.val_data), read_instructions(s.test_data)
    else:
        splits = split_three(records, SPLIT_INSTRUCT, s.data_seed)
    check_splits(s.data, *splits)
    return splits


def check_end_token(tokenizer, flag):
    """An instruction-tuned model ends each response with EOT, so its tokenizer must have it."""
    if EOT not in tokenizer.special_tokens:
        raise TinyLLMError(f"{flag}: its tokenizer has no {EOT} token to end responses (a"
                           " model of an older tinyllm, or an altered tokenizer file)")


def build_instruct_model(s, log):
    """(params, config, tokenizer): the base GPT, with fresh LoRA adapters if asked for."""
    params, gpt_config, tokenizer = load_base(s, log)
    check_end_token(tokenizer, "--checkpoint")
    params, config, tokenizer = add_unknown_token(params, gpt_config, tokenizer)
    if s.lora_rank:
        config = LoRAGPTConfig(**config.__dict__, lora_rank=s.lora_rank, lora_alpha=s.adapter_alpha)
        params = {**params, "lora": init_lora(params, s.lora_rank,
                                              onp.random.default_rng([s.seed, 3]))}
    return params, config, tokenizer


def instruct_loss_and_batches(arrays, config, batch_size):
    """The masked next-token loss of a batch (adapters applied at alpha / rank), and
    sample(split, rng) drawing batch_size random rows of a split.

    A batch is a list of groups (x, y, m), its rows split by length (`finetune.length_groups`),
    each group cut to its own longest row; the loss is the mean over all the batch's counted
    tokens, as one padded batch would give."""
    gpt_config = config.gpt() if hasattr(config, "gpt") else config
    scale = config.lora_alpha / config.lora_rank if hasattr(config, "lora_rank") else 0.0

    def loss_fn(p, batch, rng):
        if "lora" in p:
            p = apply_lora(p, scale)
        counts = [float(m.sum()) for _, _, m in batch]  # counted targets of each group
        total = sum(counts)
        return sum(gpt_loss(p, x, y, gpt_config, rng, mask=m) * (count / total)
                   for (x, y, m), count in zip(batch, counts))

    def sample(split, rng):
        rows = rng.integers(0, len(arrays[split][0]), size=batch_size)  # (B,)
        return row_groups(arrays[split], rows)

    return loss_fn, sample


def row_lengths(mask):
    """The length of each instruction row, from its loss mask (B, T) -> (B,): up to its last
    counted target (the end-of-text token), past which there is only padding.

    Example: mask [[0, 1, 1, 0], [1, 0, 0, 0]] -> [3, 1]."""
    return mask.shape[1] - onp.argmax(mask[:, ::-1] > 0, axis=1)


def row_groups(split_arrays, rows):
    """Rows `rows` of a split's (x, y, m) as a batch for `instruct_loss_and_batches`' loss: a
    list of (x, y, m) groups of similar length, each cut to its longest row."""
    lengths = row_lengths(split_arrays[2][rows])
    return [tuple(a[rows[group], :lengths[group].max()] for a in split_arrays)
            for group in length_groups(lengths)]


def instruct_evaluator(arrays, loss_fn, world=SINGLE_PROCESS):
    """evaluate(params) -> {"train", "val"}: the masked loss over the whole validation split and
    the first EVAL_TRAIN_EXAMPLES training rows, per response token, in batches of 64 (longest
    rows first). Over MPI each rank takes every world.size-th batch and the sums are added
    across ranks."""

    def mean_loss(params, split, limit):
        head = tuple(a[:limit] for a in arrays[split])
        by_length = onp.argsort(-row_lengths(head[2]), kind="stable")  # longest first
        total, weight = 0.0, 0.0
        for start in range(world.rank * 64, len(by_length), world.size * 64):
            rows = by_length[start:start + 64]  # a batch of similar lengths pads little
            w = float(head[2][rows].sum())
            total += float(loss_fn(params, row_groups(head, rows), None)) * w
            weight += w
        total, weight = world.sum_floats(total, weight)
        return total / max(weight, 1.0)

    return lambda params: {"train": mean_loss(params, "train", EVAL_TRAIN_EXAMPLES),
                           "val": mean_loss(params, "val", len(arrays["val"][0]))}


def inference_params(params, config):
    """The weights to generate with: adapters merged when there are any."""
    return merge_lora(params, config.lora_alpha, config.lora_rank) if "lora" in params else params


def run_instruct(out, settings=None, resume=False, force=False, max_iters=None, log=print,
                 use_cache=True, world=SINGLE_PROCESS):
    """Instruction-tune a GPT; writes the run directory, responses.jsonl and metrics.json.
    (`use_cache=False` generates the test responses without the key/value cache.) With
    resume=True `settings` is read as run_classify reads it."""
    # 1. settings
    prepare_out_dir(out, resume, force)
    ckpt = load_checkpoint(out, with_optimizer=True, kind=("gpt", "gpt-lora")) if resume else None
    if resume:
        check_same_ranks(ckpt.meta, world.size, out)
    if resume and (ckpt.meta.get("finetune") or {}).get("task") != "instruct":
        raise TinyLLMError(f"--resume: {out} is not an instruction fine-tuning run")
    s = (settings_from_run(ckpt, InstructSettings, max_iters, out) if resume
         else (settings or InstructSettings())).validate()
    # 2. data (a resumed run's files are checked against their sha256 before they are parsed)
    if resume:
        s = with_moved_data(s, settings)
        check_data_unchanged(ckpt, s, out)
    train, val, test = instruct_splits(s)
    # 3. model
    if resume:
        params, config, tokenizer = ckpt.params, ckpt.model_config, ckpt.tokenizer
        check_end_token(tokenizer, "--resume")
    else:
        params, config, tokenizer = build_instruct_model(s, log)
    gpt_config = config.gpt() if hasattr(config, "gpt") else config
    # 4. encode
    skipped = {"train": 0, "val": 0, "test": 0}
    if s.skip_long:
        (train, val, test), skipped = without_long_responses(
            tokenizer, (train, val, test), config.block_size, log)
    arrays, shortened, fallback, cut = encode_instruct_splits(s, tokenizer, config.block_size,
                                                              train, val, test, log)
    log(f"data: {s.data or 'embedded tasks (reverse the words, uppercase, sort the words, add)'}:"
        f" {len(train)} train, {len(val)} val, {len(test)} test records")
    repeats = {name: prompts_also_in(train, split) for name, split in (("val", val),
                                                                        ("test", test))}
    if repeats["val"] or repeats["test"]:
        log(f"note: {repeats['test']} test and {repeats['val']} val record(s) have the instruction"
            " and input of a training record, word for word; a prompt trained on flatters the"
            " exact match and token F1 measured on it")
    # 5. score before
    if resume:
        before = ckpt.meta["before"]
    else:
        log(f"scoring the base model on {len(test)} test records ...")
        before = score_responses(inference_params(params, config), gpt_config, tokenizer, test,
                                 s.max_new_tokens, use_cache)[1]
    log(f"base model: exact match {100 * before['exact_match']:.1f}%, token F1"
        f" {100 * before['token_f1']:.1f}%")
    # 6. train
    tc = make_train_config(s, len(arrays["train"][0]), world.size)
    note_batch_over_split(tc.batch_size, len(arrays["train"][0]), log)
    if resume:
        tc = resumed_train_config(ckpt, tc, max_iters)
    check_step_memory(config, tc, 1)
    start_finetune_dir(out, resume, force)  # a refused step count or batch leaves --out as it was
    flat = flatten(params)
    paths = [p for p in flat if p.startswith("lora.")] if "lora" in params else list(flat)
    log_trainable(params, paths, "LoRA adapters" if "lora" in params else "all weights", log)
    kind = "gpt-lora" if "lora" in params else "gpt"
    extra = {"finetune": {"task": "instruct", **stored_settings(s)},
             "data_files_sha256": data_fingerprints(s), "before": before, "ranks": world.size,
             "template": "Instruction: {instruction}\\nInput: {input}\\nResponse: "}

    def save(full, opt_state, st, fields):
        save_checkpoint(out, full, opt_state, st.rng_state, config, tc, tokenizer, st.iteration,
                        extra={**extra, **fields}, kind=kind)

    loss_fn, sample = instruct_loss_and_batches(arrays, config, tc.batch_size)
    params, best, state, clock = train_run(
        out, ckpt, params, paths, tc, loss_fn, sample, instruct_evaluator(arrays, loss_fn, world),
        round(tc.batch_size * row_lengths(arrays["train"][2]).mean()), s.patience, log, world,
        save)
    # 7. score after and report
    log(f"generating responses for {len(test)} test records ...")
    rows, after = score_responses(inference_params(params, config), gpt_config, tokenizer, test,
                                  s.max_new_tokens, use_cache)
    atomic_write_text(os.path.join(out, "responses.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = read_metrics(out)
    report = {"task": "instruct", "base": s.checkpoint, "lora_rank": s.lora_rank,
              "include_prompt": s.include_prompt,
              "records": {"train": len(train), "val": len(val), "test": len(test)},
              "shortened_records": shortened, "skipped_long_records": skipped,
              "fallback_characters": fallback,
              "test_references_cut": cut,
              "prompts_also_in_train": repeats,
              "test_before": before, "test_after": after,
              "val_loss_before": metrics[0]["val_loss"] if metrics else None,
              "best_val_loss": best.val_loss, "best_iter": best.iteration,
              "iterations": state.iteration, "train_seconds": clock.total(),
              "train_seconds_this_part": clock.part()}
    write_report(out, report)
    return report


def without_long_responses(tokenizer, splits, block_size, log):
    """--skip-long: ((train, val, test) without the records whose response alone does not fit the
    context, {split: how many were left out}), each count said in a note. A split left with no
    record is an error. Example: a val split of 50 records, 2 of them with a 300-token response
    and a 256-token context -> 48 val records, {"val": 2, ...}, and a note."""
    kept, skipped = [], {}
    for name, records in zip(("train", "val", "test"), splits):
        too_long = long_responses(tokenizer, records, block_size)
        fits = [r for number, r in enumerate(records, 1) if number not in too_long]
        kept.append(fits)
        skipped[name] = len(records) - len(fits)
        if not fits:
            raise TinyLLMError(f"--skip-long: every {name} record has a response longer than the"
                               f" context ({block_size} tokens)")
        if skipped[name]:
            log(f"note: --skip-long: left out {skipped[name]} {name} record(s) whose response"
                f" alone is longer than the context ({block_size} tokens)")
    return tuple(kept), skipped


def encode_instruct_splits(s, tokenizer, block_size, train, val, test, log):
    """(arrays, shortened, fallback, cut) of an instruction run's splits: the training and
    validation records as batches (`encode_instructions`), the records of each split shortened
    to fit the context and the characters read as the unknown token (by split), and how many
    test references are longer than a response may be; each count is said in a note."""
    arrays, shortened, fallback = {}, {}, {}
    for name, split in (("train", train), ("val", val)):
        source = (s.val_data if name == "val" else None) or s.data
        arrays[name], shortened[name], fallback[name] = encode_instructions(
            tokenizer, split, block_size, s.include_prompt,
            source or f"the embedded tasks ({name})")
        if shortened[name]:
            log(f"note: {shortened[name]} {name} record(s) longer than the context"
                f" ({block_size} tokens) kept the end of their prompt and all of their"
                " response")
        if fallback[name]:
            log(f"note: {fallback[name]} character(s) in {name} fell back to {UNK_TOKEN}")
    check_responses_fit(tokenizer, test, block_size,
                        s.test_data or s.data or "the embedded tasks (test)")
    _, limits, shortened["test"], fallback["test"] = generation_prompts(
        tokenizer, test, s.max_new_tokens, block_size)
    if shortened["test"]:
        log(f"note: {shortened['test']} test record(s) kept the end of their prompt, to leave"
            f" room for the response in the context ({block_size} tokens)")
    cut = references_cut(tokenizer, test, limits)
    if cut:
        log(f"note: {cut} test record(s) have a reference longer than a response may be"
            f" (--max-new-tokens {s.max_new_tokens}, context {block_size} tokens): their"
            " responses are cut there, and cannot match exactly")
    if fallback["test"]:
        log(f"note: {fallback['test']} character(s) in test prompts fell back to {UNK_TOKEN}")
    return arrays, shortened, fallback, cut


def load_generator(checkpoint):
    """(params, GPTConfig, tokenizer) of a pretrained or instruction-tuned run, adapters merged."""
    ckpt = load_checkpoint(checkpoint, kind=("gpt", "gpt-lora"))
    return (*merged_gpt(ckpt.params, ckpt.model_config), ckpt.tokenizer)


def prompt_end(ids, block_size, max_new_tokens):
    """The prompt's tokens the model reads: all of them if they leave room in the context for
    min(max_new_tokens, block_size // 4) tokens of response (a sentence or two), else only their
    end, as `fit_prompt` keeps the end of a long prompt in fine-tuning ("Response: " and the
    nearest part of the input are there). Example: 300 ids, block_size 256, max_new_tokens 200
    -> the last 192 (a response may take the other 64)."""
    room = min(max_new_tokens, block_size // 4)
    return ids if len(ids) <= block_size - room else ids[len(ids) - (block_size - room):]


def generate_instruction(checkpoint, instruction, input_text="", max_new_tokens=200,
                         temperature=0.0, top_k=None, top_p=None, seed=None, use_cache=True,
                         log=print, on_text=None):
    """The fine-tuning prompt for an instruction (and input) plus the model's response, which
    ends at the end-of-text token (`tinyllm generate --instruction`). `on_text(piece)`, if
    given, gets the prompt and then the response as it is made, each piece final (see
    generate.TextStream): the pieces add up to the text returned. Characters a char model
    never saw are read as its unknown token, and `log` is told how many; it is told too when
    the response fills the context before it ends."""
    from .generate import check_sampling_args, complete_ids

    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not instruction.strip():
        raise TinyLLMError("--instruction is empty")
    params, config, tokenizer = load_generator(checkpoint)
    eot = tokenizer.special_tokens.get(EOT)
    prompt = format_prompt({"instruction": instruction, "input": input_text})
    ids, missing = encode_with_fallback(tokenizer, prompt)
    if missing:  # the prompt is echoed as typed: say what the model read instead
        log(f"note: {missing} character(s) the model never saw were read as {UNK_TOKEN}")
    kept = prompt_end(ids, config.block_size, max_new_tokens)
    if len(kept) < len(ids):
        log(f"note: the prompt has {len(ids)} tokens; the model reads its last {len(kept)}, as"
            f" fine-tuning kept the end of a long prompt, to leave room for the response in its"
            f" context ({config.block_size} tokens)")
    ids = kept
    room = config.block_size - len(ids)  # the template must stay in view: no sliding
    emit = on_text or (lambda piece: None)
    emit(prompt)
    response, new = complete_ids(params, config, tokenizer, ids, min(max_new_tokens, room),
                                 onp.random.default_rng(seed), temperature, top_k, top_p,
                                 use_cache=use_cache, on_text=emit)
    if room < max_new_tokens and len(new) == room and new[-1] != eot:
        log(f"note: the response filled the model's context ({config.block_size} tokens) after"
            f" {room} tokens, before {EOT}: it is cut there")
    return prompt + response
