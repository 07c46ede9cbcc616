"""Crash trials, run as a user would: kill -9 at random moments, a double Ctrl-C, a full disk.

Run from a checkout:  python benchmarks/fault_trials.py [--kills 40] [--double-ctrl-c 10]
                                                        [--full-disk] [--out /tmp/fault-trials]

Each trial runs `python cli.py pretrain` (a 2-layer, 128-channel GPT on the embedded pydoc
corpus, 30 steps, a checkpoint every 2 steps) in a subprocess and hurts it from outside:

* kill -9: SIGKILL at a random moment after the first checkpoint: once the checkpoint of a random
  step (0 to 25) is on disk, after a further random wait of up to two checkpoint intervals
  (kills before the first checkpoint leave nothing to resume, by definition; a run that ends
  before its kill is counted apart). Then `tinyllm generate` must load the run, `pretrain --resume` must finish it,
  and its final weights and loss curve must equal an uninterrupted run's, bit for bit.
* double Ctrl-C: SIGINT at a random moment of training (0 to 100 ms after the checkpoint of a
  random step appears), and a second one 1 to 20 ms later (while the first one's checkpoint is
  being saved). The run must exit 130 and resume exactly.
* full disk (needs root to mount a tmpfs): the run directory lives on a small tmpfs; after the
  checkpoint of step 2 the disk is filled so that the next save runs out of space inside
  metrics.jsonl, model-*.npz, optim-*.npz or config.json. The command must print one line
  `Error: ...` (no traceback), the step-2 checkpoint must be byte-for-byte intact, and once space
  is freed `--resume` must finish the run exactly.

Prints one line per trial and a summary; exits 1 if any trial fails. Measured on a shared 2-core
machine, the whole thing takes several minutes.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as onp  # noqa: E402

from tinyllm.checkpoint import checkpoint_paths, load_checkpoint  # noqa: E402
from tinyllm.tree import flatten  # noqa: E402

RUN_ARGS = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
            "--batch-size", "8", "--max-iters", "30", "--eval-interval", "2", "--eval-iters", "1",
            "--warmup-iters", "5", "--seed", "7", "--sample-tokens", "0"]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}


def cli(*args):
    return [sys.executable, os.path.join(REPO, "cli.py"), *map(str, args)]


def start(out, *extra):
    return subprocess.Popen(cli("pretrain", "--out", out, *RUN_ARGS, *extra), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(out, *extra):
    return subprocess.run(cli("pretrain", "--out", out, *extra), env=ENV, capture_output=True,
                          text=True, timeout=600)


def fingerprint(out):
    """(final weights, loss curve) of a finished run."""
    ckpt = load_checkpoint(out)
    curve = [(r["iter"], r["train_loss"], r["val_loss"])
             for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"), encoding="utf-8"))]
    return flatten(ckpt.params), curve


def same_run(a, b):
    (wa, ca), (wb, cb) = a, b
    return ca == cb and wa.keys() == wb.keys() and all(onp.array_equal(wa[k], wb[k]) for k in wa)


def loads(out):
    result = subprocess.run(cli("generate", "--checkpoint", out, "--prompt", "The",
                                "--max-new-tokens", 5, "--seed", 1), env=ENV, capture_output=True,
                            text=True, timeout=300)
    return result.returncode == 0


def checkpoint_iter(out):
    """The step of the checkpoint in `out` now (-1 if none yet)."""
    try:
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            return json.load(f)["iter"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_first_checkpoint(proc, out, limit=120):
    t0 = time.perf_counter()
    while not os.path.exists(os.path.join(out, "config.json")):
        if proc.poll() is not None or time.perf_counter() - t0 > limit:
            return None
        time.sleep(0.005)
    return time.perf_counter()


# ----------------------------------------------------------------------------- trials


def reference_run(root):
    out = os.path.join(root, "reference")
    shutil.rmtree(out, ignore_errors=True)
    proc = start(out)
    first = wait_for_first_checkpoint(proc, out)
    proc.wait()
    duration = time.perf_counter() - first
    assert proc.returncode == 0, proc.stderr.read()
    print(f"reference run: {duration:.2f} s from its first checkpoint to its end")
    return fingerprint(out), duration


def kill_trial(root, i, reference, duration, rng):
    out = os.path.join(root, f"kill-{i:02d}")
    shutil.rmtree(out, ignore_errors=True)
    proc = start(out)
    first = wait_for_first_checkpoint(proc, out)
    step = rng.randrange(0, 26)  # a random moment of training, whatever the machine's speed today
    while proc.poll() is None and checkpoint_iter(out) < step:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 2 * duration / 15))  # up to about two checkpoint intervals more
    delay = time.perf_counter() - first
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    leftovers = sorted(n for n in os.listdir(out) if n.startswith(".tmp-") or n.endswith(".npz"))
    ok_load = loads(out)
    resumed = finish(out, "--resume")
    exact = resumed.returncode == 0 and same_run(fingerprint(out), reference)
    print(f"kill {i:2d}: SIGKILL {delay:5.2f} s after the first checkpoint"
          f"{'' if killed else ' (the run had already finished)'}; files then: {leftovers};"
          f" loads: {ok_load}; resumes exactly: {exact}")
    return killed, ok_load and exact


def double_ctrl_c_trial(root, i, reference, duration, rng):
    out = os.path.join(root, f"ctrl-c-{i:02d}")
    shutil.rmtree(out, ignore_errors=True)
    proc = start(out)
    step = rng.randrange(2, 26, 2)  # a moment of training, whatever the machine's speed today
    while proc.poll() is None and checkpoint_iter(out) < step:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.1))
    gap = rng.uniform(0.001, 0.020)
    if proc.poll() is not None:  # the run was faster than the reference one and has finished
        print(f"double Ctrl-C {i:2d}: the run ended before the first SIGINT; not counted")
        return None
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    proc.wait()
    exit_ok = proc.returncode == 130
    ok_load = loads(out)
    resumed = finish(out, "--resume")
    exact = resumed.returncode == 0 and same_run(fingerprint(out), reference)
    print(f"double Ctrl-C {i:2d}: second SIGINT {1000 * gap:4.1f} ms after the first; exit"
          f" {proc.returncode}; loads: {ok_load}; resumes exactly: {exact}")
    return exit_ok and ok_load and exact


def fill_disk(mount, free_bytes):
    """Fill the file system at `mount`, then free exactly `free_bytes` (rounded to pages)."""
    filler = os.path.join(mount, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, os.path.getsize(filler) - free_bytes))
    return filler


def full_disk_trials(root, reference):
    mount = os.path.join(root, "tmpfs")
    os.makedirs(mount, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount]).returncode:
        print("full disk: cannot mount a tmpfs (needs root); skipped")
        return None
    results = []
    try:
        page = 4096
        for target in ("metrics.jsonl", "model", "optim", "config.json"):
            out = os.path.join(mount, "run")
            shutil.rmtree(out, ignore_errors=True)
            # the 30-step run, stopped by a Ctrl-C delivered right after the checkpoint of step 2
            first = subprocess.run(cli("pretrain", "--out", out, *RUN_ARGS),
                                   env={**ENV, "TINYLLM_FAULT": "sigint@renamed:config.json#2"},
                                   capture_output=True, text=True)
            assert first.returncode == 130, first.stderr
            paths = checkpoint_paths(out)
            m, o = (-(-os.path.getsize(paths[k]) // page) * page for k in ("model", "optim"))
            free = {"metrics.jsonl": 0, "model": m // 2, "optim": m + o // 2,
                    "config.json": m + o}[target]
            before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
                      if n != "metrics.jsonl"}
            filler = fill_disk(mount, free)
            run = subprocess.run(cli("pretrain", "--out", out, "--resume"),
                                 env=ENV, capture_output=True, text=True)
            lines = run.stderr.strip().splitlines()
            expected = target if target != "model" and target != "optim" else f"{target}-000004.npz"
            one_line = (run.returncode == 1 and lines[-1].startswith("Error:")
                        and expected in lines[-1] and "Traceback" not in run.stderr)
            after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
                     if n != "metrics.jsonl"}
            intact = after == before and load_checkpoint(out).iter == 2
            os.unlink(filler)
            resumed = finish(out, "--resume")
            exact = resumed.returncode == 0 and same_run(fingerprint(out), reference)
            print(f"full disk in {target}: {lines[-1] if lines else run.returncode!r}; previous"
                  f" checkpoint intact: {intact}; resumes exactly once freed: {exact}")
            results.append(one_line and intact and exact)
    finally:
        subprocess.run(["umount", mount])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--double-ctrl-c", type=int, default=10)
    parser.add_argument("--full-disk", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="/tmp/tinyllm-fault-trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # started in the background of a script (`cmd &`), which ignores SIGINT: the runs would
        # inherit that, and tinyllm keeps a signal ignored that it was started with, so every
        # Ctrl-C trial would see the run go on. The runs are to get Ctrl-C as a user sends it.
        print("note: SIGINT was ignored (a background job?); restored for the runs", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    reference, duration = reference_run(args.out)
    summary, failed = [], False
    if args.kills:
        outcomes = [kill_trial(args.out, i, reference, duration, rng) for i in range(args.kills)]
        killed = [ok for was_killed, ok in outcomes if was_killed]
        summary.append(f"kill -9: {sum(killed)} of {len(killed)} killed runs loadable and resumed"
                       f" exactly ({len(outcomes) - len(killed)} runs ended before the kill)")
        failed |= not all(ok for _, ok in outcomes)
    if args.double_ctrl_c:
        oks = [double_ctrl_c_trial(args.out, i, reference, duration, rng)
               for i in range(args.double_ctrl_c)]
        done = [ok for ok in oks if ok is not None]
        summary.append(f"double Ctrl-C: {sum(done)} of {len(done)} interrupted runs exit 130, load"
                       f" and resume exactly ({len(oks) - len(done)} runs ended before it)")
        failed |= not all(done)
    if args.full_disk:
        oks = full_disk_trials(args.out, reference)
        if oks is not None:
            summary.append(f"full disk: {sum(oks)} of {len(oks)} files (metrics.jsonl, model,"
                           " optim, config.json): one-line error, previous checkpoint intact,"
                           " exact resume")
            failed |= not all(oks)
    print("\n".join(["", *summary]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
