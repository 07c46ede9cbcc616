"""CLI tests for `tinyllm finetune classify|instruct`, `tinyllm classify` and
`tinyllm generate --instruction`: end to end on a tiny model, run files, resume, errors."""

import json
import os
import types

import numpy as onp
import pytest
from click.testing import CliRunner

from tinyllm import classify_run
from tinyllm.checkpoint import checkpoint_paths, load_checkpoint
from tinyllm.cli import main
from tinyllm.config import GPTConfig
from tinyllm.finetune import confusion_matrix
from tinyllm.classify_run import format_confusion

TINY = GPTConfig(block_size=48, n_layer=1, n_head=2, n_embd=16, bias=False)
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :\n"
FAST = ["--max-iters", "4", "--eval-interval", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, save_char_base):
    """A tiny 'pretrained' checkpoint (random weights, a char tokenizer with <|endoftext|>)."""
    return save_char_base(str(tmp_path_factory.mktemp("base")), ALPHABET, TINY)


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.tsv"
    rows = ["label\ttext"]
    for i in range(30):
        rows.append(f"pos\tgood film number {i}")
        rows.append(f"neg\tbad film number {i} é")  # 'é' is not in the tokenizer: fallback
    rows.append("pos\t" + "very good " * 10)  # longer than the context: read as windows
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def run(args):
    result = CliRunner().invoke(main, args)
    return result


def test_classify_end_to_end(base, tsv, tmp_path):
    out = str(tmp_path / "run")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", out] + FAST)
    assert result.exit_code == 0, result.output
    assert "overlapping windows" in result.output and "<|unk|>" in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["format"] == "tinyllm-finetune-metrics" and report["version"] == 2
    assert report["labels"] == ["neg", "pos"]
    assert set(report["accuracy_before"]) == set(report["accuracy_after"]) == {"train", "val", "test"}
    assert onp.sum(report["test_confusion_matrix"]) == report["examples"]["test"] == 12
    assert report["windowed_texts"] == 1 and report["cut_texts"] == 0
    assert report["fallback_characters"] == 30
    assert set(report["test_per_class"]["pos"]) == {"precision", "recall", "support"}
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 3  # iters 0, 2, 4
    ckpt = load_checkpoint(out, kind="classifier")
    assert ckpt.meta["labels"] == ["neg", "pos"] and ckpt.params["cls_head"]["w"].shape == (16, 2)
    assert ckpt.tokenizer.vocab_size == load_checkpoint(base).tokenizer.vocab_size + 1  # <|unk|>

    one = run(["classify", "--checkpoint", out, "good film é"])
    assert one.exit_code == 0 and one.stdout.split("\n")[0] in ("neg", "pos")
    probs = [float(line.split(": ")[1]) for line in one.stdout.strip().split("\n")[1:]]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=2e-3)
    assert one.stderr == "note: 1 character(s) the model never saw were read as <|unk|>\n"
    whole = run(["classify", "--checkpoint", out, "--data", tsv])
    assert whole.exit_code == 0 and "accuracy" in whole.output
    assert "61 examples (1 windowed, 30 character(s) read as <|unk|>)" in whole.stdout
    assert "texts scored: 61/61" in whole.stderr  # progress, on stderr
    # a header of other names, columns by position: "category" is not a class the model knows
    named = tmp_path / "named.csv"
    named.write_text("category,comment\npos,good film\nneg,bad film\n", encoding="utf-8")
    scored = run(["classify", "--checkpoint", out, "--data", str(named), "--text-column", "1",
                  "--label-column", "0"])
    assert scored.exit_code == 0 and "2 examples" in scored.stdout, scored.output
    assert f"note: {named}:1: read as the header, not a record" in scored.stderr

    resumed = run(["finetune", "classify", "--out", out, "--resume", "--max-iters", "6",
                   "--freeze", "all"])
    assert resumed.exit_code == 0, resumed.output
    assert "--resume continues the run with the settings it began with; not used: --freeze" in \
        resumed.stderr
    assert load_checkpoint(out, kind="classifier").iter == 6
    below = run(["finetune", "classify", "--out", out, "--resume", "--max-iters", "5"])
    assert below.exit_code == 1 and "--max-iters 5 is below the 6 steps" in below.output


def test_a_label_first_file_without_extension_trains_and_scores_label_first(base, tmp_path):
    # the layout of the public SMS spam collection: "ham<TAB>text", no header, no extension
    data = tmp_path / "SMSSpamCollection"
    data.write_text("".join(f"{'spam' if i % 3 else 'ham'}\tmessage number {i}\n"
                            for i in range(40)), encoding="utf-8")
    out = str(tmp_path / "run")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(data), "--out", out]
                 + FAST)
    assert result.exit_code == 0, result.output
    assert f"note: {data}: no .csv, .tsv, .jsonl or .json extension: read as TSV" in result.output
    assert f"note: {data}: column 0 holds 2 distinct values in 40 rows" in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["labels"] == ["ham", "spam"]
    assert report["examples"] == {"train": 28, "val": 4, "test": 8}
    scored = run(["classify", "--checkpoint", out, "--data", str(data)])
    assert scored.exit_code == 0 and "40 examples" in scored.stdout, scored.output


