"""Training an encoder-decoder: what `tinyllm seq2seq train` does (the model is tinyllm/seq2seq.py),
and scoring one on a PAIRS file (`tinyllm seq2seq translate --data`).

A run directory is a standard tinyllm checkpoint (see tinyllm/checkpoint.py) with "kind": "seq2seq",
"model": the Seq2SeqConfig fields, and three more fields in config.json: "label_smoothing",
"schedule" ("cosine" or "noam") and "data" (the PAIRS path, or null for the embedded task) with
its "data_sha256" (of the pairs written as JSON, [["source", "target"], ...]). The tokenizer is
a char tokenizer over both sides with the special tokens <pad>, <bos> and <eos>.

When the run finishes, it adds metrics.json, its final report (`held_out_report`):
    {"format": "tinyllm-seq2seq-metrics", "version": 1, "held_out_pairs": N, "exact_match": 0..1,
     "bleu": 0..100, "max_len": the length limit, "cut": outputs that reached it without <eos>,
     "decoding": "greedy", "iterations": steps, "train_seconds": over every --resume (null if
     unknown), "train_seconds_this_part": ...}
--force and --resume remove the report first, so a run that stops early never shows an older one.
"""

import json
import os
from dataclasses import replace

from .bleu import bleu_can_score, corpus_bleu, exact_match
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .decoding import default_max_len, translate
from .errors import TinyLLMError
from .fileio import atomic_write_json
from .models import count_params
from .rundir import (check_resumed_total, check_still_there, prepare_out_dir, read_stored_text,
                     same_fingerprint, start_out_dir, starting_state, stored_data_name,
                     text_fingerprint)
from .seq2seq import init_seq2seq, seq2seq_loss
from .seq2seq_data import (DEFAULT_TASK, EMBEDDED_TASKS, SEQ2SEQ_SPECIAL_TOKENS, encode_pairs,
                           encoding_problem, get_pair_batch, load_pairs, make_arrays, pairs_text,
                           parse_pairs, repeated_pairs, split_pairs)
from .tokenizers import CharTokenizer
from .train import (TrainingClock, check_memory, earlier_train_seconds, gpt_param_count,
                    gpt_step_bytes, read_metrics, train_loop)

SCHEDULES = ("cosine", "noam")
SEQ2SEQ_RUN = "runs/seq2seq"  # where `tinyllm seq2seq train` keeps its run by default

# The defaults of `tinyllm seq2seq train` (the model's are Seq2SeqConfig's): with them the
# embedded dates task reaches 100% held-out exact match in about 2 minutes on 2 cores.
SEQ2SEQ_TRAIN = TrainConfig(
    batch_size=64,  # pairs per step: short pairs, so a bigger batch than pretraining's
    max_iters=1500,  # the dates task is learned fully by then
    lr=3e-3,  # a small (0.24M) model on clean generated data tolerates a large rate
    min_lr=3e-4,  # lr / 10, as in pretraining
    eval_iters=10,  # batches per split in each evaluation: 640 pairs
)
LABEL_SMOOTHING = 0.1  # the paper's epsilon (section 5.4)
SCHEDULE = "cosine"  # warm-up plus cosine, as in pretraining; "noam" is the paper's
EVAL_EXAMPLES = 500  # held-out pairs decoded at the end of a run for its exact match
REPORT_FILE = "metrics.json"  # the final report, written when a run finishes
METRICS_FORMAT = "tinyllm-seq2seq-metrics"
METRICS_VERSION = 1


# ----------------------------------------------------------------------------- schedule


def noam_lr(it, d_model, warmup_iters, scale=1.0):
    """The paper's learning rate (section 5.3) at step `it` (from 0; the paper counts from 1):

        lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5),   step = it + 1

    It rises linearly for `warmup_iters` steps, peaks at d_model^-0.5 * warmup^-0.5, then decays
    as 1 / sqrt(step). Example: d_model 128, warmup 400 -> peak at it = 399: 0.0884 * 0.05 = 0.00442;
    it = 1599 (step 1600): 0.0884 / 40 = 0.00221, half the peak.
    """
    step = it + 1
    return scale * d_model**-0.5 * min(step**-0.5, step * max(1, warmup_iters) ** -1.5)


