"""Classification runs: what `tinyllm finetune classify` and `tinyllm classify` do.

`run_classify` fine-tunes a base model into a classifier, walking the seven steps of
finetune_runs (settings, data, model, encode, score before, train, score after); a text longer
than the context is read as overlapping windows whose pooled outputs are averaged
(finetune.make_windows). `load_classifiers`, `classify_texts` and `score_file` use finished
runs: one run, or several whose class probabilities are averaged.
"""

import os
import re
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import numpy as onp

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .distributed import SINGLE_PROCESS
from .errors import TinyLLMError
from .finetune import (DEFAULT_POOLING, ClassifierConfig, classifier_from_gpt, classifier_loss,
                       confusion_matrix, length_groups, make_windows, precision_recall,
                       predict_windows, trainable_paths)
from .finetune_runs import (DATA_FLAGS, EVAL_TRAIN_EXAMPLES, FinetuneSettings, add_unknown_token,
                            check_data_unchanged, check_flag, check_splits, check_step_memory,
                            data_fingerprints, encode_all, load_base, log_trainable,
                            make_train_config, note_batch_over_split, resumed_train_config,
                            run_settings, settings_from_run, start_finetune_dir, stored_settings,
                            train_run, with_moved_data, write_report)
from .labelled_data import (SPLIT_CLASSIFY, UNK_TOKEN, balance, case_variants,
                            default_classification_data, label_ids, read_classification,
                            split_three, with_case_copies, without_repeats)
from .progress import Counting
from .rundir import check_same_ranks, prepare_out_dir


# The learning rate and warm-up steps when the flags leave them out, by what the base was
# pretrained for (docs/experiments.md, over sixteen seeds on real short messages and on the
# embedded set). A causal decoder at 1e-3 sometimes overshot, and early stopping then kept a
# model 25 steps old (0.736 test accuracy on one of six seeds); 5e-4 did not, and 3e-4 learned
# too slowly. An MLM encoder gained 1.0 and 1.8 points at 1e-3 with 50 warm-up steps, the
# longer warm-up keeping its first steps from overshooting.
LR_AND_WARMUP = {"clm": (5e-4, 20), "mlm": (1e-3, 50)}


@dataclass(frozen=True)
class ClassifySettings(FinetuneSettings):
    """`tinyllm finetune classify`: defaults chosen on real short texts (docs/experiments.md)."""

    BEFORE_THEY_EXISTED = {"case_copies": False, "dedupe": False}

    text_column: Optional[str] = None  # CSV/TSV column of the text; None: "text" or column 0
    label_column: Optional[str] = None  # None: "label" or column 1
    balance: bool = False  # downsample the larger classes to the smallest
    dedupe: bool = False  # keep only the first record of each text (labelled_data.without_repeats)
    case_copies: bool = True  # train on every training text also in upper and in lower case
    # (`labelled_data.with_case_copies`): real short messages mix cases freely, and a tokenizer
    # trained on edited prose reads capitals as rare fragments (see the README)
    arch: Optional[str] = None  # "decoder" (causal) or "encoder" (the same weights run
    # bidirectionally); None: "encoder" from an MLM checkpoint, "decoder" from any other
    pooling: Optional[str] = None  # None: finetune.DEFAULT_POOLING of the arch
    freeze: str = "none"  # none | all | all-but-N
    max_windows: int = 8  # most context windows read per text; the rest of a text is cut
    dropout: float = 0.1  # dropout in the body while fine-tuning, as BERT fine-tunes: a few
    # hundred examples are learned by heart in 100 steps without it
    max_iters: int = 300
    lr: Optional[float] = None  # None: by the base's objective (LR_AND_WARMUP)
    warmup_iters: Optional[int] = None  # None: likewise
    eval_interval: int = 25

    def validate(self):
        super().validate()
        check_flag(self.max_windows > 0, "--max-windows must be positive", self.max_windows)
        check_flag(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)", self.dropout)
        check_flag(re.fullmatch(r"none|all|all-but-[0-9]+", self.freeze),  # N: with the model
                   "--freeze must be none, all or all-but-N", repr(self.freeze))
        if self.lora_rank and self.freeze != "none":  # as the CLI says (check_flag_combinations)
            raise TinyLLMError(f"--freeze {self.freeze} does nothing with --lora-rank: only the"
                               " adapters and the head train; leave out one of the two")
        return self