def test_a_batch_larger_than_the_training_split_is_noted(base, tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(10)),
                    encoding="utf-8")
    noted = "note: --batch-size 64 is more than the 21 training texts: each batch draws texts"
    for size, note in ((64, True), (21, False)):
        result = run(["finetune", "classify", "--checkpoint", base, "--data", str(data), "--out",
                      str(tmp_path / f"run-{size}"), "--max-iters", "2", "--batch-size", str(size)])
        assert result.exit_code == 0, result.output
        assert (noted.replace("64", str(size)) in result.output) == note  # 7 records, 14 copies
    records = tmp_path / "small.jsonl"
    records.write_text("".join(json.dumps({"instruction": "say", "input": str(i), "output": "ok"})
                               + "\n" for i in range(20)), encoding="utf-8")
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", str(records), "--out",
                  str(tmp_path / "inst"), "--max-iters", "2", "--batch-size", "64"])
    assert result.exit_code == 0 and "--batch-size 64 is more than the 17 training texts" in \
        result.output, result.output


def test_texts_repeated_across_splits_are_counted(base, tsv, tmp_path):
    # the val file repeats one training text and the test file three: one with another label,
    # and one in other case, which is the upper-case copy of a training text, trained on as
    # it is; without case copies it is not a training text
    val = tmp_path / "val.tsv"
    val.write_text("label\ttext\npos\tgood film number 3\nneg\tnew text\n", encoding="utf-8")
    test = tmp_path / "test.tsv"
    test.write_text("label\ttext\npos\tgood film number 4\npos\tbad film number 5 é\n"
                    "neg\tGOOD FILM NUMBER 6\nneg\tsomething else\n", encoding="utf-8")
    out = str(tmp_path / "run")
    args = ["finetune", "classify", "--checkpoint", base, "--data", tsv, "--val-data", str(val),
            "--test-data", str(test), "--out", out] + FAST
    result = run(args)
    assert result.exit_code == 0, result.output
    assert ("note: 3 test and 1 val text(s) also occur word for word among the training texts"
            " (1 only as the upper- or lower-case copy of a training text)") in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["texts_also_in_train"] == {"val": 1, "test": 3}
    result = run(args + ["--force", "--no-case-copies"])
    assert result.exit_code == 0, result.output
    assert "note: 2 test and 1 val text(s) also occur word for word among the training texts;" \
        in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["texts_also_in_train"] == {"val": 1, "test": 2}


def test_dedupe_drops_repeats_before_the_split_and_across_given_files(base, tsv, tmp_path):
    # --data with each of 61 texts twice, the copy with the other label: 61 dropped, none
    # straddles the split
    doubled = tmp_path / "doubled.tsv"
    rows = open(tsv, encoding="utf-8").read().splitlines()
    flipped = [("neg" if r.startswith("pos") else "pos") + r[3:] for r in rows[1:]]
    doubled.write_text("\n".join(rows + flipped) + "\n", encoding="utf-8")
    out = str(tmp_path / "run")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(doubled), "--out",
                  out, "--dedupe"] + FAST)
    assert result.exit_code == 0, result.output
    assert "--dedupe: dropped 61 record(s)" in result.output and "also occur" not in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["repeats_dropped"] == 61
    assert sum(report["examples"].values()) == 61
    assert report["texts_also_in_train"] == {"val": 0, "test": 0}
    # given files: a val text in training goes, a test text in training or val goes
    val, test = tmp_path / "val.tsv", tmp_path / "test.tsv"
    val.write_text("label\ttext\npos\tgood film number 3\nneg\tnew text\n", encoding="utf-8")
    test.write_text("label\ttext\nneg\tnew text\npos\tgood film number 4\nneg\tother\n",
                    encoding="utf-8")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--val-data",
                  str(val), "--test-data", str(test), "--out", out, "--force", "--dedupe"] + FAST)
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["repeats_dropped"] == 3
    assert (report["examples"]["val"], report["examples"]["test"]) == (1, 1)


def test_val_and_test_files_with_a_header_of_other_names_lose_no_record(tmp_path):
    """Read by position, a --val-data or --test-data file's header row is the row whose label
    is no class of the training file; no record of a file without one is dropped."""
    from tinyllm.classify_run import ClassifySettings, load_classification_splits

    files = {"train.csv": "category,comment\n" + "".join(f"{'ab'[i % 2]},text {i}\n"
                                                          for i in range(10)),
             "val.csv": "category,comment\na,v1\nb,v2\n", "test.csv": "b,t1\na,t2\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    notes = []
    splits = load_classification_splits(ClassifySettings(
        data=str(tmp_path / "train.csv"), val_data=str(tmp_path / "val.csv"),
        test_data=str(tmp_path / "test.csv"), text_column="1", label_column="0"), notes.append)
    assert [len(part) for part in splits[:3]] == [10, 2, 2]
    assert splits.val == [("v1", "a"), ("v2", "b")] and splits.test == [("t1", "b"), ("t2", "a")]
    assert [note.split(": read as")[0] for note in notes] == [
        f"note: {tmp_path / name}:1" for name in ("train.csv", "val.csv")]


def test_balance_counts_the_records_it_drops(base, tmp_path):
    data = tmp_path / "skewed.tsv"
    data.write_text("label\ttext\n" + "".join(f"pos\tgood {i}\n" for i in range(30))
                    + "".join(f"neg\tbad {i}\n" for i in range(20)), encoding="utf-8")
    out = tmp_path / "run"
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(data), "--out",
                  str(out), "--balance"] + FAST)
    assert result.exit_code == 0, result.output
    assert "--balance: dropped 10 record(s) of the larger classes" in result.output
    report = json.load(open(out / "metrics.json"))
    assert report["balance_dropped"] == 10 and sum(report["examples"].values()) == 40


def finetuned(base, data, out, *flags):
    result = run(["finetune", "classify", "--checkpoint", base, "--data", data, "--out", str(out),
                  *flags] + FAST)
    assert result.exit_code == 0, result.output
    return str(out)


def shown_probs(output):
    """{label: probability} from the lines `  label: p` that `tinyllm classify TEXT` prints."""
    return {line.split(": ")[0].strip(): float(line.split(": ")[1])
            for line in output.strip().split("\n")[1:]}


