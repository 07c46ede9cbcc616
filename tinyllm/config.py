"""Hyperparameters as frozen dataclasses: sizes and flags live here, arrays live in param dicts.

Each default carries the reason it was chosen. `validate()` turns a bad setting into a one-line
`TinyLLMError` that names the flag, so the CLI never shows a traceback for a typo.

This file is the one source of the pretraining defaults: the defaults of GPTConfig and
TrainConfig, and the constants below them, are what `tinyllm pretrain` does with no flags (its
Click options read them), what examples/pretrain_and_sample.py builds, and the architecture of
the from-scratch baseline of the fine-tuning commands. Change a default here and all of them follow.
"""

import dataclasses
from dataclasses import dataclass

from .errors import TinyLLMError

# The largest values a flag, or a run's config.json, may give: more than MAX_SIZE channels,
# blocks, tokens or sequences cannot fit in memory, and MAX_STEPS steps would take centuries.
MAX_SIZE = 1 << 20  # widths, depths, vocabularies, context lengths, batch sizes, counts
MAX_STEPS = (1 << 31) - 1  # optimizer steps and step intervals


def _require_positive(obj, names):
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            flag = "--" + name.replace("_", "-")
            raise TinyLLMError(f"{flag} must be positive, got {value}")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a decoder-only transformer (GPT)."""

    vocab_size: int = 2048  # tokens the model can read and emit; set from the tokenizer
    block_size: int = 256  # context length T: 256 byte-level BPE tokens hold about 850 characters
    # of English, so a short message or an Alpaca-style record fits whole (64 characters did not)
    n_layer: int = 4  # decoder blocks; nanoGPT's CPU recipe for tiny Shakespeare uses 4
    n_head: int = 4  # attention heads per block; head size D = n_embd / n_head = 32
    n_embd: int = 128  # channels C of the residual stream
    dropout: float = 0.0  # 0 for tiny models on small data trained briefly: they underfit, not overfit
    bias: bool = False  # no biases in linear layers and layer norms: a bit faster, and as good at
    # this size (nanoGPT's CPU recipe turns them off too; GPT-2 has them: pass bias=True)
    tie_weights: bool = True  # LM head shares the token embedding matrix (Press & Wolf, 2017)
    distance_bias: bool = False  # bidirectional passes add ops.distance_bias to the attention
    # scores (symmetric ALiBi). pretrain --objective mlm turns it on: without it, the encoder's
    # attention stayed uniform and it predicted masked tokens no better than the commonest token

    def validate(self):
        """Raise TinyLLMError for sizes that cannot make a model; return self."""
        _require_positive(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise TinyLLMError(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise TinyLLMError(f"--dropout must be in [0, 1), got {self.dropout}")
        return self


@dataclass(frozen=True)
class TrainConfig:
    """How to train: batch, schedule, optimizer and bookkeeping."""

    batch_size: int = 8  # sequences per step; B * T = 2048 tokens per step at block 256
    max_iters: int = 750  # optimizer steps: under 4 min in all at the default size on 2 cores
    lr: float = 1e-3  # peak learning rate; tiny models tolerate a large one
    min_lr: float = 1e-4  # cosine decay floor, lr / 10 (Chinchilla's rule of thumb)
    warmup_iters: int = 100  # linear warm-up: Adam's moment estimates are noisy in the first steps
    weight_decay: float = 0.1  # decoupled weight decay on matrices only (AdamW)
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.99  # second-moment decay; 0.99 rather than 0.999 because batches are small
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    eval_interval: int = 250  # evaluate and checkpoint every this many steps
    eval_iters: int = 10  # batches per split in each evaluation (20,480 tokens at the defaults)
    seed: int = 1337  # everything random (init, batches, dropout) follows from it
    grad_accum: int = 1  # micro-batches of batch_size per step, gradients averaged: the step of
    # a K times larger batch in the memory of one (and, over MPI, the micro-batches of each rank)

    def validate(self):
        """Raise TinyLLMError for settings that cannot train; return self."""
        _require_positive(self, ("batch_size", "max_iters", "eval_interval", "eval_iters",
                                 "grad_accum"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TinyLLMError(
                f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        for name in ("warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise TinyLLMError(f"--{name.replace('_', '-')} must not be negative")
        return self


# Pretraining settings that are not the model's or the optimizer's: what `tinyllm pretrain` uses
# when --tokenizer, --vocab-size and --out are not given.
DEFAULT_TOKENIZER = "bpe"  # byte-level BPE: any text encodes (no unknown characters), and a
# token is 3.3 characters of English on average, so the context holds 3.3 times more text
DEFAULT_BPE_VOCAB_SIZE = 2048  # 256 bytes + 1791 merges + 1 special token: common English words
# become one token; 4096 would save only 14% more tokens for a bigger, slower output layer
DEFAULT_RUN = "runs/pretrain"  # the pretraining run that generate, fewshot and finetune read
# Staged training (Shortformer, Press, Smith and Lewis, 2021), on request (--short-context): the
# first steps read short windows, block_size / short_context times as many a step, so a step
# holds as many tokens; the last ones read whole windows and train the later positions. Off by
# default: with 64-token windows, 900 staged steps reach a lower validation loss than 750 whole
# ones (4.729 against 4.883) in 10 to 20% more time, but were no better a start for fine-tuning
# (docs/experiments.md, "Pretraining: short windows first")
DEFAULT_SHORT_CONTEXT = 0  # tokens a window in the short stage (0: whole windows throughout)
DEFAULT_SHORT_SHARE = 0.8  # the share of the steps in the short stage, when there is one


def to_dict(config):
    """A dataclass as a plain dict, for config.json."""
    return dataclasses.asdict(config)


def from_dict(cls, data, where="config"):
    """Build `cls` from a dict, ignoring unknown keys only if they are absent from the class."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TinyLLMError(f"{where}: unknown {cls.__name__} fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise TinyLLMError(f"{where}: {err}") from None