# ----------------------------------------------------------------------------- classification


class ClassificationSplits(NamedTuple):
    train: list  # of (text, label)
    val: list
    test: list
    repeats_dropped: int  # records --dedupe dropped (0 without it)
    balance_dropped: int = 0  # records --balance dropped from the larger classes


def load_classification_splits(s, log=print):
    """Train, val and test lists of (text, label), from files or the embedded default; `log`
    is told of a header found by its labels (labelled_data.first_row_is_header).

    With --dedupe, repeats go before the split: a text is kept once in --data, and a text of
    --val-data or --test-data already in an earlier file is dropped from it."""
    examples = (read_classification(s.data, s.text_column, s.label_column, log=log) if s.data
                else default_classification_data())
    dropped = 0
    if s.dedupe:
        examples, dropped = without_repeats(examples)
    before_balance = len(examples)
    if s.balance:
        examples = balance(examples, s.data_seed)
    if s.val_data:
        train, classes = examples, {label for _, label in examples}
        val, test = (read_classification(path, s.text_column, s.label_column, classes, log)
                     for path in (s.val_data, s.test_data))
        if s.dedupe:
            (val, in_val), (test, in_test) = (without_repeats(val, train),
                                              without_repeats(test, train + val))
            dropped += in_val + in_test
            for path, kept, gone in ((s.val_data, val, in_val), (s.test_data, test, in_test)):
                if not kept:
                    raise TinyLLMError(f"{path}: --dedupe dropped all {gone} record(s): each"
                                       " text is also in an earlier file")
    else:
        train, val, test = split_three(examples, SPLIT_CLASSIFY, s.data_seed)
        _check_every_class_trains(s.data, train, val + test)
    check_splits(s.data, train, val, test)
    return ClassificationSplits(train, val, test, dropped, before_balance - len(examples))


def _check_every_class_trains(data, train, held_out):
    """A random split can leave a rare class out of training: name it, rather than call the
    data single-class or the class unknown to the model."""
    missing = sorted({label for _, label in held_out} - {label for _, label in train})
    if missing:
        n = sum(label == missing[0] for _, label in held_out)
        raise TinyLLMError(f"{data or 'the data'}: the {n} record(s) of class"
                           f" {shown_label(missing[0])} all fell in the validation or test split,"
                           " so none is trained on: give more of them, or --val-data and"
                           " --test-data")


def encode_classification(tokenizer, examples, labels, block_size, max_windows, where,
                          counted=None):
    """(Windows, y (N,), counts) for (text, label) examples; counts has how many texts were
    read as several windows ("windowed"), cut after max_windows ("cut") and how many characters
    fell back to the unknown token ("fallback_characters"), among the first `counted` examples
    (default: all). A training split's case copies come after its records: they are trained
    on, but the counts are of the records read."""
    unknown = sorted({label for _, label in examples} - set(labels))
    if unknown:
        alike = [label for group in case_variants([unknown[0], *labels]) if unknown[0] in group
                 for label in group if label != unknown[0]]
        hint = f"; it differs only in case from {shown_label(alike[0])}" if alike else ""
        raise TinyLLMError(f"{where}: label {shown_label(unknown[0])} is not one the model was"
                           f" trained on ({shown_labels(labels)}){hint}")
    counted = len(examples) if counted is None else counted
    texts = [text for text, _ in examples]
    seqs, fallback = encode_all(tokenizer, texts[:counted])
    seqs += encode_all(tokenizer, texts[counted:])[0]
    empty = [i for i, s in enumerate(seqs[:counted]) if not s]  # (an empty text's copies are too)
    if empty:
        raise TinyLLMError(f"{where}: {len(empty)} example(s) have empty text (the first is"
                           f" example {empty[0] + 1})")
    windows, windowed, cut = make_windows(seqs, block_size, max_windows)
    if cut == len(seqs):
        raise TinyLLMError(f"{where}: every text is longer than {max_windows} windows of"
                           f" {block_size} tokens; raise --max-windows")
    if counted < len(seqs):  # windowing is cheap next to encoding: redo it for the counts
        windowed, cut = make_windows(seqs[:counted], block_size, max_windows)[1:]
    y = onp.asarray([labels.index(label) for _, label in examples], dtype=onp.int32)
    return windows, y, {"windowed": windowed, "cut": cut, "fallback_characters": fallback}