def test_classify_lines_labels_each_line_as_classify_text_does(base, tsv, tmp_path):
    runs = [finetuned(base, tsv, tmp_path / f"run-{seed}", "--seed", str(seed)) for seed in (1, 2)]
    texts = ["good film number 3", "bad\tfilm é", "very good " * 10]  # a tab, an unknown, windows
    lines = tmp_path / "new.txt"
    lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
    for checkpoints in (runs[:1], runs):
        flags = [arg for run_dir in checkpoints for arg in ("--checkpoint", run_dir)]
        result = run(["classify", *flags, "--lines", str(lines)])
        assert result.exit_code == 0, result.output
        rows = result.stdout.split("\n")
        assert rows[0] == "label\tprobability\ttext" and rows[4:] == [""]
        assert "texts labelled: " in result.stderr
        assert "note: 2 character(s) the model never saw were read as <|unk|>" in result.stderr
        for text, row in zip(texts, rows[1:4]):
            label, p, shown = row.split("\t", 2)
            alone = run(["classify", *flags, text])  # the same text given as TEXT
            assert shown == text and label == alone.stdout.split("\n")[0]
            assert float(p) == pytest.approx(shown_probs(alone.stdout)[label], abs=1.5e-3)
    # an escape sequence in the file reaches the terminal as letters
    lines.write_text("good \x1b[2J film\n", encoding="utf-8")
    shown = run(["classify", "--checkpoint", runs[0], "--lines", str(lines)])
    assert shown.exit_code == 0 and shown.stdout.split("\n")[1].endswith("\tgood \\x1b[2J film")
    lines.write_text("one\n\nthree\n", encoding="utf-8")
    empty = run(["classify", "--checkpoint", runs[0], "--lines", str(lines)])
    assert empty.exit_code == 1 and f"{lines}:2: empty line (classify --lines reads one text" \
        " per line)" in empty.output
    refused = run(["classify", "--checkpoint", runs[0], "--lines", str(lines), "--label-column",
                   "1"])
    assert refused.exit_code == 1 and "--lines has none" in refused.output


def test_split_seed_gives_runs_one_split_and_classify_averages_them(base, tsv, tmp_path):
    runs = [finetuned(base, tsv, tmp_path / f"run-{seed}", "--seed", str(seed), "--split-seed",
                      "7") for seed in (1, 2)]
    seven = finetuned(base, tsv, tmp_path / "seven", "--seed", "7")
    one = finetuned(base, tsv, tmp_path / "one", "--seed", "1")
    quiet = lambda note: None  # noqa: E731
    tests = [classify_run.run_split(r, "test", quiet)[0] for r in (*runs, seven, one)]
    assert tests[0] == tests[1] == tests[2] != tests[3]  # --split-seed 7 is --seed 7's split
    assert len(tests[0]) == json.load(open(os.path.join(runs[0], "metrics.json")))[
        "examples"]["test"]
    members = classify_run.load_classifiers(runs)
    texts = [text for text, _ in tests[0]]
    each = [classify_run.classify_texts(m.params, m.config, m.tokenizer, texts, log=quiet)
            for m in members]
    assert not onp.allclose(each[0], each[1], atol=1e-3)  # different heads: the mean is news

    # --split test remakes each run's own test split: its scores are the run's report
    for r in runs:
        report = json.load(open(os.path.join(r, "metrics.json")))
        scored = run(["classify", "--checkpoint", r, "--split", "test"])
        assert scored.exit_code == 0, scored.output
        assert f"{len(texts)} examples of {tsv} (test)" in scored.stdout
        assert f"accuracy {100 * report['accuracy_after']['test']:.1f}%" in scored.stdout
        assert format_confusion(report["test_confusion_matrix"], report["labels"]) in scored.stdout
        for label, stats in report["test_per_class"].items():
            assert (f"  {label}: precision {100 * stats['precision']:.1f}%, recall"
                    f" {100 * stats['recall']:.1f}% ({stats['support']} examples)") in scored.stdout
    # two runs: each text gets the mean of their probabilities
    mean = (each[0] + each[1]) / 2
    pred, y = mean.argmax(axis=1), [members[0].labels.index(label) for _, label in tests[0]]
    both = run(["classify", "--checkpoint", runs[0], "--checkpoint", runs[1], "--split", "test"])
    assert both.exit_code == 0, both.output
    assert f"accuracy {100 * onp.mean(pred == y):.1f}%, the mean of 2 runs" in both.stdout
    assert format_confusion(confusion_matrix(y, pred, 2), members[0].labels) in both.stdout
    text = run(["classify", "--checkpoint", runs[0], "--checkpoint", runs[1], texts[0]])
    alone = [shown_probs(run(["classify", "--checkpoint", r, texts[0]]).stdout) for r in runs]
    assert text.exit_code == 0
    for label, p in shown_probs(text.stdout).items():
        assert p == pytest.approx((alone[0][label] + alone[1][label]) / 2, abs=1.5e-3)
        assert p == pytest.approx(mean[0, members[0].labels.index(label)], abs=1e-3)

    # runs of another split, or other classes, are not averaged; a TEXT is not a split
    mixed = run(["classify", "--checkpoint", runs[0], "--checkpoint", one, "--split", "test"])
    assert mixed.exit_code == 1
    assert f"the run in {one} was fine-tuned on another test split" in mixed.output
    other = tmp_path / "other.tsv"
    other.write_text("label\ttext\n" + "".join(f"{'ab'[i % 2]}\tword {i}\n" for i in range(30)),
                     encoding="utf-8")
    ab = finetuned(base, str(other), tmp_path / "ab")
    classes = run(["classify", "--checkpoint", runs[0], "--checkpoint", ab, "good film"])
    assert classes.exit_code == 1 and f"{ab}: its classes ('a', 'b') are not those of" in \
        classes.output
    both_ways = run(["classify", "--checkpoint", runs[0], "--split", "test", "good film"])
    assert both_ways.exit_code == 1 and "give one of a TEXT argument" in both_ways.output