# ----------------------------------------------------------------------------- a training run


def learning_rate_schedule(name, d_model, tc):
    """The learning rate by step for `train.train_loop`: "cosine" (warm-up + cosine, the loop's
    own default: None) or "noam" (the paper's, `noam_lr`, which ignores --lr and --min-lr)."""
    if name == "cosine":
        return None
    return lambda it: noam_lr(it, d_model, tc.warmup_iters)


def train_seq2seq(model_config, tc, out_dir, data=None, label_smoothing=LABEL_SMOOTHING,
                  schedule=SCHEDULE, resume=False, force=False, max_iters=None,
                  eval_examples=EVAL_EXAMPLES, log=print, use_cache=True):
    """Train an encoder-decoder on PAIRS (a file or the embedded task) with checkpoints in out_dir.

    With resume=True the model, tokenizer, data and training settings come from the checkpoint;
    only `max_iters` may change, and `data` may name where the run's pairs are now. Ends with
    greedy decoding of up to `eval_examples` held-out pairs, each up to the longest target and a
    token more (on the key/value cache unless use_cache is False), scored and written to
    out_dir/metrics.json. Returns a summary dict: the report's fields and more.
    """
    prepare_out_dir(out_dir, resume, force)
    if resume:
        ckpt = load_checkpoint(out_dir, with_optimizer=True, kind="seq2seq")
        check_resumed_total(max_iters, ckpt.iter, out_dir)
        model_config, tokenizer = ckpt.model_config, ckpt.tokenizer
        label_smoothing, schedule = ckpt.meta["label_smoothing"], ckpt.meta["schedule"]
        tc = replace(ckpt.train_config, max_iters=max_iters or ckpt.train_config.max_iters)
    tc.validate()
    check_training_options(label_smoothing, schedule)
    if resume:  # --data: where the run's own pairs are now, if they moved
        train_pairs, held_pairs = resumed_pairs(ckpt.meta, out_dir, data)
        data = data or ckpt.meta.get("data")
    else:
        train_pairs, held_pairs = load_pairs(data)
    fingerprint = text_fingerprint(fingerprinted_text(train_pairs + held_pairs))
    if not resume:
        text = pairs_text(train_pairs + held_pairs)
        tokenizer = CharTokenizer.train(text, SEQ2SEQ_SPECIAL_TOKENS)
        model_config = replace(model_config, vocab_size=tokenizer.vocab_size)
    model_config.validate()
    check_memory(2 * gpt_step_bytes(model_config, tc, gpt_param_count(model_config)),
                 f"an encoder-decoder step with --batch-size {tc.batch_size}")  # two stacks
    arrays = split_arrays(tokenizer, model_config.block_size, train_pairs, held_pairs)
    start_out_dir(out_dir, resume, force)
    if resume or force:
        remove_report(out_dir)

    state = starting_state(out_dir, tc, lambda rng: init_seq2seq(model_config, rng),
                           ckpt if resume else None, log)
    log(f"data: {data or 'dates (embedded task)'}, {len(train_pairs):,} training and"
        f" {len(held_pairs):,} held-out pairs (vocab {tokenizer.vocab_size});"
        f" model: {count_params(state.params):,} parameters")
    repeated = repeated_pairs(train_pairs, held_pairs)
    if repeated:
        log(f"note: {repeated:,} of the {len(held_pairs):,} held-out pairs are also training pairs:"
            " the held-out figures count them, learned by heart")

    def loss_fn(params, batch, rng):
        return seq2seq_loss(params, batch, model_config, label_smoothing, rng)

    def sample(split, rng):
        return get_pair_batch(arrays[split], tc.batch_size, rng)

    extra = {"data": stored_data_name(data, EMBEDDED_TASKS, None), "data_sha256": fingerprint,
             "label_smoothing": label_smoothing,
             "schedule": schedule}

    def save(s):
        save_checkpoint(out_dir, s.params, s.opt_state, s.rng_state, model_config, tc, tokenizer,
                        s.iteration, extra={**extra, "train_seconds": clock.total(),
                                            "last_eval_iter": s.last_eval_iter},
                        kind="seq2seq")

    clock = TrainingClock(earlier_train_seconds(ckpt.meta) if resume else 0.0)
    tokens = tc.batch_size * (arrays["train"][0].shape[1] + arrays["train"][2].shape[1])
    state = train_loop(state, tc, loss_fn, sample, save, out_dir, tokens,
                       lr_fn=learning_rate_schedule(schedule, model_config.n_embd, tc))
    clock.stop()
    scored = held_pairs[:eval_examples]
    # Room for the longest target and one token more: an output that has not stopped by then is
    # longer than every target, so cutting it there never turns a miss into an exact match.
    room = arrays["val"][2].shape[1]  # (N, T): T is the longest target with its <eos>
    score = score_pairs(state.params, model_config, tokenizer, scored, max_len=room,
                        use_cache=use_cache)
    report = held_out_report(score, len(scored), state.iteration, clock)
    write_report(out_dir, report)
    return {**report, "bleu_can_score": score["bleu_can_score"], "params": state.params,
            "model_config": model_config, "tokenizer": tokenizer, "seconds": clock.part(),
            "final": read_metrics(out_dir)[-1],
            "examples": list(zip(scored[:5], score["outputs"][:5]))}