def shown_label(label, width=40):
    """A class name quoted for a message, cut to about `width` characters."""
    return repr(label if len(label) <= width else label[:width - 3] + "...")


def shown_labels(labels, most=10):
    """Class names for a message, at most `most` of them: a --label-column that names the text
    column by mistake makes hundreds of long "classes", and a message should stay one line.

    Example: ["a", "b", "c"], most=2 -> "'a', 'b', ... (3 classes)".
    """
    shown = ", ".join(shown_label(label) for label in labels[:most])
    return shown if len(labels) <= most else f"{shown}, ... ({len(labels)} classes)"


def accuracy(params, config, windows, y, on_batch=None):
    """Fraction of texts whose most likely class is the true one, and the predictions."""
    pred = predict_windows(params, windows, config, on_batch=on_batch).argmax(axis=1)
    return float((pred == y).mean()) if len(y) else 0.0, pred


def classify_report(params, config, labels, sets, on_batch=None):
    """Accuracy per split, and the test split's confusion matrix and per-class precision/recall;
    on_batch(texts scored so far, over all splits), if given, as the scoring goes."""
    accs, pred, scored = {}, None, 0
    for name, (windows, y) in sets.items():
        counted = (lambda done, before=scored: on_batch(before + done)) if on_batch else None
        accs[name], p = accuracy(params, config, windows, y, on_batch=counted)
        scored += len(y)
        if name == "test":
            pred = p
    matrix = confusion_matrix(sets["test"][1], pred, len(labels))
    return accs, matrix, per_class_stats(matrix, labels)


def scored_with_progress(params, config, labels, sets, n_read):
    """classify_report on the records read (a training split's case copies are trained on, not
    scored), with a line on stderr of how many texts are scored: minutes for a large file."""
    train_windows, train_y = sets["train"]
    sets = {**sets, "train": (train_windows.head(n_read), train_y[:n_read])}
    progress = Counting(sum(len(y) for _, y in sets.values()), "texts scored")
    report = classify_report(params, config, labels, sets, on_batch=progress.update)
    progress.close()
    return report


def per_class_stats(matrix, labels):
    """{label: {"precision", "recall", "support"}} from a confusion matrix."""
    precision, recall = precision_recall(matrix)
    return {label: {"precision": round(precision[i], 4), "recall": round(recall[i], 4),
                    "support": int(matrix[i].sum())} for i, label in enumerate(labels)}


def base_objective(s):
    """"mlm" for a base pretrained by masked tokens, else "clm" (no checkpoint: random init of
    the default causal architecture)."""
    return "mlm" if s.checkpoint and read_meta(s.checkpoint)["kind"] == "mlm" else "clm"


def with_base_defaults(s, objective):
    """The settings with lr and warmup_iters, where None, set by the base's objective ("clm" or
    "mlm", LR_AND_WARMUP). Example: "mlm" and lr=None -> lr=1e-3, warmup_iters=50."""
    lr, warmup_iters = LR_AND_WARMUP[objective]
    return replace(s, lr=lr if s.lr is None else s.lr,
                   warmup_iters=warmup_iters if s.warmup_iters is None else s.warmup_iters)


