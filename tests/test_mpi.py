"""Tests for data-parallel training over MPI (tinyllm/distributed.py).

The tests that launch `mpirun -n 2` skip unless mpi4py and an `mpirun` are installed (the `mpi`
extra: pip install ".[mpi]"); they install nothing. Each job is a 1-layer, 16-channel model for a
few steps, run in its own session with a generous timeout, and killed whole if it ever hangs.
The tests without mpirun check what must hold when MPI is absent: no import of mpi4py, and a
one-line error when a launcher started us but mpi4py is missing.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as onp
import pytest
from click.testing import CliRunner

from tinyllm import distributed
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main
from tinyllm.errors import TinyLLMError
from tinyllm.tree import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.\n"
        "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!\n") * 15
RUN = ["pretrain", "--tokenizer", "char", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
       "--block-size", "16", "--batch-size", "3", "--dropout", "0.1", "--max-iters", "6",
       "--eval-interval", "3", "--eval-iters", "3", "--lr", "1e-2", "--warmup-iters", "2",
       "--seed", "11", "--sample-tokens", "0"]
JOB_TIMEOUT = 180  # seconds: a job takes ~2 s on an idle machine; this is for a loaded one


def find_mpirun():
    """The mpirun beside this Python (a virtual environment's, from the mpich wheel), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpirun")


MPIRUN = find_mpirun()
needs_mpi = pytest.mark.skipif(
    MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
    reason='needs mpi4py and mpirun (pip install ".[mpi]")')


def mpirun_command(n):
    """mpirun -n N, plus what Open MPI needs to run as root (MPICH needs nothing)."""
    command = [MPIRUN, "-n", str(n)]
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True, timeout=60)
    if "Open MPI" in version.stdout + version.stderr:
        command += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return command