def test_split_reads_the_runs_data_only_if_its_sha256_matches(base, tsv, tmp_path):
    data = tmp_path / "reviews.tsv"
    data.write_bytes(open(tsv, "rb").read())
    out = finetuned(base, str(data), tmp_path / "run")
    secret = tmp_path / "secret.tsv"
    secret.write_text("label\ttext\npos\tthe secret words\nneg\tmore secret words\n" * 9,
                      encoding="utf-8")
    config = os.path.join(out, "config.json")
    meta = json.load(open(config))
    meta["finetune"]["data"] = str(secret)  # a run directory that names another file
    json.dump(meta, open(config, "w"))
    named = run(["classify", "--checkpoint", out, "--split", "test"])
    assert named.exit_code == 1 and "changed since it was fine-tuned" in named.output
    assert "secret words" not in named.output
    data.write_text("label\ttext\npos\tgood\nneg\tbad\n" * 9, encoding="utf-8")
    meta["finetune"]["data"] = str(data)
    json.dump(meta, open(config, "w"))
    changed = run(["classify", "--checkpoint", out, "--split", "val"])
    assert changed.exit_code == 1 and "changed since it was fine-tuned" in changed.output
    data.unlink()
    gone = run(["classify", "--checkpoint", out, "--split", "val"])
    assert gone.exit_code == 1 and "is gone (moved or renamed?)" in gone.output
    os.mkfifo(data)  # a FIFO in its place is not read (reading one blocks until a writer comes)
    fifo = run(["classify", "--checkpoint", out, "--split", "val"])
    assert fifo.exit_code == 1 and "was fine-tuned on is not a regular file" in fifo.output


def test_split_seed_with_given_val_and_test_files_is_refused(base, tsv, tmp_path):
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--val-data", tsv,
                  "--test-data", tsv, "--split-seed", "3", "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "with --val-data and --test-data there is none" in \
        result.output


def test_resume_reads_a_moved_data_file_from_where_data_says(base, tsv, tmp_path):
    data = tmp_path / "reviews.tsv"
    data.write_bytes(open(tsv, "rb").read())
    out = str(tmp_path / "run")
    assert run(["finetune", "classify", "--checkpoint", base, "--data", str(data), "--out", out]
               + FAST).exit_code == 0
    moved = tmp_path / "elsewhere.tsv"
    data.rename(moved)
    gone = run(["finetune", "classify", "--out", out, "--resume", "--max-iters", "6"])
    assert gone.exit_code == 1
    assert "is gone (moved or renamed?): give it again with --resume --data FILE" in gone.output
    other = tmp_path / "other.tsv"
    other.write_text("label\ttext\npos\tsomething else\n", encoding="utf-8")
    changed = run(["finetune", "classify", "--out", out, "--resume", "--max-iters", "6",
                   "--data", str(other)])
    assert changed.exit_code == 1 and "changed since it began" in changed.output
    found = run(["finetune", "classify", "--out", out, "--resume", "--max-iters", "6",
                 "--data", str(moved)])
    assert found.exit_code == 0, found.output
    assert "not used" not in found.stderr
    assert load_checkpoint(out, kind="classifier").meta["finetune"]["data"] == str(moved)


def test_an_unknown_label_is_named_with_the_file_it_is_in(base, tsv, tmp_path):
    val, test = tmp_path / "val.tsv", tmp_path / "test.tsv"
    val.write_text("label\ttext\nmaybe\tsome text\n", encoding="utf-8")
    test.write_text("label\ttext\npos\tfine\n", encoding="utf-8")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--val-data",
                  str(val), "--test-data", str(test), "--out", str(tmp_path / "run")] + FAST)
    assert result.exit_code == 1 and f"{val} (val): label 'maybe' is not one" in result.output


def test_labels_that_differ_only_in_case_are_named(base, tsv, tmp_path):
    # a hand-typed label column: "Pos" on a few rows, "pos" on the rest; each is its own class,
    # and the run says so; a test file's "POS" is not a class, and the error names the one it
    # is like
    data = tmp_path / "mixed.tsv"
    rows = open(tsv, encoding="utf-8").read().splitlines()
    data.write_text("\n".join(rows[:-6] + ["Pos" + r[3:] for r in rows[-6:]]) + "\n",
                    encoding="utf-8")
    out = str(tmp_path / "run")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(data), "--out",
                  out] + FAST)
    assert result.exit_code == 0, result.output
    assert ("note: 1 group(s) of classes differ only in case, spacing or invisible characters"
            " ('Pos', 'pos'): each is a class of its own") in result.output
    scored = tmp_path / "scored.tsv"
    scored.write_text("label\ttext\nPOS\tgood film\n", encoding="utf-8")
    result = run(["classify", "--checkpoint", out, "--data", str(scored)])
    assert result.exit_code == 1 and result.output.strip().endswith(
        "label 'POS' is not one the model was trained on ('Pos', 'neg', 'pos'); it differs only"
        " in case from 'Pos'")


def test_classify_head_only_keeps_the_body(base, tsv, tmp_path):
    out = str(tmp_path / "run")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", out,
                  "--freeze", "all"] + FAST)
    assert result.exit_code == 0, result.output
    before, after = load_checkpoint(base).params, load_checkpoint(out, kind="classifier").params
    assert onp.array_equal(before["h"][0]["mlp"]["c_fc"]["w"], after["h"][0]["mlp"]["c_fc"]["w"])