def build_classifier(s, labels, log):
    """(params, ClassifierConfig, tokenizer, objective): the base model with a fresh
    classification head, and what the base was pretrained for ("clm" or "mlm")."""
    gpt_params, gpt_config, tokenizer = load_base(s, log, kinds=("gpt", "gpt-lora", "mlm"))
    gpt_params, gpt_config, tokenizer = add_unknown_token(gpt_params, gpt_config, tokenizer)
    objective = base_objective(s)  # after load_base, whose error names --checkpoint
    # an MLM encoder was pretrained bidirectionally
    arch = s.arch or ("encoder" if objective == "mlm" else "decoder")
    config = ClassifierConfig(**{**gpt_config.__dict__, "dropout": s.dropout},
                              n_classes=len(labels),
                              pooling=s.pooling or DEFAULT_POOLING[arch],
                              arch=arch, lora_rank=s.lora_rank,
                              lora_alpha=s.adapter_alpha).validate()
    params = classifier_from_gpt(gpt_params, config, onp.random.default_rng([s.seed, 2]))
    return params, config, tokenizer, objective


def classification_loss_and_batches(sets, config, batch_size):
    """The loss of a batch, and sample(split, rng) drawing batch_size random texts of a split.

    A batch is a list of groups (ids, valid, assign, y), its texts split by length
    (`finetune.length_groups`), each group padded only to its own longest window; the loss is
    the mean over all the batch's texts."""

    def loss_fn(p, batch, rng):
        n = sum(len(y) for *_, y in batch)
        return sum(classifier_loss(p, ids, valid, y, config, rng, assign) * (len(y) / n)
                   for ids, valid, assign, y in batch)

    def sample(split, rng):
        windows, y = sets[split]
        texts = rng.integers(0, len(y), size=batch_size)  # (B,)
        return batch_groups(windows, y, texts)

    return loss_fn, sample


def real_tokens_per_batch(windows, batch_size):
    """The tokens a batch of `batch_size` texts holds on average, padding not counted (the
    progress line's tok/s is of these)."""
    return round(batch_size * float(windows.valid.sum()) / windows.n_texts)


def batch_groups(windows, y, texts):
    """The texts at indices `texts` as a batch for `classification_loss_and_batches`' loss: a
    list of (ids, valid, assign, y) groups of similar length."""
    return [(*windows.batch(texts[group]), y[texts[group]])
            for group in length_groups(windows.lengths(texts))]


def classification_evaluator(sets, config, loss_fn, world=SINGLE_PROCESS):
    """evaluate(params) -> {"train", "val"}: the mean loss over the whole validation split and
    over the first EVAL_TRAIN_EXAMPLES training texts, in batches of 64 (longest texts first),
    without dropout. Over MPI each rank takes every world.size-th batch and the sums are added
    across ranks."""

    def mean_loss(params, split, limit):
        windows, y = sets[split]
        n = min(len(y), limit)
        by_length = windows.head(n).longest_first()
        total = 0.0
        for start in range(world.rank * 64, n, world.size * 64):
            texts = by_length[start:start + 64]  # a batch of similar lengths pads little
            total += float(loss_fn(params, batch_groups(windows, y, texts), None)) * len(texts)
        return world.sum_floats(total)[0] / n

    return lambda params: {"train": mean_loss(params, "train", EVAL_TRAIN_EXAMPLES),
                           "val": mean_loss(params, "val", len(sets["val"][1]))}