def mpi_job(n, args, script=None):
    """Run `mpirun -n N python cli.py ARGS` (or python -c SCRIPT ARGS) from the repository root.

    Returns (exit code, stdout, stderr). The job runs in its own session; if it outlives
    JOB_TIMEOUT the whole session is killed and the test fails, so a hang cannot hang the suite.
    """
    program = ["-c", script] if script else ["cli.py"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    env.update(OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(mpirun_command(n) + [sys.executable, *program, *map(str, args)],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpirun -n {n} {' '.join(map(str, args))} hung for {JOB_TIMEOUT} s")
    return proc.returncode, out, err


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def records(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in records(out)]


# ----------------------------------------------------------------------------- two ranks


@needs_mpi
def test_two_ranks_follow_one_process_with_grad_accum_2_and_resume(tmp_path, data):
    # The equivalence: mpirun -n 2 with --batch-size B == one process with --grad-accum 2,
    # at every evaluation, to float32 rounding (in practice bit for bit); and the MPI run stopped
    # at step 3 and resumed with the same N ends where the uninterrupted run ends.
    single, ranks = str(tmp_path / "single"), str(tmp_path / "mpi")
    result = CliRunner().invoke(main, RUN + ["--data", data, "--grad-accum", "2", "--out", single])
    assert result.exit_code == 0, result.output
    code, out, err = mpi_job(2, RUN + ["--data", data, "--out", ranks, "--max-iters", "3"])
    assert code == 0, err
    code, out, err = mpi_job(2, RUN + ["--data", data, "--out", ranks, "--resume"])
    assert code == 0, err
    assert out.count("done: iteration 6") == 1  # rank 0 alone prints
    assert [r["iter"] for r in records(ranks)] == [0, 3, 6]
    for (it, train, val), (it1, train1, val1) in zip(losses(ranks), losses(single)):
        assert it == it1 and abs(train - train1) <= 1e-5 and abs(val - val1) <= 1e-5, it
    mpi_ckpt, one_ckpt = load_checkpoint(ranks), load_checkpoint(single)
    assert mpi_ckpt.meta["ranks"] == 2 and one_ckpt.meta["ranks"] == 1
    for key, weight in flatten(one_ckpt.params).items():
        onp.testing.assert_allclose(flatten(mpi_ckpt.params)[key], weight, rtol=1e-4, atol=1e-6)
    assert mpi_ckpt.meta["train"]["batch_size"] == 3 and mpi_ckpt.meta["train"]["grad_accum"] == 1
    # tokens per second count the whole step: 2 ranks x 3 sequences x 16 tokens
    assert records(ranks)[-1]["tokens_per_s"] > 0


@needs_mpi
def test_an_error_on_rank_0_stops_every_rank_with_one_line(tmp_path, data):
    out = str(tmp_path / "run")
    os.makedirs(out)
    (tmp_path / "run" / "config.json").write_text("{}")  # an existing run, no --force
    code, stdout, stderr = mpi_job(2, RUN + ["--data", data, "--out", out])
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"Error: --out {out!r} already holds a run: pass --resume to continue it or"
                     " --force to start over (which replaces it)"]


@needs_mpi
def test_a_bad_flag_is_one_line_from_rank_0_and_every_rank_exits_in_order(tmp_path, data):
    # Every rank meets the error before training; they agree on it and exit without MPI_Abort
    # (whose own line would follow ours).
    code, stdout, stderr = mpi_job(2, RUN + ["--data", data, "--out", str(tmp_path / "run"),
                                             "--n-embd", "15"])
    assert code == 1
    assert stderr.strip() == "Error: --n-embd (15) must be divisible by --n-head (2)"
    assert not os.path.exists(tmp_path / "run")


@needs_mpi
def test_a_rank_that_dies_mid_run_aborts_the_job_with_one_line(tmp_path, data):
    # Rank 1 fails in its third step while rank 0 waits for its gradients: without MPI_Abort
    # rank 0 would wait forever.
    script = (
        "import sys\n"
        "from tinyllm import distributed, train\n"
        "real = train.accumulated_step\n"
        "steps = []\n"
        "def failing(*args):\n"
        "    steps.append(1)\n"
        "    if distributed.world().rank == 1 and len(steps) == 3:\n"
        "        raise MemoryError('injected on rank 1')\n"
        "    return real(*args)\n"
        "train.accumulated_step = failing\n"
        "from tinyllm.cli import main\n"
        "sys.argv[0] = 'tinyllm'\n"
        "main()\n")
    code, stdout, stderr = mpi_job(2, RUN + ["--data", data, "--out", str(tmp_path / "run")],
                                   script=script)
    assert code != 0
    assert "Error: rank 1 of 2: MemoryError: injected on rank 1" in stderr.splitlines()
    assert "Traceback" not in stderr
    assert [r["iter"] for r in records(str(tmp_path / "run"))] == [0]  # rank 0 had saved step 0


@needs_mpi
def test_ranks_whose_weights_drift_apart_are_stopped_at_the_next_evaluation(tmp_path, data):
    # Rank 1's step changes one weight by one float32 step: the evaluation at step 3 must see
    # it and stop every rank with one line (the checkpoint of step 0 is kept).
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from tinyllm import distributed, train\n"
        "real = train.accumulated_step\n"
        "def drifting(*args):\n"
        "    params, opt_state, loss, norm = real(*args)\n"
        "    if distributed.world().rank == 1:\n"
        "        params['wte'] = np.nextafter(params['wte'], np.float32(np.inf))\n"
        "    return params, opt_state, loss, norm\n"
        "train.accumulated_step = drifting\n"
        "from tinyllm.cli import main\n"
        "main()\n")
    out = str(tmp_path / "run")
    code, stdout, stderr = mpi_job(2, RUN + ["--data", data, "--out", out], script=script)
    assert code == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("Error: at iteration 3 the weights of rank(s) [1] differ from rank"
                              " 0's: the ranks no longer train one model (are numpy and tinyllm"
                              " the same version on every machine?); the last checkpoint is kept")
    assert [r["iter"] for r in records(out)] == [0]


@needs_mpi
def test_resume_with_another_number_of_ranks_is_refused(tmp_path, data):
    out = str(tmp_path / "run")
    assert CliRunner().invoke(main, RUN + ["--data", data, "--out", out, "--max-iters", "1"]
                              ).exit_code == 0
    code, stdout, stderr = mpi_job(2, RUN + ["--data", data, "--out", out, "--resume"])
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"Error: --resume: the run in {out} was trained on 1 process(es) and this job has 2:"
        " resume it with one process (no mpirun)")


@needs_mpi
def test_fine_tuning_on_two_ranks_follows_one_process_with_grad_accum_2(tmp_path, data):
    # A tiny base model, then `finetune classify` on 2 ranks vs one process with --grad-accum 2:
    # the same validation losses at every evaluation, rank 0's --out alone written, and no
    # scratch copy of another rank left behind.
    base = str(tmp_path / "base")
    assert CliRunner().invoke(main, RUN + ["--data", data, "--out", base, "--max-iters", "1"]
                              ).exit_code == 0
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("label\ttext\n" + "".join(
        f"pos\tgood box {i}\nneg\tbad jug {i}\n" for i in range(20)), encoding="utf-8")
    tune = ["finetune", "classify", "--checkpoint", base, "--data", str(labelled),
            "--max-iters", "4", "--eval-interval", "2", "--batch-size", "4", "--patience", "0"]
    single, ranks = str(tmp_path / "single"), str(tmp_path / "mpi")
    result = CliRunner().invoke(main, tune + ["--grad-accum", "2", "--out", single])
    assert result.exit_code == 0, result.output
    scratch_before = set(os.listdir(tempfile.gettempdir()))
    code, out, err = mpi_job(2, tune + ["--out", ranks])
    assert code == 0, err
    assert out.count("accuracy after fine-tuning") == 1
    assert [r["iter"] for r in records(ranks)] == [0, 2, 4]
    for (it, train, val), (it1, train1, val1) in zip(losses(ranks), losses(single)):
        assert it == it1 and abs(train - train1) <= 1e-5 and abs(val - val1) <= 1e-5, it
    assert load_checkpoint(ranks, kind="classifier").meta["ranks"] == 2
    left = {name for name in set(os.listdir(tempfile.gettempdir())) - scratch_before
            if name.startswith("tinyllm-rank")}
    assert not left


