"""Fine-tuning runs: what `tinyllm finetune classify|instruct` and `tinyllm classify` do.

The runners (`run_classify`, `run_instruct`, ...) hold no Click code, so tests and scripts can
call them; tinyllm/cli_finetune.py only maps flags onto them.

A fine-tuning run directory is a checkpoint (see tinyllm/checkpoint.py) plus:
    metrics.jsonl     the training loop's evaluations (validation loss), as in pretraining
    metrics.json      the final report: {"format": "tinyllm-finetune-metrics", "version": 1,
                      "task": "classify" | "instruct", ...} (see `classify_report` / `instruct_report`)
    responses.jsonl   (instruct) one line per test record: instruction, input, reference, response
Its config.json has kind "classifier" (model fields of ClassifierConfig, "labels": the class
names in id order) or, for instruction tuning, "gpt" (or "gpt-lora" with adapters), plus the
data settings that --resume needs.
"""

import json
import math
import os
import time
from dataclasses import replace

import numpy as onp

from .bleu import exact_match
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DEFAULT_BPE_VOCAB_SIZE, DEFAULT_TOKENIZER, GPTConfig, TrainConfig
from .errors import TinyLLMError
from .fileio import atomic_write_json, atomic_write_text
from .generate import greedy_batch
from .finetune import (ClassifierConfig, classifier_from_gpt, classifier_loss, confusion_matrix,
                       format_prompt, instruction_example,
                       merge_params, pad_batch, precision_recall, predict_proba, split_params,
                       token_f1, trainable_paths)
from .labelled_data import (SPLIT_CLASSIFY, SPLIT_INSTRUCT, UNK_TOKEN, balance,
                            default_classification_data, default_instruction_data,
                            encode_with_fallback, label_ids, read_classification,
                            read_instructions, split_three, with_unknown_token)
from .lora import LoRAGPTConfig, init_lora, merge_lora
from .models import count_params, gpt_loss, init_gpt
from .optim import adamw_init
from .train import (SPECIAL_TOKENS, Committed, prepare_out_dir, read_metrics, start_out_dir,
                    train_loop, truncate_metrics)
from .tree import flatten

METRICS_FORMAT = "tinyllm-finetune-metrics"
METRICS_VERSION = 1
EOT = SPECIAL_TOKENS[0]


# ----------------------------------------------------------------------------- shared pieces


def load_base(checkpoint, random_init, seed, log):
    """(GPT params, GPTConfig, tokenizer) to fine-tune: a pretrained checkpoint, or the default
    pretraining architecture and tokenizer at random initialisation when checkpoint is None."""
    if checkpoint is not None:
        try:
            ckpt = load_checkpoint(checkpoint, kind=("gpt", "gpt-lora"))
        except TinyLLMError as err:
            raise TinyLLMError(f"--checkpoint: {err} (expected a run of `tinyllm pretrain`)") from None
        config = ckpt.model_config
        params = merge_lora(ckpt.params, getattr(config, "lora_alpha", 0), getattr(config, "lora_rank", 1))
        config = config.gpt() if hasattr(config, "gpt") else config
        tokenizer = ckpt.tokenizer
        if random_init:
            params = init_gpt(config, onp.random.default_rng(seed))
        log(f"base model: {checkpoint} ({'random init, same architecture' if random_init else 'pretrained'})")
    else:
        from .data import load_corpus
        from .tokenizers import train_tokenizer

        # The same tokenizer and architecture `tinyllm pretrain` uses by default, so that a run
        # without --checkpoint is the from-scratch baseline for a default pretrained model.
        tokenizer = train_tokenizer(DEFAULT_TOKENIZER, load_corpus(None), DEFAULT_BPE_VOCAB_SIZE,
                                    special_tokens=SPECIAL_TOKENS)
        config = replace(GPTConfig(), vocab_size=tokenizer.vocab_size)
        params = init_gpt(config, onp.random.default_rng(seed))
        log("base model: none (random initialisation, the default pretraining architecture)")
    return params, config, tokenizer