# ----------------------------------------------------------------------------- the final report


def held_out_report(score, n_pairs, iterations, clock):
    """The fields of metrics.json (see the module docstring) from score_pairs' `score` of the
    `n_pairs` held-out pairs, the steps done and the run's TrainingClock."""
    return {"held_out_pairs": n_pairs, "exact_match": score["exact_match"],
            "bleu": score["bleu"], "max_len": score["max_len"], "cut": score["cut"],
            "decoding": "greedy", "iterations": iterations, "train_seconds": clock.total(),
            "train_seconds_this_part": clock.part()}


def write_report(out_dir, report):
    """out_dir/metrics.json: versioned, indented, written atomically."""
    atomic_write_json(os.path.join(out_dir, REPORT_FILE),
                      {"format": METRICS_FORMAT, "version": METRICS_VERSION, **report})


def remove_report(out_dir):
    """Remove the report of an earlier run in out_dir (--force, or --resume of a finished run):
    a run that stops before its end must not show another's."""
    path = os.path.join(out_dir, REPORT_FILE)
    if os.path.lexists(path):
        os.remove(path)


# ----------------------------------------------------------------------------- scoring a PAIRS file


def score_pairs(params, config, tokenizer, pairs, max_len=None, **search):
    """Translate the sources of `pairs` (all readable: see seq2seq_data.readable_pairs) and score
    the outputs against the targets -> dict with "outputs", "exact_match" (0..1), "bleu" (0..100),
    "bleu_can_score" (False if no target has 4 words: BLEU-4 is then 0 whatever the outputs),
    "max_len" (the length limit used), "cut" (how many outputs reached it without <eos>) and
    "unwritable" (the reason for each target no output can equal: a character the tokenizer never
    saw, or more tokens than the decoder's context). `search`: decoding.translate's beam_size,
    alpha, use_cache and on_done. Without max_len, `room_to_score`'s limit.
    """
    room = config.block_size - 1  # a target shares the decoder's context with its <bos>
    # exact match ignores outer whitespace: a target is unwritable only if its stripped text is too
    problems = [encoding_problem(tokenizer, p.target.strip(), room, p.where, "target")
                for p in pairs]
    writable = [p.target for p, problem in zip(pairs, problems) if not problem]
    max_len = min(max_len or room_to_score(tokenizer, config, pairs, writable), room)
    translations = translate(params, config, tokenizer, [p.source for p in pairs],
                             [p.where for p in pairs], max_len=max_len, **search)
    outputs = [t.text for t in translations]
    references = [p.target for p in pairs]
    return {"outputs": outputs, "exact_match": exact_match(outputs, references),
            "bleu": corpus_bleu(outputs, references),
            "bleu_can_score": bleu_can_score(references), "max_len": max_len,
            "cut": sum(t.cut for t in translations),
            "unwritable": [problem for problem in problems if problem]}


