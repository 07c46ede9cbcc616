"""How strong is the test suite? Put small, realistic bugs into the package one at a time and see
which ones the suite catches.

    python benchmarks/mutation_check.py                 # every mutant, about 5 to 15 minutes
    python benchmarks/mutation_check.py --list          # the mutants, without running anything
    python benchmarks/mutation_check.py --check         # does every mutant's pattern still apply?
    python benchmarks/mutation_check.py --only bpe-latest-rank-first   # one mutant (repeatable)

The working tree is never touched: the tree (tinyllm/, tests/, examples/, ...) is copied once into
a temporary directory, and each mutant edits that copy, runs `python -m pytest -x -q` there, and
puts the file back (tests/test_wiring.py and tests/test_overflow.py run first, as they catch most
mutants fastest; tests/test_mutation_check.py, which checks the patterns, is left out). A mutant
is *caught* if the suite fails (or runs past --timeout), *survived* if every test passes. The
unmutated copy is run first and must pass, or nothing is reported.

A mutant is a literal edit: `old` must occur exactly once in its file, so a mutant whose code has
been rewritten is reported as "stale" (fix its pattern) rather than silently skipped. Each one is
a bug somebody could really write, and each was checked to change behaviour.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                     "runs", "*.egg-info", "build", "dist", ".venv")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    bug: str  # what the bug does, in a few words


MUTANTS = [
    # --- the 16 kinds of bug of issue 10, which once passed every test
    Mutant("softmax-without-max-shift", "tinyllm/ops.py",
           "e = np.exp(x - getval(x).max(axis=axis, keepdims=True))", "e = np.exp(x)",
           "softmax overflows to NaN at logits of 1000 (float64) or 100 (float32)"),
    Mutant("attention-weights-without-max-shift", "tinyllm/ops.py",
           "    p -= p.max(axis=-1, keepdims=True)", "    p -= 0.0",
           "fused attention weights are NaN once scores pass ~88 in float32"),
    Mutant("attention-dropout-without-rescale", "tinyllm/ops.py",
           "keep *= 1.0 / (1.0 - dropout_p)", "keep *= 1.0",
           "attention dropout does not scale kept weights by 1/(1-p)"),
    Mutant("train-step-beta1-as-beta2", "tinyllm/train.py",
           "tc.beta1, tc.beta2,", "tc.beta1, tc.beta1,",
           "train_step passes beta1 where beta2 belongs"),
    Mutant("train-step-never-clips", "tinyllm/train.py",
           "grad_scale=clip_scale(norm, tc.grad_clip)", "grad_scale=1.0",
           "train_step ignores --grad-clip"),
    Mutant("train-step-ignores-weight-decay", "tinyllm/train.py",
           "tc.weight_decay, grad_scale=", "grad_scale=",
           "train_step uses AdamW's default decay, not the configured one"),
    Mutant("bpe-latest-rank-first", "tinyllm/tokenizers.py",
           "rank = heapq.heappop(heap)",
           "rank = heap.pop()",
           "BPE encoding merges the rank listed last, not the lowest-ranked pair present"),
    Mutant("lora-instruct-trains-with-alpha", "tinyllm/instruct_run.py",
           "scale = config.lora_alpha / config.lora_rank if",
           "scale = config.lora_alpha if",
           "LoRA instruction tuning trains with scale alpha; generation merges with alpha/r"),
    Mutant("instruct-loss-without-mask", "tinyllm/instruct_run.py",
           "gpt_loss(p, x, y, gpt_config, rng, mask=m)",
           "gpt_loss(p, x, y, gpt_config, rng)",
           "instruction fine-tuning counts prompt and padding tokens in the loss"),
    Mutant("fewshot-query-among-its-demos", "tinyllm/fewshot.py",
           "others = onp.delete(onp.arange(n_records), q)", "others = onp.arange(n_records)",
           "a few-shot query can see its own record among the demonstrations"),
    Mutant("beam-length-penalty-multiplies", "tinyllm/decoding.py",
           "h[1] / length_penalty(", "h[1] * length_penalty(",
           "beam search multiplies by the length penalty instead of dividing"),
    Mutant("seq2seq-loss-ignores-smoothing", "tinyllm/seq2seq.py",
           "onp.reshape(tgt_mask, (-1,)), smoothing)", "onp.reshape(tgt_mask, (-1,)), 0.0)",
           "seq2seq_loss ignores its label smoothing"),
    Mutant("gpt-block-mlp-reads-ln-1", "tinyllm/blocks.py",
           "feed_forward(layer_norm(x, **ln_2)", "feed_forward(layer_norm(x, **ln_1)",
           "the GPT block normalises the MLP input with ln_1 (ln_2 gets zero gradient)"),
    Mutant("icl-score-inputs-as-targets", "tinyllm/fewshot.py",
           "x, y = windows[:, :-1], windows[:, 1:]", "x, y = windows[:, :-1], windows[:, :-1]",
           "the in-context learning score predicts the inputs instead of the next tokens"),
    Mutant("beam-size-2-is-greedy", "tinyllm/decoding.py",
           "if beam_size > 1:", "if beam_size > 2:",
           "--beam-size 2 silently decodes greedily"),
    Mutant("evaluation-with-dropout", "tinyllm/train.py",
           "stack_batches(chunk), None)", "stack_batches(chunk), rng)",
           "evaluation runs with dropout on"),
    # --- more guards against overflow
    Mutant("log-softmax-without-max-shift", "tinyllm/ops.py",
           "shifted = x - getval(x).max(axis=axis, keepdims=True)", "shifted = x",
           "log_softmax overflows at large logits"),
    Mutant("cross-entropy-without-max-shift", "tinyllm/ops.py",
           "logp = lv - lv.max(axis=-1, keepdims=True)", "logp = lv + 0.0",
           "fused cross-entropy overflows at large logits"),
    # --- other plausible bugs
    Mutant("dropout-without-rescale", "tinyllm/ops.py",
           "x * (keep.astype(getval(x).dtype) * (1.0 / (1.0 - p)))",
           "x * keep.astype(getval(x).dtype)",
           "residual dropout does not scale the kept values by 1/(1-p)"),
    Mutant("causal-mask-hides-the-diagonal", "tinyllm/ops.py",
           "k=1)  # 1 strictly above the diagonal", "k=0)  # 1 strictly above the diagonal",
           "a token cannot attend to itself"),
    Mutant("seq2seq-mlp-reads-ln-2", "tinyllm/seq2seq.py",
           "feed_forward(layer_norm(x, **ln_3)", "feed_forward(layer_norm(x, **ln_2)",
           "the seq2seq decoder block normalises the MLP input with ln_2 (ln_3 gets no gradient)"),
    Mutant("gpt-loss-ignores-mask", "tinyllm/models.py",
           "flat_mask = None if mask is None else np.reshape(mask, (-1,))", "flat_mask = None",
           "gpt_loss counts every position whatever the mask"),
    Mutant("classifier-lora-scale-alpha", "tinyllm/finetune.py",
           "apply_lora(params, config.lora_alpha / config.lora_rank)",
           "apply_lora(params, config.lora_alpha)",
           "the LoRA classifier runs its adapters at scale alpha, not alpha/r"),
    Mutant("last-pooling-off-by-one", "tinyllm/finetune.py",
           "last = valid.sum(axis=1).astype(int) - 1", "last = valid.sum(axis=1).astype(int) - 2",
           "classification reads the token before the last real one"),
    Mutant("adamw-without-bias-correction", "tinyllm/optim.py",
           "bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step", "bc1, bc2 = 1.0, 1.0",
           "AdamW forgets the bias corrections of its moments"),
    Mutant("warmup-starts-at-peak", "tinyllm/optim.py",
           "return lr * (it + 1) / warmup_iters", "return lr",
           "no learning-rate warm-up"),
    Mutant("greedy-decoding-ignores-source-padding", "tinyllm/decoding.py",
           "memory = encoder_forward(params, src, config, src_valid)",
           "memory = encoder_forward(params, src, config)",
           "batched greedy decoding lets the encoder attend to padding"),
    Mutant("cross-attention-ignores-source-padding", "tinyllm/seq2seq.py",
           "memory_mask = None if src_valid is None else padding_mask(src_valid, dtype)",
           "memory_mask = None",
           "the decoder's cross-attention reads the source padding"),
    Mutant("lora-merge-scale-alpha", "tinyllm/lora.py",
           "return apply_lora(params, alpha / rank)", "return apply_lora(params, alpha)",
           "merged LoRA weights use scale alpha, not alpha/r"),
    Mutant("top-k-keeps-one-more", "tinyllm/generate.py",
           "kth = onp.sort(logits)[-k]", "kth = onp.sort(logits)[-k - 1]",
           "top-k sampling keeps k + 1 tokens"),
    Mutant("icl-score-positions-swapped", "tinyllm/fewshot.py",
           "return max(1, round(late / 10)), late", "return late, max(1, round(late / 10))",
           "the ICL score subtracts late from early (its sign flips)"),
    Mutant("fewshot-scores-half-the-queries", "tinyllm/fewshot.py",
           "queries = [int(i) for i in rng.permutation(n)[:n_queries or n]]",
           "queries = [int(i) for i in rng.permutation(n)[:n_queries or n]][:max(1, n // 2)]",
           "few-shot evaluation scores only half of the queries it was asked for"),
    Mutant("split-ignores-split-seed", "tinyllm/finetune_runs.py",
           "return self.seed if self.split_seed is None else self.split_seed",
           "return self.seed",
           "--split-seed does nothing: runs of other --seeds are split (and scored) apart"),
    Mutant("ensemble-reads-the-first-run-only", "tinyllm/classify_run.py",
           "    return total / len(members)",
           "    return classify_texts(members[0].params, members[0].config, members[0].tokenizer,"
           " texts, members[0].max_windows)",
           "tinyllm classify with several --checkpoints prints the first run's probabilities"),
    Mutant("split-parsed-before-its-sha256-check", "tinyllm/classify_run.py",
           'if meta.get("data_files_sha256", {}) != data_fingerprints(s):',
           "if False:",
           "classify --split parses whatever file a run directory names, unchecked"),
    # --- staged pretraining (--short-context), 2026-12-01
    Mutant("short-stage-one-step-too-long", "tinyllm/pretrain.py",
           "        if it < steps:", "        if it <= steps:",
           "the short stage of --short-context runs one step past the steps config.json keeps"),
    Mutant("resume-restages-from-the-flags", "tinyllm/pretrain.py",
           "        stage = stored_short_stage(ckpt.meta, out_dir, ckpt.model_config.block_size)",
           "        stage = short_stage(request.short_context, request.short_share,"
           " ckpt.model_config.block_size, ckpt.iter + 1)",
           "pretrain --resume takes the stage from this command's flags, not the run's own"),
    Mutant("distance-bias-without-floor", "tinyllm/ops.py",
           "    bias = onp.maximum(-slopes[:, None, None] * offsets,"
           " DISTANCE_BIAS_FLOOR)  # (H, T, T)",
           "    bias = -slopes[:, None, None] * offsets  # (H, T, T)",
           "the encoder's distance bias ramps to -255, and exp() makes slow subnormal floats"),
    Mutant("bpe-encodes-long-runs-whole", "tinyllm/tokenizers.py",
           "    if max(map(len, chunks), default=0) <= MAX_CHUNK_CHARACTERS:",
           "    if True:",
           "a line of millions of letters is one chunk: a gigabyte to encode"),
    Mutant("stored-data-hashed-to-its-end", "tinyllm/finetune_runs.py",
           "            digest, left = hashlib.sha256(), size",
           "            digest, left = hashlib.sha256(), float(\"inf\")",
           "a stored data path like /proc/self/pagemap is read for hundreds of gigabytes"),
    Mutant("out-dir-of-the-users-files-used", "tinyllm/rundir.py",
           "    if not has_run and not force and first_save_leftovers(out_dir) is None:",
           "    if False:",
           "a new run in a folder of the user's own files overwrites and deletes them"),
    Mutant("long-evaluation-silent", "tinyllm/train.py",
           "on_batches=counting.update)", "on_batches=None)",
           "an evaluation of thousands of batches runs minutes with no line"),
    Mutant("long-step-silent", "tinyllm/train.py",
           "        counting.update(done)", "        pass",
           "a step of a million micro-batches runs hours with no line"),
]


def copy_tree(root, dest):
    """Copy the repository (without .git, caches and runs) to dest; return dest."""
    shutil.copytree(root, dest, ignore=COPY_IGNORE)
    return dest


# Run first, because they catch most mutants in seconds; the whole suite runs if they pass.
FAST_FIRST = ("tests/test_wiring.py", "tests/test_overflow.py")
# Left out of every suite run here: it checks the mutants' patterns, which a planted bug removes.
NOT_RUN_ON_MUTANTS = ("tests/test_mutation_check.py",)


def default_sigint():
    """In the test process, Ctrl-C raises KeyboardInterrupt again: a shell starts background jobs
    with SIGINT ignored, which the tests that send themselves a Ctrl-C would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_suite(tree, timeout, paths=("tests",)):
    """Run the tests `paths` in `tree`: (passed, seconds, first failing test or a reason)."""
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           *(f"--ignore={path}" for path in NOT_RUN_ON_MUTANTS), *paths]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=default_sigint)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, f"timed out after {timeout} s"
    seconds = time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
    if proc.returncode == 0:
        return True, seconds, ""
    tail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return False, seconds, failed[0] if failed else tail


