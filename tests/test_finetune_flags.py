"""Flags of `tinyllm finetune classify|instruct` and `tinyllm classify` in combination: each
is used, refused in one line, or noted, never dropped unseen."""

import json
import os

import pytest
from click.testing import CliRunner

from tinyllm.cli import main
from tinyllm.config import GPTConfig

TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=16, bias=False)
FAST = ["--eval-interval", "2", "--batch-size", "4", "--no-case-copies"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, save_char_base):
    """A tiny 'pretrained' checkpoint: random weights, a char tokenizer, two blocks."""
    return save_char_base(str(tmp_path_factory.mktemp("base")),
                          "abcdefghijklmnopqrstuvwxyz0123456789 ", TINY)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    """20 labelled rows with a header, label first."""
    path = tmp_path_factory.mktemp("data") / "spam.csv"
    rows = ["label,text"] + [f"{'spam' if i % 2 else 'ham'},message {i} {'buy' * (i % 2)}"
                             for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def report(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_resume_of_an_epochs_run_keeps_the_total_its_epochs_set(base, csv_file, tmp_path):
    out = tmp_path / "run"
    done = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
               "--epochs", "1", *FAST)  # 14 training rows / batch 4: 4 steps
    assert done.exit_code == 0, done.output
    assert report(out)["iterations"] == 4
    again = run("finetune", "classify", "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert report(out)["iterations"] == 4  # not --max-iters' default of 300
    longer = run("finetune", "classify", "--out", out, "--resume", "--max-iters", "6")
    assert longer.exit_code == 0, longer.output
    assert report(out)["iterations"] == 6  # a new total in steps replaces the epochs


def test_resume_keeps_the_total_an_epochs_run_began_with(base, csv_file, tmp_path):
    """A run begun while an epoch still counted the case copies has a total that --epochs now
    works out smaller: --resume keeps the total in its checkpoint, not a new one."""
    out = tmp_path / "run"
    done = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
               "--epochs", "1", "--patience", "0", *FAST)  # 14 records / batch 4: 4 steps
    assert done.exit_code == 0 and report(out)["iterations"] == 4, done.output
    meta = json.loads((out / "config.json").read_text())
    meta["train"]["max_iters"] = 6  # as its epoch of records and copies would have set it
    (out / "config.json").write_text(json.dumps(meta))
    again = run("finetune", "classify", "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert report(out)["iterations"] == 6


@pytest.mark.parametrize("flags,message", [
    (["--freeze", "all-but-3"], "--freeze all-but-3: the model has 2 blocks"),
    (["--freeze", "all-but-x"], "--freeze must be none, all or all-but-N, got 'all-but-x'"),
    (["--freeze", "all", "--lora-rank", "2"], "--freeze all does nothing with --lora-rank"),
    (["--freeze", "none", "--lora-rank", "2"], "--freeze none does nothing with --lora-rank"),
])
def test_a_freeze_that_cannot_apply_is_refused_before_the_base_model_is_scored(
        base, csv_file, tmp_path, flags, message):
    result = run("finetune", "classify", "--checkpoint", base, "--data", csv_file,
                 "--out", tmp_path / "run", *FAST, *flags)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and message in last, result.output
    assert "accuracy before" not in result.output


@pytest.mark.parametrize("command", ["classify", "instruct"])
def test_epochs_and_max_iters_together_are_refused(base, tmp_path, command):
    result = run("finetune", command, "--checkpoint", base, "--out", tmp_path / "run",
                 "--epochs", "1", "--max-iters", "50")
    assert result.exit_code == 1, result.output
    assert "Error: --epochs sets the number of steps, so --max-iters would do nothing" in \
        result.output


def test_classify_refuses_column_flags_with_a_text_argument(base, csv_file, tmp_path):
    out = tmp_path / "run"
    assert run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
               "--max-iters", "2", *FAST).exit_code == 0
    result = run("classify", "--checkpoint", out, "--text-column", "body", "buy now")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --text-column and --label-column choose the columns")


def test_a_header_read_by_column_positions_is_not_a_class(base, csv_file, tmp_path):
    out = tmp_path / "run"
    result = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
                 "--text-column", "1", "--label-column", "0", "--max-iters", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert report(out)["labels"] == ["ham", "spam"]  # not "label" too


def test_a_class_the_random_split_leaves_out_of_training_is_named(base, tmp_path):
    path = tmp_path / "rare.csv"
    path.write_text("label,text\n" + "".join(f"ham,hello {i}\n" for i in range(20))
                    + "spam,buy now\n")
    result = run("finetune", "classify", "--checkpoint", base, "--data", path, "--seed", "4",
                 "--out", tmp_path / "run", *FAST)  # seed 4 puts the one spam in val or test
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        f"Error: {path}: the 1 record(s) of class 'spam' all fell in the validation or test"
        " split, so none is trained on: give more of them, or --val-data and --test-data")


