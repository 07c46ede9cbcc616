"""Benchmark the byte-level BPE tokenizer: train to 512 tokens on ~1 MB of text, then encode it.

Run from a checkout:  python benchmarks/bench_tokenizer.py  [--megabytes 1] [--vocab-size 512]

Prints the seconds for training and for encoding, and the compression ratio (UTF-8 bytes per
token), against the targets for a 2-core CPU: training under 60 s, encoding under 10 s.
Exits with status 1 if a target is missed or the round trip fails, so CI can run it as a check.

The text is tiny Shakespeare from the shared data folder beside the repo (../shared/data) when it
is there; otherwise the help texts that ship with Python (pydoc_data.topics), which every install
has, repeated until they fill the size asked for.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so `import tinyllm` works from a checkout without installing it

from tinyllm.tokenizers import BPETokenizer  # noqa: E402  (needs the path set above)

SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
TRAIN_TARGET_S = 60.0
ENCODE_TARGET_S = 10.0


def benchmark_text(n_bytes):
    """About `n_bytes` of English text and where it came from."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            text, source = f.read(), "tinyshakespeare.txt"
    else:
        from pydoc_data.topics import topics
        text, source = "\n\n".join(topics[name] for name in sorted(topics)), "pydoc_data.topics"
    repeats = n_bytes // max(1, len(text.encode("utf-8"))) + 1
    text = (text * repeats).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")
    return text, source


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of the text (default 1)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default 512)")
    args = parser.parse_args()

    text, source = benchmark_text(int(args.megabytes * 1_000_000))
    n_bytes = len(text.encode("utf-8"))
    print(f"text: {n_bytes:,} bytes from {source}")

    tok, train_s = timed(BPETokenizer.train, text, args.vocab_size)
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
    ok = round_trip and train_s < TRAIN_TARGET_S and encode_s < ENCODE_TARGET_S
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