def test_encoder_arch_and_lora(base, tsv, tmp_path):
    out = str(tmp_path / "enc")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", out,
                  "--arch", "encoder", "--lora-rank", "2"] + FAST)
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert (report["arch"], report["pooling"], report["lora_rank"]) == ("encoder", "meanmax", 2)
    after = load_checkpoint(out, kind="classifier").params
    assert onp.array_equal(after["wte"][:-1], load_checkpoint(base).params["wte"])  # frozen
    assert run(["classify", "--checkpoint", out, "bad film"]).exit_code == 0


@pytest.mark.parametrize("content,message", [
    ("label\ttext\npos\ta\npos\tb\npos\tc\n", "reviews.tsv has a single class"),
    ("label\ttext\npos\ta\n\t b\n", "reviews.tsv:3: empty label"),
    ("label\ttext\npos\ta\n\t b\nneg\tc\nneg\t\n", "reviews.tsv:3: empty label (and 1 more bad"
     " record: "),  # every bad record, in one line
])
def test_classify_bad_data_is_one_line(base, tmp_path, content, message):
    path = tmp_path / "reviews.tsv"
    path.write_text(content, encoding="utf-8")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(path), "--out",
                  str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().split("\n")) == 1
    if "more bad" in message:
        assert result.output.rstrip().endswith("reviews.tsv:5: empty text)")


@pytest.mark.parametrize("value,message", [
    ('"sp\\ud800"', "holds a lone surrogate"),  # crashed saving config.json, half a run written
    ("1" * 5000, "is a number of 5,000 digits"),  # a ValueError traceback
    ("NaN", "is NaN, which is not a JSON number"),
])
def test_a_label_that_is_no_text_is_refused_before_the_run_directory_is_made(base, tmp_path,
                                                                              value, message):
    path = tmp_path / "d.jsonl"
    rows = [f'{{"text": "film {i}", "label": "{"ab"[i % 2]}"}}' for i in range(20)]
    path.write_text("\n".join(rows + ['{"text": "x", "label": %s}' % value]) + "\n")
    out = tmp_path / "r"
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(path), "--out",
                  str(out)] + FAST)
    assert result.exit_code == 1 and f"d.jsonl:21: 'label' {message}" in result.output
    assert len(result.output.strip().split("\n")) == 1 and not out.exists()


@pytest.mark.parametrize("empty", ["data", "val-data", "test-data", "classify"])
def test_an_empty_data_file_is_named_as_such(base, tsv, tmp_path, empty):
    # an empty --val-data was blamed on --data as too few to split; `classify --data` crashed
    (tmp_path / "e.json").write_text("[]\n")
    files = {"data": tsv, "val-data": tsv, "test-data": tsv, empty: str(tmp_path / "e.json")}
    if empty == "classify":
        out = finetuned(base, tsv, str(tmp_path / "r"))
        result = run(["classify", "--checkpoint", out, "--data", files["classify"]])
    else:
        result = run(["finetune", "classify", "--checkpoint", base, "--out", str(tmp_path / "r")]
                     + [arg for flag in ("data", "val-data", "test-data")
                        for arg in (f"--{flag}", files[flag])] + FAST)
    assert result.exit_code == 1 and result.output.strip().endswith("e.json: no records")
    assert "Traceback" not in result.output and len(result.output.strip().split("\n")) == 1