def add_unknown_token(params, config, tokenizer):
    """Give a char tokenizer its fallback token, and the model an embedding row for it,
    initialised to the mean of the other rows (a neutral "some character" vector)."""
    new_tok = with_unknown_token(tokenizer)
    extra = new_tok.vocab_size - config.vocab_size
    if extra == 0:
        return params, config, new_tok
    wte = params["wte"]
    mean_row = wte.mean(axis=0, keepdims=True).astype(wte.dtype)  # (1, C)
    params = {**params, "wte": onp.concatenate([wte] + [mean_row] * extra)}  # (V + 1, C)
    if "lm_head" in params:
        head = params["lm_head"]["w"]
        params["lm_head"] = {"w": onp.concatenate([head, head.mean(axis=1, keepdims=True)], axis=1)}
    return params, replace(config, vocab_size=new_tok.vocab_size), new_tok


def encode_all(tokenizer, texts):
    """Token lists for texts, and how many characters fell back to the unknown token."""
    out, fallback = [], 0
    for text in texts:
        ids, missing = encode_with_fallback(tokenizer, text)
        out.append(ids)
        fallback += missing
    return out, fallback


def make_train_config(batch_size, max_iters, epochs, n_train, lr, warmup_iters, eval_interval,
                      eval_iters, seed, weight_decay):
    """TrainConfig from the flags; --epochs turns into steps over the training split."""
    if epochs is not None:
        max_iters = max(1, math.ceil(epochs * n_train / batch_size))
    return TrainConfig(batch_size=batch_size, max_iters=max_iters, lr=lr, min_lr=lr / 10,
                       warmup_iters=warmup_iters, weight_decay=weight_decay,
                       eval_interval=min(eval_interval, max_iters), eval_iters=eval_iters,
                       seed=seed).validate()


def padded_opt_state(opt_state, frozen):
    """AdamW state for the whole tree: zero moments for frozen arrays, so the checkpoint's optimizer
    file has every parameter (as checkpoint.load_checkpoint expects)."""
    zeros = {k: onp.zeros_like(v) for k, v in frozen.items()}
    return {"m": merge_params(opt_state["m"], zeros), "v": merge_params(opt_state["v"], zeros),
            "step": opt_state["step"]}


def trim_opt_state(opt_state, paths):
    """The inverse of padded_opt_state: only the moments of the trainable paths."""
    return {"m": split_params(opt_state["m"], paths)[0], "v": split_params(opt_state["v"], paths)[0],
            "step": opt_state["step"]}


def run_training(params, paths, tc, loss_fn, sample, save_full, out_dir, resume_ckpt,
                 tokens_per_iter, log):
    """Train only `paths` of `params` with train.train_loop; returns the final whole tree."""
    trainable, frozen = split_params(params, paths)
    if resume_ckpt is not None:
        opt_state = trim_opt_state(resume_ckpt.opt_state, paths)
        state = Committed(trainable, opt_state, resume_ckpt.rng_state, resume_ckpt.iter,
                          resume_ckpt.meta.get("last_eval_iter", -1))
        truncate_metrics(out_dir, resume_ckpt.iter)
        log(f"resuming {out_dir} at iteration {resume_ckpt.iter} of {tc.max_iters}")
    else:
        rng = onp.random.default_rng([tc.seed, 1])
        state = Committed(trainable, adamw_init(trainable), rng.bit_generator.state, 0, -1)

    def step_loss(trainable_params, batch, rng):
        return loss_fn(merge_params(trainable_params, frozen), batch, rng)

    def save(s):
        save_full(merge_params(s.params, frozen), padded_opt_state(s.opt_state, frozen), s)

    state = train_loop(state, tc, step_loss, sample, save, out_dir, tokens_per_iter)
    return merge_params(state.params, frozen)


def write_report(out_dir, report):
    """metrics.json: versioned, indented, written atomically."""
    atomic_write_json(os.path.join(out_dir, "metrics.json"),
                      {"format": METRICS_FORMAT, "version": METRICS_VERSION, **report})