def room_to_score(tokenizer, config, pairs, writable):
    """The default length limit for scoring pairs: as far as `translate` lets any text run, or the
    longest writable target and one token more if that is longer (within the context). So the
    limit never cuts an output that could still equal its target, nor one that has not yet passed
    every target. Example: sources of 1 token, a target of 70 -> max(2 * 1 + 50, 71) = 71."""
    sources = [tokenizer.encode(p.source) for p in pairs]
    longest = max((target_length(tokenizer, t) for t in writable), default=0)
    return min(max(default_max_len(config.block_size, sources), longest + 1), config.block_size - 1)


def target_length(tokenizer, target):
    """Tokens in `target` as the model would write it: with its outer whitespace if the tokenizer
    knows those characters, else without (exact match ignores them). Example: " eno" -> 4 if the
    tokenizer knows ' ', else 3."""
    try:
        return len(tokenizer.encode(target))
    except TinyLLMError:
        return len(tokenizer.encode(target.strip()))


def resumed_pairs(meta, out_dir, data=None):
    """The (train, held-out) pairs of the run in out_dir, returned only if they are the pairs it
    began with (their sha256 matches). `data` (--resume --data FILE) says where they are now.

    Without it, the path stored in the run directory is read, and that path is untrusted: it is
    read only as a regular file (never a FIFO), and a file that no longer reads as pairs is
    reported as changed, without a word of what its lines hold.
    """
    stored = meta.get("data")
    changed = TinyLLMError(f"--resume: the data {data or stored or DEFAULT_TASK!r} of the run in"
                           f" {out_dir} has changed since the run began (its sha256 differs)")
    if data is not None:
        pairs = load_pairs(data)
    elif stored is None or stored in EMBEDDED_TASKS:  # a name, never a file of that name
        pairs = EMBEDDED_TASKS[stored or DEFAULT_TASK]()
    else:
        check_still_there(stored, out_dir)
        text = read_stored_text(stored, out_dir, "--resume --data FILE")
        try:
            pairs = split_pairs(parse_pairs(text, stored, min_pairs=2))
        except TinyLLMError:
            raise changed from None
    if not same_pairs(meta.get("data_sha256"), pairs[0] + pairs[1]):
        raise changed
    return pairs


def fingerprinted_text(pairs):
    """The text whose sha256 a run stores to know its pairs again: the pairs as JSON, each side
    apart, so that text moved across the tab ("ab<TAB>c" -> "a<TAB>bc") changes it.
    Example: [Pair("ab", "c", ...)] -> '[["ab", "c"]]'."""
    return json.dumps([[p.source, p.target] for p in pairs])


def same_pairs(stored, pairs):
    """Do `pairs` have the stored fingerprint? Runs begun before fingerprinted_text stored the
    sha256 of pairs_text, the sides run together, some with a byte-order mark kept in front."""
    joined = pairs_text(pairs)
    return any(same_fingerprint(stored, text)
               for text in (fingerprinted_text(pairs), joined, "\ufeff" + joined))


def check_training_options(label_smoothing, schedule):
    """One-line errors for seq2seq-specific training settings."""
    number = isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
    if not number or not 0.0 <= label_smoothing < 1.0:  # also a wrong type in a resumed run's config
        raise TinyLLMError(f"--label-smoothing must be in [0, 1), got {label_smoothing!r}")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise TinyLLMError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def split_arrays(tokenizer, block_size, train_pairs, held_pairs):
    """Encode both splits and pad them to the same lengths: {"train": arrays, "val": arrays}."""
    # both splits at once, so that one error counts every pair too long for the context
    src_ids, tgt_ids = encode_pairs(tokenizer, train_pairs + held_pairs, block_size)
    n = len(train_pairs)
    encoded = {"train": (src_ids[:n], tgt_ids[:n]), "val": (src_ids[n:], tgt_ids[n:])}
    src_len = max(len(s) for sources, _ in encoded.values() for s in sources)
    tgt_len = max(len(t) for _, targets in encoded.values() for t in targets) + 1
    return {split: make_arrays(src, tgt, tokenizer.special_tokens, src_len, tgt_len)
            for split, (src, tgt) in encoded.items()}