def test_not_a_pretrained_checkpoint(tmp_path, tsv):
    (tmp_path / "empty").mkdir()
    result = run(["finetune", "classify", "--checkpoint", str(tmp_path / "empty"), "--data", tsv,
                  "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "--checkpoint" in result.output and "not a tinyllm" in result.output


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    rng = onp.random.default_rng(0)
    lines = []
    for i in range(40):
        word = "".join(rng.choice(list("abcdef"), 3))
        lines.append(json.dumps({"instruction": "reverse", "input": word, "output": word[::-1]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_instruct_tests_on_the_split_of_split_seed(base, instructions, tmp_path):
    tested = {}
    for seed, split_seed in ((1, 7), (2, 7), (7, None), (1, None)):
        out = tmp_path / f"run-{seed}-{split_seed}"
        result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions,
                      "--out", str(out), "--seed", str(seed)]
                     + (["--split-seed", str(split_seed)] if split_seed is not None else [])
                     + FAST)
        assert result.exit_code == 0, result.output
        tested[seed, split_seed] = [json.loads(line)["input"]
                                    for line in open(out / "responses.jsonl")]
    assert tested[1, 7] == tested[2, 7] == tested[7, None] != tested[1, None]


def test_skip_long_leaves_out_and_counts_records_whose_response_cannot_fit(base, tmp_path):
    # block 48: a response of 60 characters (a char model: 60 tokens) cannot fit
    records = [{"instruction": "say", "input": f"{i}", "output": "ok"} for i in range(40)]
    for i in (3, 17, 25):
        records[i]["output"] = "o" * 60
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = str(tmp_path / "run")
    refused = run(["finetune", "instruct", "--checkpoint", base, "--data", str(data), "--out", out]
                  + FAST)
    assert refused.exit_code == 1 and "its response alone has 60 tokens" in refused.output
    assert refused.output.rstrip().endswith("; --skip-long leaves such records out")
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", str(data), "--out", out,
                  "--skip-long"] + FAST)
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    skipped = report["skipped_long_records"]
    assert sum(skipped.values()) == 3 and sum(report["records"].values()) == 37
    for name, n in skipped.items():
        assert (f"left out {n} {name} record(s)" in result.output) == (n > 0)
    rows = [json.loads(line) for line in open(os.path.join(out, "responses.jsonl"))]
    assert len(rows) == report["records"]["test"] and all(r["reference"] == "ok" for r in rows)
    assert load_checkpoint(out).meta["finetune"]["skip_long"] is True  # kept for --resume
    resumed = run(["finetune", "instruct", "--out", out, "--resume", "--max-iters", "6"])
    assert resumed.exit_code == 0, resumed.output


def test_instruct_end_to_end_and_generate(base, instructions, tmp_path):
    out = str(tmp_path / "inst")
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions, "--out", out]
                 + FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(os.path.join(out, "responses.jsonl"))]
    assert len(rows) == 4 and set(rows[0]) == {"instruction", "input", "reference", "response"}
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["records"] == {"train": 34, "val": 2, "test": 4}
    assert set(report["test_after"]) == {"exact_match", "token_f1"}
    gen = run(["generate", "--checkpoint", out, "--instruction", "reverse", "--input", "abc",
               "--temperature", "0", "--max-new-tokens", "5"])
    assert gen.exit_code == 0 and gen.output.startswith("Instruction: reverse\nInput: abc\nResponse: ")
    unseen = run(["generate", "--checkpoint", out, "--instruction", "reverse", "--input", "aéé",
                  "--max-new-tokens", "2"])  # é is not in the char tokenizer: read as <|unk|>
    assert unseen.exit_code == 0 and unseen.stdout.startswith("Instruction: reverse\nInput: aéé\n")
    assert unseen.stderr == "note: 2 character(s) the model never saw were read as <|unk|>\n"

    lora = str(tmp_path / "lora")
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions, "--out", lora,
                  "--lora-rank", "2"] + FAST)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(lora, kind="gpt-lora").model_config.lora_rank == 2
    assert run(["generate", "--checkpoint", lora, "--instruction", "reverse", "--input", "ab",
                "--max-new-tokens", "3"]).exit_code == 0
    plain = run(["generate", "--checkpoint", lora, "--prompt", "ab", "--max-new-tokens", "3",
                 "--seed", "0"])  # plain sampling from a LoRA run: adapters merged at load
    assert plain.exit_code == 0 and plain.output.startswith("ab"), plain.output


PROMPT = "Instruction: reverse\nInput: abc\nResponse: "  # 42 characters: 6 left of 48


def tokens_of(base, text):
    return load_checkpoint(base).tokenizer.encode(text)


def sampling(monkeypatch, tokens):
    """generate.sample_token draws `tokens` in turn; None in them stands for Ctrl-C."""
    from tinyllm import generate

    queue = list(tokens)

    def next_token(*args):
        token = queue.pop(0)
        if token is None:
            raise KeyboardInterrupt
        return token

    monkeypatch.setattr(generate, "sample_token", next_token)


def test_generate_instruction_streams_the_response_and_ctrl_c_keeps_it(base, monkeypatch):
    """The prompt and then the response are printed as they are made: Ctrl-C after "cb" leaves
    them on stdout with exit code 130 (the whole text was printed at the end, so an interrupt
    lost all of it)."""
    sampling(monkeypatch, tokens_of(base, "cb") + [None])
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", "abc"])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert result.stdout == PROMPT + "cb"


def test_generate_instruction_prints_what_it_printed_before(base, monkeypatch):
    """The same output as before the streaming: prompt, response up to <|endoftext|>, newline."""
    eot = load_checkpoint(base).tokenizer.special_tokens["<|endoftext|>"]
    sampling(monkeypatch, tokens_of(base, "cba") + [eot])
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", "abc",
                  "--max-new-tokens", "6"])  # (so that the whole prompt is read)
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + "cba\n" and result.stderr == ""


def test_generate_instruction_says_when_the_context_cut_the_response(base, monkeypatch):
    """The prompt (42 tokens) stays in view: the response can have only what the context (48)
    has left. A response cut there, before <|endoftext|>, is said on stderr, not left to look
    finished; one cut by --max-new-tokens is as asked."""
    sampling(monkeypatch, tokens_of(base, "c" * 20))
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", "abc"])
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPT + "c" * 12 + "\n"  # 36 prompt tokens read: see the next test
    assert result.stderr.endswith("note: the response filled the model's context (48 tokens)"
                                  " after 12 tokens, before <|endoftext|>: it is cut there\n")
    sampling(monkeypatch, tokens_of(base, "c" * 20))
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", "abc",
                  "--max-new-tokens", "6"])
    assert result.stdout == PROMPT + "c" * 6 + "\n" and result.stderr == ""


def test_generate_instruction_reads_the_end_of_a_prompt_too_long_for_the_context(base,
                                                                                monkeypatch):
    """A prompt that leaves less than a quarter of the context (12 of 48 tokens) for the
    response keeps its last 36 tokens, as fine-tuning keeps the end of a long prompt, and says
    so; the whole prompt is still printed. Such a prompt was refused when it filled the context,
    and left a response of a token or two when it nearly did."""
    from tinyllm import generate

    seen = {}

    def complete_ids(params, config, tokenizer, ids, max_new_tokens, *args, on_text, **kwargs):
        seen.update(ids=list(ids), max_new_tokens=max_new_tokens)
        on_text("cba")
        return "cba", tokens_of(base, "cba")

    monkeypatch.setattr(generate, "complete_ids", complete_ids)
    text = "abc" * 20  # 60 tokens: the prompt has 99
    long_prompt = f"Instruction: reverse\nInput: {text}\nResponse: "
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", text])
    assert result.exit_code == 0, result.output
    assert seen == {"ids": tokens_of(base, long_prompt)[-36:], "max_new_tokens": 12}
    assert result.stdout == long_prompt + "cba\n"
    assert result.stderr.startswith("note: the prompt has 99 tokens; the model reads its last 36")
    result = run(["generate", "--checkpoint", base, "--instruction", "reverse", "--input", "abc",
                  "--max-new-tokens", "6"])
    assert seen == {"ids": tokens_of(base, PROMPT), "max_new_tokens": 6}  # 42 + 6: it fits
    assert result.stderr == ""