# ----------------------------------------------------------------------------- classification


def load_classification_splits(data, val_data, test_data, text_column, label_column, do_balance,
                               seed):
    """(train, val, test) lists of (text, label), from files or the embedded default."""
    examples = (read_classification(data, text_column, label_column) if data
                else default_classification_data())
    if do_balance:
        examples = balance(examples, seed)
    if val_data or test_data:
        if not (val_data and test_data):
            raise TinyLLMError("give both --val-data and --test-data, or neither (70/10/20 split)")
        train = examples
        val = read_classification(val_data, text_column, label_column)
        test = read_classification(test_data, text_column, label_column)
    else:
        train, val, test = split_three(examples, SPLIT_CLASSIFY, seed)
    _check_splits(data, train, val, test)
    return train, val, test


def _check_splits(data, *splits):
    if not all(splits):
        sizes = "/".join(str(len(s)) for s in splits)
        raise TinyLLMError(f"{data or 'the data'}: too few examples to split into train, validation"
                           f" and test ({sizes}); give more, or --val-data and --test-data")


def encode_classification(tokenizer, examples, labels, block_size, where):
    """(ids (N, T), valid (N, T), y (N,), truncated count, fallback char count)."""
    unknown = sorted({label for _, label in examples} - set(labels))
    if unknown:
        raise TinyLLMError(f"{where}: label {unknown[0]!r} is not one the model was trained on"
                           f" ({', '.join(labels)})")
    seqs, fallback = encode_all(tokenizer, [text for text, _ in examples])
    empty = sum(1 for s in seqs if not s)
    if empty:
        raise TinyLLMError(f"{where}: {empty} example(s) have empty text")
    truncated = sum(1 for s in seqs if len(s) > block_size)
    length = min(block_size, max(len(s) for s in seqs))
    ids, valid = pad_batch(seqs, length)
    y = onp.asarray([labels.index(label) for _, label in examples], dtype=onp.int32)
    return ids, valid, y, truncated, fallback


def accuracy(params, config, ids, valid, y):
    """Fraction of rows whose most likely class is the true one, and the predictions."""
    pred = predict_proba(params, ids, valid, config).argmax(axis=1)
    return float((pred == y).mean()) if len(y) else 0.0, pred


def classify_report(params, config, labels, sets):
    """Accuracy per split, and the test split's confusion matrix and per-class precision/recall."""
    accs, pred = {}, None
    for name, (ids, valid, y) in sets.items():
        accs[name], p = accuracy(params, config, ids, valid, y)
        if name == "test":
            pred = p
    matrix = confusion_matrix(sets["test"][2], pred, len(labels))
    precision, recall = precision_recall(matrix)
    per_class = {label: {"precision": round(precision[i], 4), "recall": round(recall[i], 4),
                         "support": int(matrix[i].sum())} for i, label in enumerate(labels)}
    return accs, matrix, per_class