def test_dedupe_emptying_a_given_test_file_names_it(base, csv_file, tmp_path):
    small = tmp_path / "val.csv"
    small.write_text("label,text\nham,hello there\n")
    result = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--dedupe",
                 "--val-data", small, "--test-data", csv_file, "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {csv_file}: --dedupe dropped all 20 record(s): each text is also in an earlier"
        " file")


def test_a_forced_run_stopped_early_leaves_no_report_of_the_run_it_replaced(
        base, csv_file, tmp_path, monkeypatch):
    from tinyllm import train

    out = tmp_path / "run"
    args = ["finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
            "--max-iters", "4", *FAST]
    assert run(*args).exit_code == 0 and (out / "metrics.json").exists()

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "adamw_step", ctrl_c)
    assert run(*args, "--force").exit_code == 130
    assert not (out / "metrics.json").exists()  # the old run's report is not this run's


def test_the_memory_check_counts_the_windows_the_texts_have(base, csv_file, tmp_path,
                                                            monkeypatch):
    """Short texts have one window each: a batch of them is not refused as if each had
    --max-windows (8) of them (--batch-size 64 on 720 short comments asked for 30 GB)."""
    from tinyllm import finetune_runs

    checked = []
    monkeypatch.setattr(finetune_runs, "check_memory", lambda size, what: checked.append(what))
    result = run("finetune", "classify", "--checkpoint", base, "--data", csv_file,
                 "--out", tmp_path / "run", "--max-iters", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert checked == ["a fine-tuning step with --batch-size 4 (context 32, up to 1 window(s) a"
                       " text)"]


@pytest.mark.parametrize("command", ["classify", "instruct"])
def test_fine_tuning_trains_on_one_blas_thread_and_gives_the_count_back(
        base, csv_file, tmp_path, monkeypatch, blas_calls, command):
    """Fine-tuning's float rounding, and so its result, must not depend on how many BLAS threads
    the machine gives numpy: every training step runs with one, and the count is restored."""
    from tinyllm import finetune_runs

    _, count = blas_calls  # a stand-in for OpenBLAS's setting, two threads to start with
    seen, real_loop = [], finetune_runs.train_loop

    def loop(state, tc, step_loss, *args, **kwargs):
        def counted(*step_args):
            seen.append(count[0])
            return step_loss(*step_args)
        return real_loop(state, tc, counted, *args, **kwargs)

    monkeypatch.setattr(finetune_runs, "train_loop", loop)
    data = ["--data", csv_file] if command == "classify" else []
    done = run("finetune", command, "--checkpoint", base, *data, "--out", tmp_path / "run",
               "--max-iters", "2", "--eval-interval", "2", "--batch-size", "4")
    assert done.exit_code == 0, done.output
    assert seen and set(seen) == {1}
    assert count[0] == 2


def evaluated_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["iter"] for line in f]


def test_an_eval_interval_longer_than_the_run_is_kept_for_a_resume_to_more_steps(
        base, csv_file, tmp_path):
    """The last step is evaluated whatever the interval: the run keeps --eval-interval 5, so
    that --resume to 12 steps evaluates every 5, not every 3 (the length of the first part)."""
    out = tmp_path / "run"
    done = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
               "--max-iters", "3", "--patience", "0", *FAST, "--eval-interval", "5")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "config.json").read_text())["train"]["eval_interval"] == 5
    again = run("finetune", "classify", "--out", out, "--resume", "--max-iters", "12")
    assert again.exit_code == 0, again.output
    assert evaluated_steps(out) == [0, 3, 5, 10, 12]