def test_instruct_counts_val_and_test_prompts_also_in_train(base, instructions, tmp_path):
    # the val file repeats one training prompt; the test file two, one with another response
    records = [json.loads(line) for line in open(instructions, encoding="utf-8")]
    new = {"instruction": "reverse", "input": "zzz", "output": "zzz"}
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in (records[0], new)) + "\n", encoding="utf-8")
    test.write_text("\n".join(json.dumps(r) for r in (
        records[1], {**records[2], "output": "other"}, {**new, "input": "yyy"})) + "\n",
        encoding="utf-8")
    out = str(tmp_path / "run")
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions,
                  "--val-data", str(val), "--test-data", str(test), "--out", out] + FAST)
    assert result.exit_code == 0, result.output
    assert ("note: 2 test and 1 val record(s) have the instruction and input of a training"
            " record, word for word") in result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    assert report["prompts_also_in_train"] == {"val": 1, "test": 2}


def test_instruct_bad_record(base, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"input": "x", "output": "y"}\n')
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", str(path), "--out",
                  str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "t.jsonl:2: record has no 'instruction'" in result.output


def test_a_response_too_long_is_named_by_its_file_and_line(base, instructions, tmp_path):
    # the splits are shuffled: only the line in the file it came from finds the record
    path = tmp_path / "val.json"
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b" * 60}]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")  # the 2nd starts on line 6
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions,
                  "--val-data", str(path), "--test-data", instructions, "--out",
                  str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().split("\n")[-1].startswith(f"Error: {path}:6: its response alone")


def test_a_test_response_too_long_is_refused_before_training(base, instructions, tmp_path):
    # its response could never be written whole: the same error as in training, not a count
    path = tmp_path / "test.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n'
                    + json.dumps({"instruction": "a", "output": "b" * 60}) + "\n")
    out = tmp_path / "r"
    result = run(["finetune", "instruct", "--checkpoint", base, "--data", instructions,
                  "--val-data", instructions, "--test-data", str(path), "--out", str(out)]
                 + FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().split("\n")[-1].startswith(f"Error: {path}:2: its response alone")
    assert "iter 0" not in result.output and not (out / "metrics.json").exists()


def test_too_little_data_is_one_line(base, tmp_path):
    path = tmp_path / "two.tsv"
    path.write_text("label\ttext\na\tx\nb\ty\n", encoding="utf-8")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(path), "--out",
                  str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "too few examples" in result.output


@pytest.mark.parametrize("accum", [1, 2])
def test_an_epoch_is_as_many_examples_as_the_records_read(base, tsv, tmp_path, accum):
    """Not the records and their two case copies (an "epoch" was three passes over the
    records), and over every --grad-accum micro-batch (with 2, one was two passes)."""
    out = str(tmp_path / "ep")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", out,
                  "--epochs", "1", "--batch-size", "4", "--grad-accum", str(accum),
                  "--eval-interval", "100", "--patience", "0"])
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "metrics.json")))
    n_train = report["examples"]["train"]  # 42 records, 84 case copies drawn from as well
    assert report["train_case_copies"] == 2 * n_train
    assert report["iterations"] == -(-n_train // (4 * accum))  # ceil(n / examples a step)


def test_instruct_ctrl_c_then_resume_matches_an_uninterrupted_run(base, instructions, tmp_path,
                                                                   monkeypatch):
    """Ctrl-C mid-run saves the last finished step; --resume then gives the same losses and the
    same final weights as a run that was never interrupted."""
    from tinyllm import train

    args = ["finetune", "instruct", "--checkpoint", base, "--data", instructions,
            "--max-iters", "6", "--eval-interval", "2", "--batch-size", "4"]
    straight = str(tmp_path / "straight")
    assert run(args + ["--out", straight]).exit_code == 0

    interrupted = str(tmp_path / "interrupted")
    real_step, calls = train.adamw_step, []

    def step_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # the 4th step: not on an evaluation boundary
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "adamw_step", step_then_ctrl_c)
    result = run(args + ["--out", interrupted])
    assert result.exit_code == 130 and "--resume" in result.output
    assert load_checkpoint(interrupted, kind="gpt").iter == 3
    monkeypatch.setattr(train, "adamw_step", real_step)
    assert run(["finetune", "instruct", "--out", interrupted, "--resume"]).exit_code == 0

    def losses(out):
        return [(r["iter"], r["train_loss"], r["val_loss"])
                for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]

    assert losses(interrupted) == losses(straight)
    a, b = (onp.load(checkpoint_paths(d)["model"]) for d in (straight, interrupted))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        onp.testing.assert_array_equal(a[name], b[name])