def run_classify(out, checkpoint=None, data=None, val_data=None, test_data=None,
                 text_column=None, label_column=None, pooling=None, arch="decoder", freeze="none",
                 do_balance=False, random_init=False, lora_rank=0, lora_alpha=None,
                 batch_size=16, max_iters=200, epochs=None, lr=3e-4, warmup_iters=20,
                 eval_interval=50, eval_iters=5, weight_decay=0.01, seed=1337, resume=False,
                 force=False, max_iters_given=False, log=print):
    """Fine-tune a classifier end to end; writes the run directory and returns the report dict."""
    prepare_out_dir(out, resume, force)
    resume_ckpt = None
    if resume:
        resume_ckpt = load_checkpoint(out, with_optimizer=True, kind="classifier")
        s = resume_ckpt.meta["finetune"]
        data, val_data, test_data = s["data"], s["val_data"], s["test_data"]
        text_column, label_column, do_balance, seed = (s["text_column"], s["label_column"],
                                                       s["balance"], s["seed"])
        freeze = s["freeze"]
        config, tokenizer, params = resume_ckpt.model_config, resume_ckpt.tokenizer, resume_ckpt.params
        labels = resume_ckpt.meta["labels"]
    train, val, test = load_classification_splits(data, val_data, test_data, text_column,
                                                  label_column, do_balance, seed)
    if not resume:
        labels = list(label_ids([label for _, label in train]))
        gpt_params, gpt_config, tokenizer = load_base(checkpoint, random_init, seed, log)
        gpt_params, gpt_config, tokenizer = add_unknown_token(gpt_params, gpt_config, tokenizer)
        pooling = pooling or ("mean" if arch == "encoder" else "last")
        rank = lora_rank or 0
        config = ClassifierConfig(**gpt_config.__dict__, n_classes=len(labels), pooling=pooling,
                                  arch=arch, lora_rank=rank,
                                  lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * rank)
                                  ).validate()
        params = classifier_from_gpt(gpt_params, config, onp.random.default_rng([seed, 2]))
    sets, truncated, fallback = {}, 0, 0
    for name, split in (("train", train), ("val", val), ("test", test)):
        ids, valid, y, n_trunc, n_fall = encode_classification(
            tokenizer, split, labels, config.block_size, f"{data or 'the embedded data'} ({name})")
        sets[name] = (ids, valid, y)
        truncated, fallback = truncated + n_trunc, fallback + n_fall
    log(f"data: {data or 'embedded real-vs-scrambled sentences'}: {len(train)} train,"
        f" {len(val)} val, {len(test)} test; classes {labels}")
    if truncated:
        log(f"note: {truncated} text(s) longer than the context ({config.block_size} tokens)"
            " were truncated")
    if fallback:
        log(f"note: {fallback} character(s) unknown to the tokenizer were mapped to {UNK_TOKEN}")
    tc = make_train_config(batch_size, max_iters, epochs, len(train), lr, warmup_iters,
                           eval_interval, eval_iters, seed, weight_decay)
    if resume:
        tc = replace(resume_ckpt.train_config,
                     max_iters=max_iters if max_iters_given else resume_ckpt.train_config.max_iters)
        before = resume_ckpt.meta["before"]
    else:
        before = classify_report(params, config, labels, sets)[0]
    log("accuracy before fine-tuning: " + _fmt_acc(before))
    start_out_dir(out, resume, force)
    paths = trainable_paths(params, freeze, config.n_layer)
    n_trainable = sum(onp.size(v) for k, v in flatten(params).items() if k in set(paths))
    what = (f"LoRA rank {config.lora_rank}: adapters and head" if config.lora_rank
            else f"--freeze {freeze}")
    log(f"model: {count_params(params):,} parameters, {n_trainable:,} trainable ({what})")
    settings = {"data": data, "val_data": val_data, "test_data": test_data,
                "text_column": text_column, "label_column": label_column, "balance": do_balance,
                "seed": seed, "freeze": freeze, "base": checkpoint, "random_init": random_init}

    def loss_fn(p, batch, rng):
        return classifier_loss(p, batch[0], batch[1], batch[2], config, rng)

    def sample(split, rng):
        ids, valid, y = sets[split]
        rows = rng.integers(0, len(y), size=tc.batch_size)  # (B,)
        return ids[rows], valid[rows], y[rows]

    def save_full(full, opt_state, s):
        save_checkpoint(out, full, opt_state, s.rng_state, config, tc, tokenizer, s.iteration,
                        extra={"labels": labels, "finetune": settings, "before": before,
                               "last_eval_iter": s.last_eval_iter}, kind="classifier")

    t0 = time.perf_counter()
    params = run_training(params, paths, tc, loss_fn, sample, save_full, out, resume_ckpt,
                          tc.batch_size * sets["train"][0].shape[1], log)
    seconds = time.perf_counter() - t0
    after, matrix, per_class = classify_report(params, config, labels, sets)
    report = {"task": "classify", "labels": labels, "arch": config.arch, "pooling": config.pooling,
              "freeze": freeze, "lora_rank": config.lora_rank,
              "base": checkpoint, "random_init": bool(random_init or checkpoint is None),
              "examples": {k: int(len(v[2])) for k, v in sets.items()},
              "accuracy_before": before, "accuracy_after": after,
              "test_confusion_matrix": matrix.tolist(), "test_per_class": per_class,
              "truncated_texts": truncated, "fallback_characters": fallback,
              "iterations": tc.max_iters, "train_seconds": round(seconds, 1),
              "final_val_loss": (read_metrics(out) or [{}])[-1].get("val_loss")}
    write_report(out, report)
    return report