def pattern_applies(root, mutant):
    """True if the mutant's `old` text occurs exactly once in its file under `root`."""
    path = os.path.join(root, mutant.path)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return f.read().count(mutant.old) == 1


def apply_mutant(tree, mutant):
    """Edit the copy; return the original text, or None if the pattern is not there exactly once."""
    path = os.path.join(tree, mutant.path)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        original = f.read()
    if original.count(mutant.old) != 1:
        return None
    with open(path, "w", encoding="utf-8") as f:
        f.write(original.replace(mutant.old, mutant.new))
    return original


def check(tree, mutant, timeout):
    """'caught', 'survived' or 'stale', with the seconds taken and the test that failed."""
    original = apply_mutant(tree, mutant)
    if original is None:
        return "stale", 0.0, f"pattern not found once in {mutant.path}"
    try:
        passed, seconds, detail = run_suite(tree, timeout, FAST_FIRST)
        if passed:  # the whole suite decides
            passed, more, detail = run_suite(tree, timeout)
            seconds += more
    finally:
        with open(os.path.join(tree, mutant.path), "w", encoding="utf-8") as f:
            f.write(original)
    return ("survived" if passed else "caught"), seconds, detail


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=ROOT, help="repository to copy (default: this one)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per suite run")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant's pattern occurs once, then exit")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutant(s): {', '.join(sorted(unknown))} (see --list)")
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.path:24s} {m.bug}")
        return
    if args.check:
        stale = [m.name for m in mutants if not pattern_applies(args.root, m)]
        print(f"{len(mutants) - len(stale)} of {len(mutants)} patterns apply"
              + (f"; stale: {', '.join(stale)}" if stale else ""))
        sys.exit(1 if stale else 0)
    with tempfile.TemporaryDirectory(prefix="tinyllm-mutants-") as tmp:
        tree = copy_tree(args.root, os.path.join(tmp, "tree"))
        passed, seconds, detail = run_suite(tree, args.timeout)
        if not passed:  # once more: a test that depends on timing can fail on a busy machine
            print(f"the unmutated suite failed ({detail}); running it again", flush=True)
            passed, seconds, detail = run_suite(tree, args.timeout)
        if not passed:
            sys.exit(f"the unmutated suite fails ({detail}): fix that first")
        print(f"unmutated suite passes ({seconds:.0f} s); {len(mutants)} mutants, one at a time\n",
              flush=True)
        outcomes = []
        for m in mutants:
            outcome, seconds, detail = check(tree, m, args.timeout)
            outcomes.append(outcome)
            print(f"{outcome:8s} {m.name:40s} {seconds:5.0f} s  {detail}", flush=True)
    caught, stale = outcomes.count("caught"), outcomes.count("stale")
    print(f"\ncaught {caught} of {len(outcomes) - stale} mutants"
          + (f" ({stale} stale: their pattern is gone, fix them)" if stale else ""))
    sys.exit(0 if caught == len(outcomes) else 1)


if __name__ == "__main__":
    main()