def test_classify_trains_on_case_copies_of_the_training_texts_only(base, tsv, tmp_path,
                                                                   monkeypatch):
    """Each training text is also trained on in upper and in lower case; validation and test
    texts are not copied, and the counts in metrics.json are of the file's records."""
    import tinyllm.classify_run as runs

    seen, real = {}, runs.encode_classification
    monkeypatch.setattr(runs, "encode_classification", lambda tok, examples, *a, **kw: (
        seen.setdefault(a[-1], [t for t, _ in examples]) and real(tok, examples, *a, **kw)))
    out = tmp_path / "copies"
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", str(out)]
                 + FAST)
    assert result.exit_code == 0, result.output
    train, val, test = (seen[f"{tsv} ({name})"] for name in ("train", "val", "test"))
    n = len(train) // 3
    assert train[n:] == [t.upper() for t in train[:n]] + [t.lower() for t in train[:n]]
    assert not any(t.isupper() for t in val + test)  # "good film number 3", as in the file
    report = json.load(open(out / "metrics.json"))
    assert report["train_case_copies"] == 2 * n and report["examples"]["train"] == n
    assert report["windowed_texts"] == 1 and report["fallback_characters"] == 30  # not 3 and 90
    assert f"{n} train (+ {2 * n} case copies)" in result.output
    scored = n + len(val) + len(test)  # the accuracies are of the records: copies not scored
    assert result.stderr.count(f"texts scored: {scored}/{scored}") == 2  # before and after
    seen.clear()
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out",
                  str(tmp_path / "none"), "--no-case-copies"] + FAST)
    assert result.exit_code == 0, result.output
    assert len(seen[f"{tsv} (train)"]) == n
    report = json.load(open(tmp_path / "none" / "metrics.json"))
    assert report["train_case_copies"] == 0 and report["examples"]["train"] == n


def test_resuming_a_run_from_before_case_copies_and_dedupe_trains_without_them(base, tsv,
                                                                                tmp_path):
    out = tmp_path / "old"
    result = run(["finetune", "classify", "--checkpoint", base, "--data", tsv, "--out", str(out),
                  "--no-case-copies"] + FAST)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    del meta["finetune"]["case_copies"], meta["finetune"]["dedupe"]  # as a run made before them
    (out / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    result = run(["finetune", "classify", "--out", str(out), "--resume", "--max-iters", "6"])
    assert result.exit_code == 0, result.output
    assert "case copies" not in result.output
    assert json.load(open(out / "metrics.json"))["train_case_copies"] == 0
    assert json.load(open(out / "metrics.json"))["repeats_dropped"] == 0


@pytest.mark.parametrize("task,kind", [("classify", "classifier"), ("instruct", "gpt")])
def test_train_seconds_add_up_over_every_resume(base, tsv, instructions, tmp_path, monkeypatch,
                                                task, kind):
    """metrics.json's train_seconds is the training time of the whole run, over a Ctrl-C and
    --resume (kept in the checkpoint); a run from before it was kept resumes with it unknown."""
    from tinyllm import train

    now, real_step, calls = [0.0], train.adamw_step, []
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def ten_seconds_a_step(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C in the 4th step: 3 steps, 30 s, are saved
            raise KeyboardInterrupt
        now[0] += 10
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "adamw_step", ten_seconds_a_step)
    out = tmp_path / "run"
    data = tsv if task == "classify" else instructions
    result = run(["finetune", task, "--checkpoint", base, "--data", data, "--out", str(out),
                  "--max-iters", "6", "--eval-interval", "2", "--batch-size", "4"])
    assert result.exit_code == 130 and load_checkpoint(str(out), kind=kind).iter == 3
    assert json.loads((out / "config.json").read_text())["train_seconds"] == 30
    resumed = run(["finetune", task, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    report = json.load(open(out / "metrics.json"))
    assert (report["train_seconds"], report["train_seconds_this_part"]) == (60, 30)
    assert "done in 30 s (60 s in all, over every --resume)" in resumed.output

    meta = json.loads((out / "config.json").read_text())
    del meta["train_seconds"]  # as a run made before tinyllm kept it
    (out / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    resumed = run(["finetune", task, "--out", str(out), "--resume", "--max-iters", "8"])
    assert resumed.exit_code == 0, resumed.output
    report = json.load(open(out / "metrics.json"))
    assert (report["train_seconds"], report["train_seconds_this_part"]) == (None, 20)
    assert "done in 20 s (the run's time before --resume is unknown" in resumed.output
    assert json.loads((out / "config.json").read_text())["train_seconds"] is None


def test_the_confusion_matrix_of_many_classes_is_not_printed(base, tmp_path):
    # 600 classes of long names printed a K x K matrix of 55 MB; metrics.json keeps it whole
    classes = [f"class {k} " + "x" * 60 for k in range(21)]
    path = tmp_path / "many.tsv"
    path.write_text("".join(f"film {k} {i}\t{name}\n" for k, name in enumerate(classes)
                            for i in range(6)), encoding="utf-8")
    out = str(tmp_path / "r")
    result = run(["finetune", "classify", "--checkpoint", base, "--data", str(path), "--out", out]
                 + FAST)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(report["test_confusion_matrix"]) == 21
    assert (f"test confusion matrix: not printed for 21 classes (more than 20); it is in"
            f" {os.path.join(out, 'metrics.json')}") in result.output
    scored = run(["classify", "--checkpoint", out, "--data", str(path)])
    assert scored.exit_code == 0, scored.output
    assert "confusion matrix: not printed for 21 classes (more than 20)\n" in scored.stdout
    for output in (result.output, scored.stdout):  # one line per class, as with fewer classes
        assert "x" * 60 + ": precision" in output and "rows: true" not in output
        assert max(len(line) for line in output.split("\n")) < 1000  # a row was 1,500
    # twenty classes or fewer: the matrix, names cut to 20 characters
    assert format_confusion([[1, 0], [0, 1]], ["a" * 30, "b"]).split("\n") == [
        " " * 22 + "a" * 20 + " " * 20 + "b", "a" * 20 + " " * 21 + "1" + " " * 20 + "0",
        "b" + " " * 40 + "0" + " " * 20 + "1"]