def run_classify(out, settings=None, resume=False, force=False, max_iters=None, log=print,
                 world=SINGLE_PROCESS):
    """Fine-tune a classifier end to end; writes the run directory and returns the report dict.

    `settings` (ClassifySettings) is ignored with resume=True, where the run's own settings are
    read back, except for data files it names (see with_moved_data); `max_iters` then sets a new
    total."""
    # 1. settings
    prepare_out_dir(out, resume, force)
    ckpt = load_checkpoint(out, with_optimizer=True, kind="classifier") if resume else None
    if resume:
        check_same_ranks(ckpt.meta, world.size, out)
    s = (settings_from_run(ckpt, ClassifySettings, max_iters, out) if resume
         else (settings or ClassifySettings())).validate()
    # 2. data (a resumed run's files are checked against their sha256 before they are parsed)
    if resume:
        s = with_moved_data(s, settings)
        check_data_unchanged(ckpt, s, out)
    train, val, test, dropped, balanced = load_classification_splits(s, log)
    n_read = len(train)
    if s.case_copies:
        train = with_case_copies(train)
    labels = (ckpt.meta["labels"] if resume
              else list(label_ids([label for _, label in train], s.data or "the embedded data")))
    # 3. model
    if resume:
        params, config, tokenizer = ckpt.params, ckpt.model_config, ckpt.tokenizer
    else:
        params, config, tokenizer, objective = build_classifier(s, labels, log)
        s = with_base_defaults(s, objective)  # a resumed run kept its own
    paths = trainable_paths(params, s.freeze, config.n_layer)
    # 4. encode
    sets, counts = encode_classify_splits(s, tokenizer, labels, config.block_size,
                                          {"train": train, "val": val, "test": test}, n_read)
    copies = f" (+ {len(train) - n_read} case copies)" if s.case_copies else ""
    log(f"data: {s.data or 'embedded docstring sentences by subject'}: {n_read} train{copies},"
        f" {len(val)} val, {len(test)} test; classes {shown_labels(labels)}")
    report_counts(counts, config.block_size, s.max_windows, log)
    note_case_variants(labels, log)
    repeats = {name: texts_also_in(train, split) for name, split in (("val", val),
                                                                      ("test", test))}
    if dropped:
        log(f"--dedupe: dropped {dropped} record(s) whose text an earlier record has")
    if balanced:
        log(f"--balance: dropped {balanced} record(s) of the larger classes, to keep as many of"
            " each class as the smallest has")
    note_repeats(repeats, {name: texts_also_in(train[:n_read], split) for name, split
                           in (("val", val), ("test", test))}, log)
    # 5. score before
    before = (ckpt.meta["before"] if resume
              else scored_with_progress(params, config, labels, sets, n_read)[0])
    log("accuracy before fine-tuning: " + format_accuracies(before))
    # 6. train
    tc = make_train_config(s, n_read, world.size)  # an epoch: the records read, not the copies
    note_batch_over_split(tc.batch_size, len(train), log)  # case copies are drawn from too
    if resume:
        tc = resumed_train_config(ckpt, tc, max_iters)
    check_step_memory(config, tc, int(sets["train"][0].count.max()))  # the most windows a text has
    start_finetune_dir(out, resume, force)  # a refused step count or batch leaves --out as it was
    log_trainable(params, paths, f"LoRA rank {config.lora_rank}: adapters and head"
                  if config.lora_rank else f"--freeze {s.freeze}", log)
    extra = {"labels": labels, "finetune": {"task": "classify", **stored_settings(s)},
             "data_files_sha256": data_fingerprints(s), "before": before, "ranks": world.size}

    def save(full, opt_state, st, fields):
        save_checkpoint(out, full, opt_state, st.rng_state, config, tc, tokenizer, st.iteration,
                        extra={**extra, **fields}, kind="classifier")

    loss_fn, sample = classification_loss_and_batches(sets, config, tc.batch_size)
    params, best, state, clock = train_run(
        out, ckpt, params, paths, tc, loss_fn, sample,
        classification_evaluator(sets, config, loss_fn, world),
        real_tokens_per_batch(sets["train"][0], tc.batch_size), s.patience, log, world, save)
    # 7. score after and report
    after, matrix, per_class = scored_with_progress(params, config, labels, sets, n_read)
    report = {"task": "classify", "labels": labels, "arch": config.arch, "pooling": config.pooling,
              "freeze": s.freeze, "lora_rank": config.lora_rank,
              "base": s.checkpoint, "random_init": bool(s.random_init or s.checkpoint is None),
              "examples": {"train": n_read, "val": len(val), "test": len(test)},
              "train_case_copies": len(train) - n_read,
              "accuracy_before": before, "accuracy_after": after,
              "test_confusion_matrix": matrix.tolist(), "test_per_class": per_class,
              "windowed_texts": counts["windowed"], "cut_texts": counts["cut"],
              "fallback_characters": counts["fallback_characters"],
              "texts_also_in_train": repeats, "repeats_dropped": dropped,
              "balance_dropped": balanced,
              "iterations": state.iteration, "best_iter": best.iteration,
              "best_val_loss": best.val_loss, "train_seconds": clock.total(),
              "train_seconds_this_part": clock.part()}
    write_report(out, report)
    log(f"best validation loss {best.val_loss:.4f} at iteration {best.iteration}: those weights"
        " are the run's result")
    return report


