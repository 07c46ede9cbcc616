"""Benchmark the byte-level BPE tokenizer: ordinary text, then words millions of bytes long.

Run from a checkout:  python benchmarks/bench_tokenizer.py  [--megabytes 1] [--vocab-size 512]
                      [--text FILE] [--sizes 10000,100000,1000000] [--reference-up-to 100000]

1. Ordinary text: train to 512 tokens on ~1 MB, then encode it. Prints the seconds and the
   compression ratio (UTF-8 bytes per token) against the targets for a 2-core CPU: training
   under 60 s, encoding under 10 s.
2. Long words: a run of letters without a space is one chunk, up to the 1,024 characters at
   which the pre-split cuts it (`tokenizers.cut_long`); the chunk encoders are called directly
   here, on longer chunks, to show how their cost grows. With the tokenizer `tinyllm pretrain` trains by default (2048 ids, on the embedded corpus),
   encodes such words of each size in --sizes, and trains a tokenizer on one such word; each
   with the fast forms (`encode_chunk`, `learn_merges`) and, up to --reference-up-to bytes (they
   take minutes beyond), the plain forms (`encode_chunk_reference`, `learn_merges_reference`),
   which cost what encoding and training cost before the fast forms (a rescan of the whole word
   per merge). The words: the corpus's English with everything but its letters taken out, a
   random DNA sequence, and one symbol repeated (a line of dashes).

Exits with status 1 if a target is missed, the round trip fails, or a fast form gives other ids
or merges than the plain one, so CI can run it as a check.
The text is the embedded default corpus (python-docs) unless --text names a UTF-8 file.
"""

import argparse
import os
import random
import re
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so `import tinyllm` works from a checkout without installing it

from tinyllm.config import DEFAULT_BPE_VOCAB_SIZE  # noqa: E402  (needs the path set above)
from tinyllm.data import load_corpus  # noqa: E402
from tinyllm.tokenizers import (BPETokenizer, encode_chunk, encode_chunk_reference,  # noqa: E402
                                learn_merges, learn_merges_reference)

TRAIN_TARGET_S = 60.0
ENCODE_TARGET_S = 10.0
REFERENCE_TRAIN_UP_TO = 10_000  # the plain trainer recounts the whole word for each of 1792 merges


def benchmark_text(n_bytes, corpus):
    """About `n_bytes` of `corpus`, repeated if it is shorter."""
    repeats = n_bytes // max(1, len(corpus.encode("utf-8"))) + 1
    return (corpus * repeats).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def ordinary_text(corpus, megabytes, vocab_size):
    """Part 1: train on and encode about `megabytes` of the corpus; True if all targets are met."""
    text = benchmark_text(int(megabytes * 1_000_000), corpus)
    n_bytes = len(text.encode("utf-8"))
    print(f"text: {n_bytes:,} bytes")
    tok, train_s = timed(BPETokenizer.train, text, vocab_size)
    label = f"train BPE to {tok.vocab_size} tokens:"
    print(f"{label:<32}{train_s:6.2f} s   (target < {TRAIN_TARGET_S:.0f} s)")

    # A fresh tokenizer from the same merges, so encoding starts with an empty chunk cache.
    fresh = BPETokenizer(tok.merges, pattern=tok.pattern)
    ids, encode_s = timed(fresh.encode, text)
    label = f"encode {n_bytes:,} bytes:"
    print(f"{label:<32}{encode_s:6.2f} s   (target < {ENCODE_TARGET_S:.0f} s)")
    print(f"compression: {n_bytes / len(ids):.2f} bytes per token ({len(ids):,} tokens)")
    round_trip = fresh.decode(ids) == text
    print(f"decode(encode(text)) == text: {round_trip}")
    return round_trip and train_s < TRAIN_TARGET_S and encode_s < ENCODE_TARGET_S


def long_words(corpus, n_bytes):
    """{name: one chunk of n_bytes}: runs of letters or symbols, which the pre-split would cut
    into pieces of 1,024 characters; the chunk encoders take them whole."""
    letters = re.sub(r"[^A-Za-z]", "", corpus)
    rng = random.Random(0)
    return {"English, letters only": benchmark_text(n_bytes, letters),
            "DNA (random ACGT)": "".join(rng.choice("ACGT") for _ in range(n_bytes)),
            "a dash repeated": "-" * n_bytes}


def seconds(fn, *args, run):
    """(result, "12.34 s") of fn(*args), or (None, "-") when `run` is false."""
    if not run:
        return None, "       -"
    result, s = timed(fn, *args)
    return result, f"{s:6.2f} s"


def encode_long_words(corpus, sizes, reference_up_to):
    """Part 2a: encode long words, fast and plain; True if both give the same ids."""
    tok = BPETokenizer.train(corpus, DEFAULT_BPE_VOCAB_SIZE)
    ranks = {pair: rank for rank, pair in enumerate(tok.merges)}
    print(f"\nencode one long word with the default tokenizer ({tok.vocab_size} ids, trained on"
          f" the corpus)\n{'word':<24}{'bytes':>11}{'fast':>10}{'plain':>10}   tokens")
    same = True
    for n_bytes in sizes:
        for name, word in long_words(corpus, n_bytes).items():
            chunk = word.encode("utf-8")
            ids, fast = seconds(encode_chunk, chunk, ranks, run=True)
            want, plain = seconds(encode_chunk_reference, chunk, ranks, run=n_bytes <= reference_up_to)
            same &= want is None or want == ids
            print(f"{name:<24}{n_bytes:>11,}{fast:>10}{plain:>10}   {len(ids):,}"
                  + ("" if want is None or want == ids else "   DIFFERENT IDS"), flush=True)
    return same


def train_on_long_words(corpus, sizes, reference_up_to):
    """Part 2b: train to the default vocabulary on one long word; True if both forms agree."""
    n_merges = DEFAULT_BPE_VOCAB_SIZE - 256
    print(f"\ntrain {n_merges} merges on one long word (English, letters only)"
          f"\n{'bytes':>11}{'fast':>10}{'plain':>10}   merges learned")
    same = True
    for n_bytes in sizes:
        chunk_counts = {long_words(corpus, n_bytes)["English, letters only"]: 1}
        merges, fast = seconds(learn_merges, chunk_counts, n_merges, run=True)
        run_plain = n_bytes <= min(reference_up_to, REFERENCE_TRAIN_UP_TO)
        want, plain = seconds(learn_merges_reference, chunk_counts, n_merges, run=run_plain)
        same &= want is None or want == merges
        print(f"{n_bytes:>11,}{fast:>10}{plain:>10}   {len(merges):,}"
              + ("" if want is None or want == merges else "   DIFFERENT MERGES"), flush=True)
    return same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of the text (default 1)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default 512)")
    parser.add_argument("--text", help="a UTF-8 text file (default: the embedded python-docs corpus)")
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="long-word lengths in bytes, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--reference-up-to", type=int, default=100_000,
                        help="time the plain forms only on words up to this many bytes (default 100000)")
    args = parser.parse_args()
    corpus = load_corpus(args.text)  # a file path, or None for the embedded default corpus
    sizes = [int(size) for size in args.sizes.split(",") if size]

    ok = ordinary_text(corpus, args.megabytes, args.vocab_size)
    ok &= encode_long_words(corpus, sizes, args.reference_up_to)
    ok &= train_on_long_words(corpus, sizes, args.reference_up_to)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