def test_a_run_saved_with_its_length_as_interval_resumes_with_its_own_interval(
        base, csv_file, tmp_path):
    """A run of 3 steps saved by a tinyllm that cut --eval-interval 5 to 3 (config.json "train")
    evaluates every 5 steps once resumed to 12, as its settings ask."""
    out = tmp_path / "run"
    done = run("finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out,
               "--max-iters", "3", "--patience", "0", *FAST, "--eval-interval", "5")
    assert done.exit_code == 0, done.output
    meta = json.loads((out / "config.json").read_text())
    meta["train"]["eval_interval"] = 3
    (out / "config.json").write_text(json.dumps(meta))
    again = run("finetune", "classify", "--out", out, "--resume", "--max-iters", "12")
    assert again.exit_code == 0, again.output
    assert evaluated_steps(out) == [0, 3, 5, 10, 12]


def test_epochs_that_make_more_steps_than_a_run_may_take_are_refused_and_out_is_kept(
        base, csv_file, tmp_path):
    """A checkpoint holds at most 2^31 - 1 steps: a run past that trained, but nothing could
    load it, not even `tinyllm classify`. The refusal comes before --force replaces a run."""
    out = tmp_path / "run"
    args = ["finetune", "classify", "--checkpoint", base, "--data", csv_file, "--out", out, *FAST]
    assert run(*args, "--max-iters", "2").exit_code == 0
    result = run(*args, "--epochs", "1e12", "--force")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: --epochs 1e+12 of 14 records is 3,500,000,000,000 steps, more than the"
        " 2,147,483,647 a run may take")
    assert run("classify", "--checkpoint", out, "buy now").exit_code == 0  # the run before


def test_instruct_refuses_too_many_epochs_before_force_replaces_a_run(base, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"instruction": "echo", "input": f"a{i}", "output": f"a{i}"})
                            + "\n" for i in range(20)))
    out = tmp_path / "run"
    args = ["finetune", "instruct", "--checkpoint", base, "--data", data, "--out", out,
            "--batch-size", "4", "--max-new-tokens", "2"]
    assert run(*args, "--max-iters", "1").exit_code == 0
    result = run(*args, "--epochs", "1e12", "--force")
    assert result.exit_code == 1 and "Error: --epochs 1e+12 of 17 records is" in result.output
    assert (out / "config.json").exists() and (out / "metrics.json").exists()


@pytest.mark.parametrize("steps,noted", [(3, True), (20, False)])
def test_a_warm_up_longer_than_the_run_is_noted(base, csv_file, tmp_path, steps, noted):
    """--lr is the peak of the schedule: a run shorter than its warm-up never reaches it."""
    result = run("finetune", "classify", "--checkpoint", base, "--data", csv_file,
                 "--out", tmp_path / "run", "--max-iters", steps, "--warmup-iters", "10",
                 "--lr", "1e-3", "--patience", "0", *FAST, "--eval-interval", "100")
    assert result.exit_code == 0, result.output
    note = ("note: --warmup-iters 10 is more than the run's 3 steps: the learning rate only"
            " rises, to 3/10 of --lr (0.0003), and never decays")
    assert (note in result.output.splitlines()) == noted, result.output
    assert ("note: --warmup-iters" in result.output) == noted


def test_the_library_refuses_freeze_with_lora_as_the_cli_does():
    # ClassifySettings is the library's way in: its check must not rest on the CLI's
    from tinyllm.classify_run import ClassifySettings
    from tinyllm.errors import TinyLLMError
    with pytest.raises(TinyLLMError, match="--freeze all does nothing with --lora-rank"):
        ClassifySettings(freeze="all", lora_rank=2).validate()
    ClassifySettings(lora_rank=2).validate()  # --freeze's default, none, is no freezing at all
    ClassifySettings(freeze="all").validate()


def test_a_freeze_past_a_one_block_model_says_block():
    from tinyllm.errors import TinyLLMError
    from tinyllm.finetune import trainable_paths
    with pytest.raises(TinyLLMError, match="the model has 1 block, so N is at most 1"):
        trainable_paths({"h": [{}]}, "all-but-2", 1)