# ----------------------------------------------------------------------------- fine-tuning


LABELLED = "label\ttext\n" + "".join(f"pos\tgood box {i}\nneg\tbad jug {i}\n" for i in range(20))
TUNE = ["finetune", "classify", "--data", "labelled.tsv", "--max-iters", "4", "--eval-interval",
        "2", "--batch-size", "4", "--patience", "0"]
# Run on rank r from the directory rank<r> of $RANK_DIRS, as if each rank were on its own
# machine: a relative --data or --out names one path and, on each rank, its own file.
IN_RANK_DIR = (
    "import os, sys\n"
    "from tinyllm import distributed\n"
    "os.chdir(os.path.join(os.environ['RANK_DIRS'], f'rank{distributed.launched_rank()}'))\n"
    "from tinyllm.cli import main\n"
    "main()\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained run to fine-tune from."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    data = tmp_path_factory.mktemp("text") / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    result = CliRunner().invoke(main, RUN + ["--data", str(data), "--out", out, "--max-iters", "1"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def machines(tmp_path, monkeypatch):
    """Two "machines" for IN_RANK_DIR: rank0/ and rank1/ under tmp_path, each with labelled.tsv."""
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
        (tmp_path / f"rank{rank}" / "labelled.tsv").write_text(LABELLED, encoding="utf-8")
    monkeypatch.setenv("RANK_DIRS", str(tmp_path))
    return tmp_path


@needs_mpi
def test_an_error_every_rank_meets_in_fine_tuning_is_rank_0s_one_line(machines, base):
    # Every rank reads the data itself and meets the same error: rank 0's line alone, without
    # another rank's copy of it or MPI_Abort's own line after it.
    code, out, err = mpi_job(2, TUNE + ["--checkpoint", base, "--label-column", "nope",
                                        "--out", str(machines / "run")], script=IN_RANK_DIR)
    assert code == 1
    assert err.strip() == "Error: labelled.tsv:1: no column named 'nope' (columns: 'label', 'text')"


@needs_mpi
def test_a_step_that_diverges_on_every_rank_is_rank_0s_one_line(tmp_path, data):
    code, out, err = mpi_job(2, RUN + ["--data", data, "--out", str(tmp_path / "run"), "--lr",
                                       "1e30", "--warmup-iters", "0", "--grad-clip", "0"])
    assert code == 1
    errors = [line for line in err.splitlines() if "Error" in line or "Abort" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: training diverged at iteration 1:")


@needs_mpi
def test_data_files_that_differ_between_ranks_are_refused(machines, base):
    (machines / "rank1" / "labelled.tsv").write_text(LABELLED.replace("box 7", "box 8"))
    code, out, err = mpi_job(2, TUNE + ["--checkpoint", base, "--out", str(machines / "run")],
                             script=IN_RANK_DIR)
    assert code == 1
    assert err.strip() == (
        "Error: --data is another file on rank 1 than on rank 0 (its sha256 differs): under"
        " mpirun every rank reads the data files itself, so each machine needs the same file at"
        " the same path")
    assert not os.path.exists(machines / "run")


@needs_mpi
def test_a_data_file_missing_on_one_rank_is_one_line_at_once(machines, base):
    # Rank 1 fails alone before training: it says so at once, not after waiting AGREE_SECONDS
    # for the others to fail too.
    (machines / "rank1" / "labelled.tsv").unlink()
    start = time.monotonic()
    code, out, err = mpi_job(2, TUNE + ["--checkpoint", base, "--out", str(machines / "run")],
                             script=IN_RANK_DIR)
    assert time.monotonic() - start < distributed.AGREE_SECONDS
    assert code == 1
    assert err.strip() == "Error: rank 1 of 2: data file labelled.tsv is missing"


@needs_mpi
def test_fine_tuning_resumes_with_its_run_directory_on_rank_0s_machine_alone(machines, base):
    # --out "run" is relative: it exists only in rank0/, as on rank 0's machine; rank 0 sends
    # its files. The resumed run ends where an uninterrupted one does.
    whole = str(machines / "whole")
    assert CliRunner().invoke(main, TUNE + ["--checkpoint", base, "--grad-accum", "2", "--data",
                                            str(machines / "rank0" / "labelled.tsv"), "--out",
                                            whole]).exit_code == 0
    code, out, err = mpi_job(2, TUNE + ["--checkpoint", base, "--out", "run", "--max-iters", "2"],
                             script=IN_RANK_DIR)
    assert code == 0, err
    assert not os.path.exists(machines / "rank1" / "run")
    code, out, err = mpi_job(2, ["finetune", "classify", "--out", "run", "--resume",
                                 "--max-iters", "4"], script=IN_RANK_DIR)
    assert code == 0, err
    assert "resuming run at iteration 2 of 4" in out
    resumed = str(machines / "rank0" / "run")
    assert [r["iter"] for r in records(resumed)] == [0, 2, 4]
    for (it, train, val), (it1, train1, val1) in zip(losses(resumed), losses(whole)):
        assert it == it1 and abs(train - train1) <= 1e-5 and abs(val - val1) <= 1e-5, it


# ----------------------------------------------------------------------------- without MPI


def test_one_process_never_imports_mpi4py(tmp_path, data):
    assert distributed.launched_size() == 1
    distributed.world.cache_clear()
    result = CliRunner().invoke(main, RUN + ["--data", data, "--out", str(tmp_path / "run"),
                                             "--max-iters", "1"])
    assert result.exit_code == 0, result.output
    assert "mpi4py" not in sys.modules
    assert isinstance(distributed.world(), distributed.SingleProcess)


def test_started_by_mpirun_without_mpi4py_is_a_one_line_error(tmp_path, data, monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    distributed.world.cache_clear()
    try:
        result = CliRunner().invoke(main, RUN + ["--data", data, "--out", str(tmp_path / "r")])
        with pytest.raises(TinyLLMError, match="mpi4py is not installed"):
            distributed.world()
    finally:
        distributed.world.cache_clear()
    assert result.exit_code == 1
    assert result.output.strip() == ('Error: started by mpirun as 2 processes, but mpi4py is not'
                                     ' installed: pip install mpi4py mpich')
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("environ, size, rank", [
    ({}, 1, 0),
    ({"PMI_SIZE": "4", "PMI_RANK": "3"}, 4, 3),  # MPICH, Intel MPI
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, 2, 1),  # Open MPI
    ({"PMI_SIZE": "", "PMI_RANK": "x"}, 1, 0),
])
def test_the_launchers_environment_gives_size_and_rank(environ, size, rank):
    assert distributed.launched_size(environ) == size
    assert distributed.launched_rank(environ) == rank


def test_a_signal_a_rank_ignores_stays_ignored_while_a_save_holds_signals():
    # Ranks other than 0 ignore Ctrl-C (rank 0 alone acts on it); holding signals around a
    # save must not turn that back on.
    from tinyllm import train

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # conftest puts the handler back
    received = []
    with train.signals_held(received):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
    assert received == []
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("rank, output", [
    ("0", "Error: tinyllm generate runs on one process, and mpirun started 2: of the commands,"
          " only pretrain and finetune train over MPI"),
    ("1", ""),  # rank 0 says it
])
def test_a_command_that_does_not_train_over_mpi_is_refused_under_mpirun(monkeypatch, rank,
                                                                        output):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", rank)
    result = CliRunner().invoke(main, ["generate", "--prompt", "x"])
    assert result.exit_code == 1
    assert result.output.strip() == output
    assert "mpi4py" not in sys.modules


def test_scratch_left_by_a_killed_rank_is_removed_by_the_next_job(tmp_path, monkeypatch):
    # After Ctrl-C rank 0 aborts the job, and MPI_Abort kills the other ranks before they can
    # delete their scratch copies of the run: the next job's ranks delete those.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"tinyllm-rank1-pid{dead.pid}-abc123"
    running = tmp_path / f"tinyllm-rank1-pid{os.getpid()}-def456"
    other = tmp_path / "tinyllm-rank1-xyz"  # not named by a process: not ours to judge
    for path in (left, running, other):
        (path / "run").mkdir(parents=True)

    class Rank1:
        is_root, rank = False, 1

        def from_root(self, fn):
            return {}  # rank 0 sends no files: not resuming

    with distributed.rank_run_dir(str(tmp_path / "out"), False, Rank1()) as run_dir:
        assert os.path.basename(os.path.dirname(run_dir)).startswith(
            f"tinyllm-rank1-pid{os.getpid()}-")
    assert not left.exists() and running.exists() and other.exists()
