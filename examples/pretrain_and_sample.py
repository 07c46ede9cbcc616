"""Pretrain a tiny GPT with the library API (not the CLI) and watch it learn to write.

This is what `tinyllm pretrain` does, spelled out: pick a corpus, train a tokenizer, make a
model config, run the training loop, then sample. It builds the same model as `tinyllm pretrain`
(the defaults in tinyllm/config.py) and trains it for fewer steps: 600, four fifths of the 750
of plain `tinyllm pretrain` (about 3 minutes on 2 CPU cores).

    python examples/pretrain_and_sample.py [--data FILE] [--max-iters 600]
"""

import argparse
import os
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinyllm.config import DEFAULT_TOKENIZER, GPTConfig, TrainConfig  # noqa: E402
from tinyllm.generate import generate_text  # noqa: E402
from tinyllm.system import tune_malloc  # noqa: E402
from tinyllm.pretrain import pretrain  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="text file (default: embedded python-docs)")
    parser.add_argument("--max-iters", type=int, default=600,
                        help="training steps (default: %(default)s)")
    args = parser.parse_args()
    tune_malloc()

    # The default model of `tinyllm pretrain` (1.1M parameters, byte-level BPE tokens), trained
    # for fewer steps, evaluated less often.
    model = GPTConfig()
    train = replace(TrainConfig(), max_iters=args.max_iters, eval_interval=200, eval_iters=10)
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(model, train, out, data=args.data, tokenizer_kind=DEFAULT_TOKENIZER)

    print(f"final validation loss: {result['final']['val_loss']:.3f}")
    for prompt in ("The ", "def ", "A list"):
        completion = generate_text(result["params"], result["model_config"], result["tokenizer"],
                                   prompt, max_new_tokens=120, temperature=0.7, seed=0)
        print(f"--- {prompt!r} ->\n{prompt}{completion}\n")


if __name__ == "__main__":
    main()
