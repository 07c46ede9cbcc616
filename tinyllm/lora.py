"""LoRA: low-rank adapters for fine-tuning (Hu et al., 2021, "LoRA: Low-Rank Adaptation").

Instead of changing a weight matrix W (C_in, C_out), we learn a low-rank change to it:

    W' = W + (alpha / r) * A @ B        A (C_in, r), B (r, C_out), r << C_in, C_out

W stays frozen; only A and B train, which is r * (C_in + C_out) numbers instead of
C_in * C_out. B starts at zero, so a freshly adapted model computes exactly what the
pretrained one did; A starts random (std 1 / sqrt(C_in)) so that B gets a gradient at once.
alpha / r scales the change so that trying another rank does not need another learning rate.

Adapters sit on every linear layer of every block (attention c_attn and c_proj, MLP c_fc and
c_proj) and live in the parameter tree under "lora", mirroring the blocks:
    lora {"h": [{"attn": {"c_attn": {"a", "b"}, "c_proj": {...}}, "mlp": {"c_fc": .., "c_proj": ..}}]}
`apply_lora` folds them into the weights; on plain arrays that is the merge for inference, and
inside a traced loss it is differentiable in A and B.
"""

import math
from dataclasses import dataclass, fields

import numpy as onp

from .config import GPTConfig
from .errors import TinyLLMError
from .models import count_params, init_gpt

LORA_TARGETS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def init_adapter(rng, c_in, c_out, rank, dtype):
    """One adapter: A ~ N(0, 1/C_in), B = 0, so that A @ B = 0 at the start."""
    a = (rng.standard_normal((c_in, rank)) / math.sqrt(c_in)).astype(dtype)
    return {"a": a, "b": onp.zeros((rank, c_out), dtype=dtype)}


def init_lora(params, rank, rng):
    """Fresh adapters for every block linear layer of a GPT-shaped `params` tree."""
    adapters = []
    for block in params["h"]:
        entry = {}
        for module, name in LORA_TARGETS:
            w = block[module][name]["w"]  # (C_in, C_out)
            if rank > min(w.shape):  # A @ B cannot have a higher rank than W: r << C is the point
                raise TinyLLMError(f"--lora-rank {rank} is more than the model's width"
                                   f" ({min(w.shape)}), the highest rank its weights can have")
            entry.setdefault(module, {})[name] = init_adapter(rng, w.shape[0], w.shape[1], rank,
                                                              w.dtype)
        adapters.append(entry)
    return {"h": adapters}


def apply_lora(params, scale):
    """A params tree whose block weights include their adapters, W + scale * A @ B, and that has
    no "lora" entry. Pure: `params` is not modified. scale = alpha / rank, a Python float."""
    blocks = []
    for block, adapters in zip(params["h"], params["lora"]["h"]):
        block = {module: dict(sub) if isinstance(sub, dict) else sub for module, sub in block.items()}
        for module, name in LORA_TARGETS:
            layer, ad = dict(block[module][name]), adapters[module][name]
            layer["w"] = layer["w"] + (ad["a"] @ ad["b"]) * scale  # (C_in, r) @ (r, C_out)
            block[module][name] = layer
        blocks.append(block)
    return {**{k: v for k, v in params.items() if k not in ("h", "lora")}, "h": blocks}


def merge_lora(params, alpha, rank):
    """Fold the adapters into the weights for inference: a plain tree without "lora"."""
    if "lora" not in params:
        return params
    return apply_lora(params, alpha / rank)


def merged_gpt(params, config):
    """(params, GPTConfig) of a GPT to run: a LoRA model's adapters folded into its weights and
    its config without the LoRA fields; a plain GPT as it is."""
    if not isinstance(config, LoRAGPTConfig):
        return params, config
    return merge_lora(params, config.lora_alpha, config.lora_rank), config.gpt()


def count_lora(params):
    """Number of adapter parameters in a tree (0 without LoRA)."""
    if "lora" not in params:
        return 0
    return count_params(params["lora"])


@dataclass(frozen=True)
class LoRAGPTConfig(GPTConfig):
    """A GPT (every GPTConfig field) plus LoRA adapters (an instruction-tuned run with --lora-rank)."""

    lora_rank: int = 4  # r: the adapters' inner size
    lora_alpha: float = 8.0  # the change is scaled by alpha / r

    def validate(self):
        """GPTConfig's checks, and a rank of at least 1 (merging the adapters divides by it)."""
        super().validate()
        if self.lora_rank < 1:
            raise TinyLLMError(f"lora_rank (--lora-rank) must be at least 1 for a LoRA model,"
                               f" got {self.lora_rank}")
        return self

    def gpt(self):
        """The underlying GPTConfig."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})


def init_lora_gpt(config, rng, dtype="float32"):
    """Fresh GPT parameters with fresh adapters under "lora" (checkpoint kind "gpt-lora")."""
    params = init_gpt(config.gpt(), rng, dtype)
    params["lora"] = init_lora(params, config.lora_rank, rng)
    return params
