"""Bad inputs and crafted run directories, tried as a user (or an attacker) would.

Run from a checkout:  python benchmarks/bad_inputs.py [--out /tmp/tinyllm-bad-inputs]

Each case runs one `python cli.py ...` command in a subprocess (under `strace` when the machine
has it, to see every file the command opens) with a 60 s limit, and counts:

* tracebacks (any "Traceback" on stderr) and hangs (the time limit reached),
* the exit code and the `Error: ...` line of the output (one such line is the goal),
* opens of the files a crafted run directory points at outside itself (/etc/passwd, a secret
  file beside the run, /dev/zero, a FIFO), and whether any of them changed.

A crafted run directory starts as a real 2-step run, then one thing is changed. Opens outside a
run that are by design are reported apart: a file the user named on the command line, and the
data file a run names (an absolute path), which `pretrain --resume`, `fewshot` and `classify
--split` read to compare its sha256 with the stored one; its contents are never used or shown
when they differ.

Prints one line per case and a summary; exits 1 if a case gave a traceback, hung, or opened a
planted file other than by design.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--sample-tokens", "0"]
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n" * 40


def run(args, root, limit=60):
    """(exit code or "hang", stderr + stdout, opened paths) of `python cli.py args`."""
    trace = os.path.join(root, "trace.txt")
    prefix = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", trace] if shutil.which(
        "strace") else []
    try:
        result = subprocess.run(prefix + [sys.executable, os.path.join(REPO, "cli.py"), *args],
                                cwd=root, env=ENV, capture_output=True, text=True, timeout=limit)
        code, output = result.returncode, result.stderr + result.stdout
    except subprocess.TimeoutExpired:
        code, output = "hang", ""
    opened = []
    if prefix and os.path.exists(trace):
        for line in open(trace, encoding="utf-8", errors="replace"):
            m = re.search(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]*)".*\) = (\d+)', line)
            if m:
                opened.append(os.path.normpath(os.path.join(root, m.group(1))))
        os.unlink(trace)
    return code, output, opened


def make_run(root, name="run"):
    data = os.path.join(root, "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(TEXT)
    out = os.path.join(root, name)
    shutil.rmtree(out, ignore_errors=True)
    code, output, _ = run(["pretrain", "--data", data, "--out", out, *TINY], root)
    assert code == 0, output
    return out


def make_classifier(root):
    """A 2-step `finetune classify` run on a tiny labelled file, from a fresh `make_run`."""
    base = make_run(root)
    data = os.path.join(root, "labelled.tsv")
    with open(data, "w", encoding="utf-8") as f:
        f.write("label\ttext\n" + "".join(f"{'ab'[i % 2]}\tthe quick fox {i}\n" for i in range(40)))
    out = os.path.join(root, "classifier")
    shutil.rmtree(out, ignore_errors=True)
    code, output, _ = run(["finetune", "classify", "--checkpoint", base, "--data", data, "--out",
                           out, "--max-iters", "2", "--eval-interval", "1", "--batch-size", "4"],
                          root)
    assert code == 0, output
    return out


def edit(out, **changes):
    path = os.path.join(out, "config.json")
    meta = json.load(open(path, encoding="utf-8"))
    meta.update(changes)
    json.dump(meta, open(path, "w", encoding="utf-8"))
    return meta


def replace_with(path, make):
    os.unlink(path)
    make(path)


# ----------------------------------------------------------------------------- the cases


def cases(root):
    """(name, set-up function returning the command's arguments, by_design) for every case."""
    secret = os.path.join(root, "secret.txt")
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data.txt")

    def crafted(change, command=("generate", "--checkpoint", run_dir, "--prompt", "The")):
        def setup():
            make_run(root)
            change(run_dir)
            return list(command)
        return setup

    def flags(*args):
        return lambda: list(args)

    def tokenizer_field(key, value):
        def change(out):
            path = os.path.join(out, "tokenizer.json")
            tok = json.load(open(path, encoding="utf-8"))
            tok[key] = value
            json.dump(tok, open(path, "w", encoding="utf-8"))
        return change

    def npz(out, role):
        return os.path.join(out, json.load(open(os.path.join(out, "config.json")))[role])

    yield "--seed -1 (pretrain)", flags("pretrain", "--seed", "-1"), False
    yield "--seed -1 (generate)", flags("generate", "--seed", "-1"), False
    yield "--seed -1 (fewshot)", flags("fewshot", "--task", "x", "--seed", "-1"), False
    yield "--seed -1 (finetune classify)", flags("finetune", "classify", "--seed", "-1"), False
    yield "--seed -1 (seq2seq train)", flags("seq2seq", "train", "--seed", "-1"), False
    yield "--temperature nan", flags("generate", "--temperature", "nan"), False
    yield "--lora-rank -2", flags("finetune", "instruct", "--lora-rank", "-2"), False
    yield "--epochs nan", flags("finetune", "classify", "--epochs", "nan"), False
    yield "--epochs inf", flags("finetune", "instruct", "--epochs", "inf"), False
    yield "--min-lr nan", flags("pretrain", "--min-lr", "nan"), False
    yield "--lora-alpha -1", flags("finetune", "classify", "--lora-rank", "2", "--lora-alpha",
                                   "-1", "--out", os.path.join(root, "ft")), False
    yield "--max-new-tokens -1", flags("generate", "--max-new-tokens", "-1"), False
    yield "--length-penalty nan", flags("seq2seq", "translate", "x", "--length-penalty", "nan"), False
    yield "--batch-size 5000000", flags("pretrain", "--batch-size", "5000000"), False
    yield "--batch-size 1000000", flags("pretrain", "--data", data, "--batch-size", "1000000",
                                        "--out", os.path.join(root, "big")), False
    yield "--icl-windows 100000000", flags("fewshot", "--task", "x", "--icl-windows",
                                           "100000000"), False
    yield "--out ''", flags("pretrain", "--out", ""), False
    yield "--out under a file", flags("pretrain", "--out", os.path.join(secret, "run")), False
    yield "--out a FIFO", lambda: fifo(root) and ["pretrain", "--out", fifo(root)], False
    yield "--data a directory", flags("pretrain", "--data", root), False
    yield "--data /dev/zero", flags("pretrain", "--data", "/dev/zero"), True  # the user named it
    yield "--data missing", flags("pretrain", "--data", os.path.join(root, "missing.txt")), False
    yield "tokenizer_file absolute", crafted(lambda o: edit(o, tokenizer_file=secret)), False
    yield "tokenizer_file ../", crafted(lambda o: edit(o, tokenizer_file="../secret.txt")), False
    yield "model_file /etc/passwd", crafted(lambda o: edit(o, model_file="/etc/passwd")), False
    yield "config.json -> /dev/zero", crafted(lambda o: replace_with(
        os.path.join(o, "config.json"), lambda p: os.symlink("/dev/zero", p))), False
    yield "config.json a FIFO", crafted(lambda o: replace_with(
        os.path.join(o, "config.json"), os.mkfifo)), False
    yield "tokenizer.json -> secret", crafted(lambda o: replace_with(
        os.path.join(o, "tokenizer.json"), lambda p: os.symlink(secret, p))), False
    yield "model npz -> outside", crafted(lambda o: link_out(npz(o, "model_file"),
                                                             secret + ".npz")), False
    yield "config.json 2 MB", crafted(lambda o: open(os.path.join(o, "config.json"), "a").write(
        " " * (2 << 20))), False
    yield "config.json nested 400,000 deep", crafted(lambda o: open(
        os.path.join(o, "config.json"), "w").write("[" * 400_000 + "]" * 400_000)), False
    yield "config.json wrong types", crafted(lambda o: edit(o, iter="2")), False
    yield "config.json huge model", crafted(lambda o: edit(o, model={
        **edit(o)["model"], "n_embd": 1 << 20, "n_head": 1})), False
    yield "config.json block_size 2^30", crafted(lambda o: edit(o, model={
        **edit(o)["model"], "block_size": 1 << 30})), False
    yield "config.json grad_accum 10^9 (resume)", crafted(lambda o: edit(o, train={
        **edit(o)["train"], "grad_accum": 10**9}),
        ("pretrain", "--out", run_dir, "--resume", "--max-iters", "4")), False
    yield "hostile BPE pattern", crafted(lambda o: (tokenizer_field("type", "bpe")(o),
                                                    tokenizer_field("pattern", "(a+)+$")(o),
                                                    tokenizer_field("merges", [])(o))), False
    yield "NaN weights", crafted(lambda o: nan_weights(npz(o, "model_file"))), False
    yield "weights 3e38 (finite, overflow)", crafted(
        lambda o: huge_weights(npz(o, "model_file"))), False
    yield "special token a lone surrogate", crafted(lambda o: tokenizer_field(
        "special_tokens", {"\udc80": max(json.load(open(os.path.join(
            o, "tokenizer.json")))["special_tokens"].values())})(o)), False
    yield "special token an escape sequence", crafted(lambda o: tokenizer_field(
        "special_tokens", {"\x1b]0;PWNED\x07\x1b[2J": max(json.load(open(os.path.join(
            o, "tokenizer.json")))["special_tokens"].values())})(o)), False
    yield "config.json without train (resume)", crafted(
        lambda o: json.dump({k: v for k, v in edit(o).items() if k != "train"},
                            open(os.path.join(o, "config.json"), "w")),
        ("pretrain", "--out", run_dir, "--resume", "--max-iters", "4")), False
    yield "random-bytes model", crafted(lambda o: open(npz(o, "model_file"), "wb").write(
        os.urandom(4096))), False
    yield "optim step missing (resume)", crafted(lambda o: drop_array(npz(o, "optim_file"), "step"),
                                                 ("pretrain", "--out", run_dir, "--resume")), False
    yield "metrics.jsonl -> secret (resume)", crafted(lambda o: replace_with(
        os.path.join(o, "metrics.jsonl"), lambda p: os.symlink(secret, p)),
        ("pretrain", "--out", run_dir, "--resume", "--max-iters", "4")), False
    yield "data /etc/passwd (pretrain --resume)", crafted(
        lambda o: edit(o, data="/etc/passwd"), ("pretrain", "--out", run_dir, "--resume")), True
    yield "data /etc/passwd (fewshot)", crafted(
        lambda o: edit(o, data="/etc/passwd"), ("fewshot", "--checkpoint", run_dir, "--task",
                                                task_file(root), "--shots", "0")), True
    yield "data secret not UTF-8 (pretrain --resume)", crafted(
        lambda o: (open(secret, "wb").write(b"TOP SECRET caf\xe9\n"), edit(o, data=secret)),
        ("pretrain", "--out", run_dir, "--resume")), True
    yield "--out a folder of the user's", lambda: users_folder(root) and [
        "pretrain", "--data", data, "--out", users_folder(root), *TINY], False
    yield "data /dev/zero (pretrain --resume)", crafted(
        lambda o: edit(o, data="/dev/zero"), ("pretrain", "--out", run_dir, "--resume")), False

    def split_with_data(path):
        """`classify --split test` on a fine-tuned run whose stored --data is `path()`."""
        def setup():
            out = make_classifier(root)
            config = os.path.join(out, "config.json")
            meta = json.load(open(config, encoding="utf-8"))
            meta["finetune"]["data"] = path()
            json.dump(meta, open(config, "w", encoding="utf-8"))
            return ["classify", "--checkpoint", out, "--split", "test"]
        return setup

    yield "data /etc/passwd (classify --split)", split_with_data(lambda: "/etc/passwd"), True
    yield "data secret (classify --split)", split_with_data(lambda: secret), True
    yield "data /dev/zero (classify --split)", split_with_data(lambda: "/dev/zero"), False
    yield "data FIFO (classify --split)", split_with_data(lambda: fifo(root)), False
    yield "data /proc/self/pagemap (classify --split)", split_with_data(
        lambda: "/proc/self/pagemap"), False

    def resume_classifier(**changes):
        """`finetune classify --resume` of a fine-tuned run whose config.json has `changes`."""
        def setup():
            out = make_classifier(root)
            edit(out, **changes)
            return ["finetune", "classify", "--out", out, "--resume", "--max-iters", "3"]
        return setup

    yield "3 labels for 2 classes (resume)", resume_classifier(labels=["a", "b", "c"]), False
    yield "before not numbers (resume)", resume_classifier(before={"test": "x"}), False


def link_out(path, outside):
    """Move a run's file out of it and leave a symbolic link to it in its place."""
    shutil.move(path, outside)
    os.symlink(outside, path)


def users_folder(root):
    """A folder of the user's own files, named as a run's files are, with no config.json."""
    path = os.path.join(root, "mine")
    os.makedirs(path, exist_ok=True)
    for name in ("model-000001.npz", "tokenizer.json", "metrics.jsonl", "notes.txt"):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write("mine\n")
    return path


def fifo(root):
    path = os.path.join(root, "fifo")
    if not os.path.exists(path):
        os.mkfifo(path)
    return path


def nan_weights(path):
    import numpy as onp
    with onp.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["wte"][0, 0] = onp.nan
    onp.savez(path, **arrays)


def huge_weights(path):
    """Every weight 3e38: finite, but the forward pass overflows float32."""
    import numpy as onp
    with onp.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["wte"] = onp.full_like(arrays["wte"], 3e38)
    onp.savez(path, **arrays)


def drop_array(path, name):
    import numpy as onp
    with onp.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != name}
    onp.savez(path, **arrays)