def _fmt_acc(accs):
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())


def format_confusion(matrix, labels):
    """The confusion matrix as aligned text, rows = true class, columns = predicted."""
    width = max(6, max(len(label) for label in labels) + 1)
    lines = [" " * width + "".join(f"{label[:width - 1]:>{width}}" for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"{label[:width - 1]:<{width}}" + "".join(f"{int(n):>{width}}" for n in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- classify (use)


def load_classifier(checkpoint):
    """(params, config, tokenizer, labels) of a fine-tuned classifier run directory."""
    ckpt = load_checkpoint(checkpoint, kind="classifier")
    labels = ckpt.meta.get("labels")
    if not isinstance(labels, list) or len(labels) != ckpt.model_config.n_classes:
        raise TinyLLMError(f"{checkpoint}/config.json: its \"labels\" do not match the model")
    return ckpt.params, ckpt.model_config, ckpt.tokenizer, labels


def classify_texts(params, config, tokenizer, texts):
    """Class probabilities (N, K) for texts (longer ones truncated to the context)."""
    seqs, _ = encode_all(tokenizer, texts)
    if any(not s for s in seqs):
        raise TinyLLMError("cannot classify an empty text")
    ids, valid = pad_batch(seqs, min(config.block_size, max(len(s) for s in seqs)))
    return predict_proba(params, ids, valid, config)


# ----------------------------------------------------------------------------- instruction


def encode_instructions(tokenizer, records, block_size, include_prompt):
    """Rows (x, y, m) stacked into arrays, and the number of records too long for the context."""
    eot = tokenizer.special_tokens[EOT]
    rows, skipped, fallback = [], 0, 0
    for record in records:
        prompt, n1 = encode_with_fallback(tokenizer, format_prompt(record))
        response, n2 = encode_with_fallback(tokenizer, record["output"])
        fallback += n1 + n2
        row = instruction_example(prompt, response, eot, block_size, include_prompt)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    if not rows:
        return None, skipped, fallback
    longest = max(int(m.nonzero()[0].max()) + 1 for _, _, m in rows)  # trim shared padding
    x, y, m = (onp.stack([r[i][:longest] for r in rows]) for i in range(3))
    return (x, y, m), skipped, fallback


def score_responses(params, config, tokenizer, records, max_new_tokens):
    """Greedy responses to records (decoded as one batch), with mean exact match and token F1."""
    eot = tokenizer.special_tokens[EOT]
    prompts = [encode_with_fallback(tokenizer, format_prompt(r))[0][:config.block_size - 1]
               for r in records]
    # A response longer than the reference plus a margin is wrong anyway: stop there.
    limits = [min(max_new_tokens, len(encode_with_fallback(tokenizer, r["output"])[0]) + 8)
              for r in records]
    responses = greedy_batch(params, config, prompts, limits, eot)
    rows = [{"instruction": r["instruction"], "input": r["input"], "reference": r["output"],
             "response": tokenizer.decode(new)} for r, new in zip(records, responses)]
    em = exact_match([r["response"] for r in rows], [r["reference"] for r in rows])
    f1 = sum(token_f1(r["response"], r["reference"]) for r in rows) / max(1, len(rows))
    return rows, {"exact_match": round(em, 4), "token_f1": round(f1, 4)}


def _instruct_splits(data, val_data, test_data, seed):
    records = read_instructions(data) if data else default_instruction_data()
    if val_data or test_data:
        if not (val_data and test_data):
            raise TinyLLMError("give both --val-data and --test-data, or neither (85/5/10 split)")
        splits = records, read_instructions(val_data), read_instructions(test_data)
    else:
        splits = split_three(records, SPLIT_INSTRUCT, seed)
    _check_splits(data, *splits)
    return splits


def run_instruct(out, checkpoint=None, data=None, val_data=None, test_data=None,
                 include_prompt=False, random_init=False, lora_rank=0, lora_alpha=None,
                 batch_size=16, max_iters=1500, epochs=None, lr=1e-3, warmup_iters=50,
                 eval_interval=250, eval_iters=5, weight_decay=0.01, seed=1337, resume=False,
                 force=False, max_iters_given=False, max_new_tokens=32, log=print):
    """Instruction-tune a GPT; writes the run directory, responses.jsonl and metrics.json."""
    prepare_out_dir(out, resume, force)
    resume_ckpt = None
    if resume:
        resume_ckpt = load_checkpoint(out, with_optimizer=True, kind=("gpt", "gpt-lora"))
        s = resume_ckpt.meta.get("finetune")
        if not s or s.get("task") != "instruct":
            raise TinyLLMError(f"--resume: {out} is not an instruction fine-tuning run")
        data, val_data, test_data, seed = s["data"], s["val_data"], s["test_data"], s["seed"]
        include_prompt, checkpoint = s["include_prompt"], s["base"]
        config, tokenizer, params = resume_ckpt.model_config, resume_ckpt.tokenizer, resume_ckpt.params
    train, val, test = _instruct_splits(data, val_data, test_data, seed)
    if not resume:
        params, gpt_config, tokenizer = load_base(checkpoint, random_init, seed, log)
        if EOT not in tokenizer.special_tokens:
            raise TinyLLMError(f"--checkpoint: its tokenizer has no {EOT} token to end responses;"
                               " pretrain with this version of tinyllm")
        params, gpt_config, tokenizer = add_unknown_token(params, gpt_config, tokenizer)
        config = gpt_config
        if lora_rank:
            config = LoRAGPTConfig(**gpt_config.__dict__, lora_rank=lora_rank,
                                   lora_alpha=float(lora_alpha if lora_alpha is not None
                                                    else 2 * lora_rank))
            params = {**params, "lora": init_lora(params, lora_rank, onp.random.default_rng([seed, 3]))}
    gpt_config = config.gpt() if hasattr(config, "gpt") else config
    arrays = {}
    for name, split in (("train", train), ("val", val)):
        arrays[name], skipped, fallback = encode_instructions(tokenizer, split, config.block_size,
                                                              include_prompt)
        if arrays[name] is None:
            raise TinyLLMError(f"every {name} record is longer than the context"
                               f" ({config.block_size} tokens)")
        if skipped:
            log(f"note: {skipped} {name} record(s) longer than the context were skipped")
        if fallback:
            log(f"note: {fallback} character(s) in {name} fell back to {UNK_TOKEN}")
    log(f"data: {data or 'embedded tasks (reverse, uppercase, sort letters, add)'}:"
        f" {len(train)} train, {len(val)} val, {len(test)} test records")
    tc = make_train_config(batch_size, max_iters, epochs, len(arrays["train"][0]), lr,
                           warmup_iters, eval_interval, eval_iters, seed, weight_decay)
    scale = config.lora_alpha / config.lora_rank if lora_rank or "lora" in params else 0.0
    if resume:
        tc = replace(resume_ckpt.train_config,
                     max_iters=max_iters if max_iters_given else resume_ckpt.train_config.max_iters)
        before = resume_ckpt.meta["before"]
    else:
        log(f"scoring the base model on {len(test)} test records ...")
        before = score_responses(merge_lora(params, config.lora_alpha, config.lora_rank)
                                 if "lora" in params else params, gpt_config, tokenizer, test,
                                 max_new_tokens)[1]
    log(f"base model: exact match {100 * before['exact_match']:.1f}%, token F1"
        f" {100 * before['token_f1']:.1f}%")
    start_out_dir(out, resume, force)
    flat = flatten(params)
    paths = [p for p in flat if p.startswith("lora.")] if "lora" in params else list(flat)
    settings = {"task": "instruct", "data": data, "val_data": val_data, "test_data": test_data,
                "seed": seed, "include_prompt": include_prompt, "base": checkpoint}
    kind = "gpt-lora" if "lora" in params else "gpt"

    def loss_fn(p, batch, rng):
        if "lora" in p:
            from .lora import apply_lora

            p = apply_lora(p, scale)
        return gpt_loss(p, batch[0], batch[1], gpt_config, rng, mask=batch[2])

    def sample(split, rng):
        rows = rng.integers(0, len(arrays[split][0]), size=tc.batch_size)  # (B,)
        return tuple(a[rows] for a in arrays[split])

    def save_full(full, opt_state, s):
        save_checkpoint(out, full, opt_state, s.rng_state, config, tc, tokenizer, s.iteration,
                        extra={"finetune": settings, "before": before, "template":
                               "Instruction: {instruction}\\nInput: {input}\\nResponse: ",
                               "last_eval_iter": s.last_eval_iter}, kind=kind)

    t0 = time.perf_counter()
    n_trainable = sum(onp.size(flat[p]) for p in paths)
    log(f"model: {count_params(params):,} parameters, {n_trainable:,} trainable")
    params = run_training(params, paths, tc, loss_fn, sample, save_full, out, resume_ckpt,
                          tc.batch_size * arrays["train"][0].shape[1], log)
    seconds = time.perf_counter() - t0
    log(f"generating responses for {len(test)} test records ...")
    inference = merge_lora(params, config.lora_alpha, config.lora_rank) if "lora" in params else params
    rows, after = score_responses(inference, gpt_config, tokenizer, test, max_new_tokens)
    atomic_write_text(os.path.join(out, "responses.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report = {"task": "instruct", "base": checkpoint, "lora_rank": getattr(config, "lora_rank", 0),
              "include_prompt": include_prompt,
              "records": {"train": len(train), "val": len(val), "test": len(test)},
              "test_before": before, "test_after": after, "iterations": tc.max_iters,
              "train_seconds": round(seconds, 1),
              "final_val_loss": (read_metrics(out) or [{}])[-1].get("val_loss")}
    write_report(out, report)
    return report


def load_generator(checkpoint):
    """(params, GPTConfig, tokenizer) of a pretrained or instruction-tuned run, adapters merged."""
    ckpt = load_checkpoint(checkpoint, kind=("gpt", "gpt-lora"))
    config = ckpt.model_config
    if hasattr(config, "lora_rank"):
        return merge_lora(ckpt.params, config.lora_alpha, config.lora_rank), config.gpt(), ckpt.tokenizer
    return ckpt.params, config, ckpt.tokenizer


def generate_instruction(checkpoint, instruction, input_text="", max_new_tokens=200,
                         temperature=0.0, top_k=None, top_p=None, seed=None):
    """The fine-tuning prompt for an instruction (and input) plus the model's response, which
    ends at the end-of-text token (`tinyllm generate --instruction`)."""
    from .generate import check_sampling_args, generate_ids

    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not instruction.strip():
        raise TinyLLMError("--instruction is empty")
    params, config, tokenizer = load_generator(checkpoint)
    eot = tokenizer.special_tokens.get(EOT)
    prompt = format_prompt({"instruction": instruction, "input": input_text})
    ids, _ = encode_with_fallback(tokenizer, prompt)
    if len(ids) >= config.block_size:
        raise TinyLLMError(f"--instruction/--input: the prompt has {len(ids)} tokens, the model's"
                           f" context is {config.block_size}")
    limit = min(max_new_tokens, config.block_size - len(ids))  # the template must stay in view
    new = generate_ids(params, config, ids, limit, onp.random.default_rng(seed), temperature,
                       top_k, top_p, stop=lambda out: out[-1] == eot)
    return prompt + tokenizer.decode([i for i in new if i != eot])
