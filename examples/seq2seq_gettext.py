"""Train the encoder-decoder on real parallel text: English UI strings and their French translations.

No download is needed: Linux systems carry the translations of their programs as gettext message
catalogs (/usr/share/locale/fr/LC_MESSAGES/*.mo). This script extracts a few thousand short
(English, French) pairs from the catalogs present into a TSV in a temporary directory (the text
belongs to those programs' translators: it is read here, never shipped with tinyllm), trains a
small model for a few minutes, and prints the loss falling, held-out exact match and BLEU-4,
and a few translations.

    python examples/seq2seq_gettext.py [--pairs 3000] [--max-iters 1500]

A character-level model this small, trained for minutes on 3,000 pairs, learns the frequent
words and the shape of French UI strings; do not expect good translations. One run (9,249 usable
pairs found; 2,700 to train, 300 held out; 0.94M parameters; 5m44s on a loaded 2-core machine):
held-out loss 4.57 -> 2.77 (step 250) -> 2.17 (step 1000) -> 2.15 (step 1500), exact match 0.3%,
BLEU-4 0.0 (no 4-gram of any output matched), outputs such as 'Adobe FrameMaker font' ->
'document Adobe Mindbar' (reference 'police Adobe FrameMaker').
"""

import argparse
import glob
import gettext
import os
import re
import sys
import tempfile

import numpy as onp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # a checkout

from tinyllm.bleu import corpus_bleu, exact_match  # noqa: E402
from tinyllm.config import TrainConfig  # noqa: E402
from tinyllm.decoding import translate_texts  # noqa: E402
from tinyllm.seq2seq import Seq2SeqConfig  # noqa: E402
from tinyllm.seq2seq_run import train_seq2seq  # noqa: E402
from tinyllm.seq2seq_data import load_pairs  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.train import read_metrics  # noqa: E402

CATALOGS = "/usr/share/locale/fr/LC_MESSAGES/*.mo"
PLAIN = re.compile(r"[A-Za-z][A-Za-z ,.'-]*")  # words and light punctuation: no %s, paths, markup


def extract_pairs(pattern=CATALOGS, max_len=30):
    """{english: french} for every short, plain, single-line message of the catalogs that has at
    least two words and is not left as it was (names such as 'Akuku' would only test copying)."""
    pairs = {}
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr
        except (OSError, gettext.error):
            continue  # an unreadable catalog: use the others
        for english, french in catalog.items():
            if (isinstance(english, str) and isinstance(french, str) and french
                    and PLAIN.fullmatch(english) and len(english) <= max_len
                    and len(french) <= max_len + 10 and "\t" not in french and "\n" not in french
                    and " " in english and english.lower() != french.lower()):
                pairs.setdefault(english, french)
    return pairs


def write_tsv(pairs, n, directory, seed=0):
    """A random sample of n pairs (sorted afterwards, so the held-out tenth spans the alphabet)."""
    keys = sorted(pairs)
    chosen = sorted(onp.random.default_rng(seed).choice(len(keys), size=min(n, len(keys)),
                                                        replace=False))
    path = os.path.join(directory, "en_fr.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{keys[i]}\t{pairs[keys[i]]}\n" for i in chosen)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3000,
                        help="pairs to extract (default: %(default)s)")
    parser.add_argument("--max-iters", type=int, default=1500,
                        help="training steps (default: %(default)s)")
    args = parser.parse_args()
    tune_malloc()
    pairs = extract_pairs()
    if len(pairs) < 100:
        raise SystemExit(f"only {len(pairs)} usable pairs in {CATALOGS}: install some French locales")
    with tempfile.TemporaryDirectory() as tmp:
        tsv = write_tsv(pairs, args.pairs, tmp)
        print(f"{len(pairs):,} usable pairs in the catalogs; training on a sample of {args.pairs:,}")
        model = Seq2SeqConfig(block_size=48, n_layer=2, n_head=4, n_embd=128)
        train = TrainConfig(batch_size=32, max_iters=args.max_iters, lr=2e-3, min_lr=2e-4,
                            warmup_iters=100, eval_interval=max(1, args.max_iters // 6),
                            eval_iters=5, seed=1337)
        out = os.path.join(tmp, "run")
        result = train_seq2seq(model, train, out, data=tsv, eval_examples=300)
        losses = [(m["iter"], m["val_loss"]) for m in read_metrics(out)]
        print("held-out loss by step:", ", ".join(f"{it}: {loss:.3f}" for it, loss in losses))
        _, held = load_pairs(tsv)
        sources, references = [p.source for p in held], [p.target for p in held]
        outputs = translate_texts(result["params"], result["model_config"], result["tokenizer"],
                                  sources)
        print(f"{len(held)} held-out pairs (greedy): exact match"
              f" {100 * exact_match(outputs, references):.1f}%, BLEU-4 {corpus_bleu(outputs, references):.1f}")
        beams = translate_texts(result["params"], result["model_config"], result["tokenizer"],
                                sources[:8], beam_size=4, alpha=0.6)
        for source, greedy, beam, reference in zip(sources, outputs, beams, references):
            print(f"  {source!r}\n    greedy: {greedy!r}\n    beam 4: {beam!r}\n"
                  f"    reference: {reference!r}")


if __name__ == "__main__":
    main()