def encode_classify_splits(s, tokenizer, labels, block_size, splits, n_read):
    """(sets, counts) of a classification run: each split of `splits` ({"train": [(text,
    label)], "val": ..., "test": ...}) as context windows and label ids (`encode_classification`),
    and the texts windowed and cut and the characters read as the unknown token, summed over the
    splits. Of the training split only the first n_read records, the file's own, are counted:
    the case copies after them are trained on, not counted."""
    sets, counts = {}, {"windowed": 0, "cut": 0, "fallback_characters": 0}
    files = {"train": s.data, "val": s.val_data or s.data, "test": s.test_data or s.data}
    for name, split in splits.items():
        where = f"{files[name] or 'the embedded data'} ({name})"
        windows, y, n = encode_classification(tokenizer, split, labels, block_size, s.max_windows,
                                              where, counted=n_read if name == "train" else None)
        sets[name] = (windows, y)
        counts = {k: counts[k] + n[k] for k in counts}
    return sets, counts


def texts_also_in(train, split):
    """How many texts of `split` occur word for word in `train`, both lists of (text, label).

    A file that repeats a record can put its copies on both sides of a split, and a training
    text's case copy can be a validation or test text. Example: [("hi", "a"), ("yo", "b")],
    [("hi", "a"), ("hey", "a")] -> 1.
    """
    seen = {text for text, _ in train}
    return sum(text in seen for text, _ in split)


def note_repeats(trained, in_records, log):
    """Say how many val and test texts were trained on word for word: `trained` counts them
    among all the training texts, case copies included, `in_records` among the file's records."""
    if not (trained["val"] or trained["test"]):
        return
    copies = sum(trained.values()) - sum(in_records.values())
    log(f"note: {trained['test']} test and {trained['val']} val text(s) also occur word for word"
        " among the training texts" + (f" ({copies} only as the upper- or lower-case copy of a"
                                       " training text)" if copies else "")
        + "; a text trained on flatters the accuracy measured on it (--dedupe drops repeated"
        " records" + ("; --no-case-copies the copies)" if copies else ")"))


def note_case_variants(labels, log):
    """Say which classes differ only in case, spacing or invisible characters: each is trained
    as a class of its own."""
    groups = case_variants(labels)
    if groups:
        shown = "; ".join(", ".join(shown_label(label) for label in group) for group in groups)
        log(f"note: {len(groups)} group(s) of classes differ only in case, spacing or invisible"
            f" characters ({shown}):"
            " each is a class of its own; if they are one class, write its label alike on every"
            " row")


def report_counts(counts, block_size, max_windows, log):
    """Say how many texts were windowed or cut, and how many characters fell back."""
    if counts["windowed"]:
        log(f"note: {counts['windowed']} text(s) longer than the context ({block_size} tokens)"
            " were read as overlapping windows")
    if counts["cut"]:
        log(f"note: {counts['cut']} text(s) longer than {max_windows} windows were cut"
            " (--max-windows)")
    if counts["fallback_characters"]:
        log(f"note: {counts['fallback_characters']} character(s) unknown to the tokenizer were"
            f" mapped to {UNK_TOKEN}")


def format_accuracies(accs):
    """{"train": 0.9, "val": 0.8} -> "train 90.0%, val 80.0%"."""
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())