def task_file(root):
    path = os.path.join(root, "task.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"input": "a", "output": "b"}\n' * 4)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/tinyllm-bad-inputs")
    args = parser.parse_args()
    root = os.path.abspath(args.out)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    make_run(root, "warm-up")  # writes data.txt too
    secret = os.path.join(root, "secret.txt")
    planted = [secret, "/etc/passwd", "/dev/zero", secret + ".npz"]
    tracebacks = hangs = one_line = outside = by_design = 0
    results = []
    for name, setup, designed in cases(root):
        with open(secret, "w", encoding="utf-8") as f:
            f.write("TOP SECRET\n")
        command = setup()
        before = open(secret, "rb").read()
        t0 = time.perf_counter()
        code, output, opened = run(command, root)
        seconds = time.perf_counter() - t0
        lines = output.strip().splitlines()
        errors = [line for line in lines if line.startswith("Error:")]  # progress lines may come too
        last = errors[0] if errors else lines[-1] if lines else ""
        touched = sorted({p for p in opened if p in planted})
        changed = open(secret, "rb").read() != before
        tracebacks += "Traceback" in output
        hangs += code == "hang"
        one_line += code in (1, 2) and len(errors) == 1
        if touched or changed:
            by_design += designed
            outside += not designed
        leaked = "TOP SECRET" in output or "root:x:0" in output
        results.append(not leaked and "Traceback" not in output and code != "hang"
                       and (designed or not (touched or changed)))
        print(f"{name:44s} exit {code!s:4s} {seconds:5.1f} s  opened outside: {touched or '-'}"
              f"{'  CHANGED' if changed else ''}{'  LEAKED' if leaked else ''}  | {last[:110]}")
    n = len(results)
    print(f"\n{n} cases: {one_line} one-line errors (exit 1 or 2), {tracebacks} tracebacks,"
          f" {hangs} hangs; planted files outside a run opened or changed: {outside}"
          f" (plus {by_design} by design: a file the user named, or a run's stored data file, hashed and"
          " never shown)")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