def format_confusion(matrix, labels, most_label_chars=20):
    """The confusion matrix as aligned text, rows = true class, columns = predicted; a class
    name is cut to `most_label_chars`, so that long ones do not make every column as wide."""
    width = max(6, min(most_label_chars, max(len(label) for label in labels)) + 1)
    lines = [" " * width + "".join(f"{label[:width - 1]:>{width}}" for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"{label[:width - 1]:<{width}}" + "".join(f"{int(n):>{width}}" for n in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- classify (use)


class Classifier(NamedTuple):
    """A fine-tuned classifier, as `load_classifier` reads it from its run directory."""
    params: dict
    config: ClassifierConfig
    tokenizer: object
    labels: list  # class names in id order
    max_windows: int  # the --max-windows it was trained with


def load_classifier(checkpoint):
    """The `Classifier` of a fine-tuned run directory; its max_windows is the --max-windows it
    was trained with (the default for runs made before the flag)."""
    ckpt = load_checkpoint(checkpoint, kind="classifier")
    labels = ckpt.meta.get("labels")
    if not isinstance(labels, list) or len(labels) != ckpt.model_config.n_classes:
        raise TinyLLMError(f"{checkpoint}/config.json: its \"labels\" do not match the model")
    max_windows = (ckpt.meta.get("finetune") or {}).get("max_windows")
    if not (isinstance(max_windows, int) and max_windows > 0):
        max_windows = ClassifySettings.max_windows
    return Classifier(ckpt.params, ckpt.model_config, ckpt.tokenizer, labels, max_windows)


def load_classifiers(checkpoints):
    """[Classifier] of one or more run directories. Runs whose class probabilities are averaged
    must have the same classes in the same order; their tokenizers and sizes may differ."""
    members = [load_classifier(c) for c in checkpoints]
    for checkpoint, member in zip(checkpoints[1:], members[1:]):
        if member.labels != members[0].labels:
            raise TinyLLMError(f"{checkpoint}: its classes ({shown_labels(member.labels)}) are not"
                               f" those of {checkpoints[0]} ({shown_labels(members[0].labels)}) in"
                               " the same order, so their probabilities cannot be averaged")
    return members


def classify_texts(params, config, tokenizer, texts, max_windows=ClassifySettings.max_windows,
                   log=print, on_batch=None):
    """Class probabilities (N, K) for texts; longer ones are read as windows, as in training.
    `log` is told of characters read as the unknown token and of texts cut after max_windows;
    on_batch(texts done), if given, as the texts are read (`predict_windows`)."""
    if any(not text.strip() for text in texts):  # as a data file's empty text is refused
        raise TinyLLMError("cannot classify an empty text (or one of spaces only)")
    seqs, fallback = encode_all(tokenizer, texts)
    windows, _, cut = make_windows(seqs, config.block_size, max_windows)
    if fallback:
        log(f"note: {fallback} character(s) the model never saw were read as {UNK_TOKEN}")
    if cut:
        log(f"note: {cut} text(s) longer than {max_windows} windows of {config.block_size} tokens"
            " (the run's --max-windows) were read up to there only")
    return predict_windows(params, windows, config, on_batch=on_batch)


def averaged_probs(members, texts, log=print, progress=None):
    """Class probabilities (N, K) of texts: the mean of the members' (`classify_texts`); a note
    that several members make (the same characters unknown to each) goes to `log` once.
    `progress` (a progress.Counting of N x members), if given, is told the texts read so far."""
    notes, total = [], 0.0
    for i, m in enumerate(members):
        counted = None if progress is None else (
            lambda done, before=i * len(texts): progress.update(before + done))
        total = total + classify_texts(m.params, m.config, m.tokenizer, texts, m.max_windows,
                                       notes.append, on_batch=counted)
    for note in dict.fromkeys(notes):
        log(note)
    return total / len(members)


def label_texts(members, texts, log=print, stream=None):
    """`tinyllm classify --lines FILE`: (label, probability) of each text, the class of highest
    mean probability over the members and that probability, with a count of the texts labelled
    so far on `stream` (default stderr); notes go to `log` once. Example: one spam classifier
    and ["Win a prize now"] -> [("spam", 0.97)]."""
    progress = Counting(len(texts) * len(members), "texts labelled", stream)
    probs = averaged_probs(members, texts, log, progress)
    progress.close()
    return [(members[0].labels[k], float(probs[n, k]))
            for n, k in enumerate(probs.argmax(axis=1))]


def score_examples(members, examples, where, stream=None):
    """Accuracy, confusion matrix and counts of (text, label) examples, each predicted as the
    class of highest mean probability over the members (one run: its own prediction). The
    counts ("windowed", "cut", "fallback_characters") are the most of any one member, whose
    tokenizer and context may differ from the others'. How many texts are scored so far goes to
    `stream` (default stderr)."""
    labels = members[0].labels
    progress = Counting(len(examples) * len(members), "texts scored", stream)
    total, counts = 0.0, {}
    for i, m in enumerate(members):
        windows, y, n = encode_classification(m.tokenizer, examples, labels, m.config.block_size,
                                              m.max_windows, where)
        done_before = i * len(examples)
        total = total + predict_windows(
            m.params, windows, m.config,
            on_batch=lambda done, before=done_before: progress.update(before + done))
        counts = {k: max(counts.get(k, 0), n[k]) for k in n}
    progress.close()
    pred = total.argmax(axis=1)
    return {"examples": len(y), "accuracy": float((pred == y).mean()),
            "confusion_matrix": confusion_matrix(y, pred, len(labels)), **counts}


def score_file(members, data, text_column, label_column, stream=None, log=print):
    """`tinyllm classify --data FILE`: `score_examples` on a labelled file; a note on the
    file's header goes to `log`."""
    examples = read_classification(data, text_column, label_column, set(members[0].labels), log)
    return score_examples(members, examples, data, stream)


def run_split(checkpoint, which, log=print):
    """(records, where): the (text, label) records of the validation or test split (`which`) a
    fine-tuned classifier was trained with, made again from its data as `finetune classify` made
    them (its settings: files, columns, --split-seed, --dedupe, --balance). A file the run names
    is hashed (if it is a regular file) and parsed only if its sha256 is the run's (config.json
    "data_files_sha256"), so a run directory cannot make this show another file's text."""
    meta = read_meta(checkpoint)
    s = run_settings(meta, ClassifySettings, "--split")
    for name in DATA_FLAGS:
        path = getattr(s, name)
        if path and not os.path.isfile(path):  # never opened: a FIFO would block a read
            what = ("is not a regular file" if os.path.exists(path)
                    else "is gone (moved or renamed?)")
            raise TinyLLMError(f"--split: the --{name.replace('_', '-')} file {path!r} that the run"
                               f" in {checkpoint} was fine-tuned on {what}")
    if meta.get("data_files_sha256", {}) != data_fingerprints(s):
        raise TinyLLMError(f"--split: the data file(s) of the run in {checkpoint} changed since it"
                           f" was fine-tuned ({s.data}), so its split cannot be made again")
    splits = load_classification_splits(s, log)
    file = s.test_data if which == "test" else s.val_data
    where = f"{file or s.data or 'the embedded data'} ({which})"
    return getattr(splits, which), where


def score_run_split(checkpoints, members, which, stream=None, log=print):
    """`tinyllm classify --split val|test`: `score_examples` on the runs' own split, which must
    be the same records for every run (fine-tuned on the same data with the same --split-seed)."""
    records, where = run_split(checkpoints[0], which, log)
    for checkpoint in checkpoints[1:]:
        if run_split(checkpoint, which, lambda note: None)[0] != records:
            raise TinyLLMError(f"--split {which}: the run in {checkpoint} was fine-tuned on another"
                               f" {which} split than the run in {checkpoints[0]}; runs scored"
                               " together need the same data and --split-seed")
    return {**score_examples(members, records, where, stream), "where": where}
