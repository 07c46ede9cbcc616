"""Models as pure functions over dicts of arrays: GPT (decoder-only) init, forward and loss,
and the same parameter tree run bidirectionally.

Parameter tree of a GPT (shapes with V vocab, T block size, C channels, L layers):
    wte (V, C)            token embedding
    wpe (T, C)            learned position embedding
    h   [L blocks]        each {"ln_1", "attn": {"c_attn", "c_proj"}, "ln_2", "mlp": {"c_fc", "c_proj"}}
    ln_f {"g", "b"}       final layer norm
    lm_head {"w": (C, V)} only when the head is not tied to wte
A linear layer is {"w": (C_in, C_out), "b": (C_out,)} and a layer norm {"g": (C,), "b": (C,)};
the "b" entries are absent when config.bias is False.

`gpt_reference`, at the end, is the whole forward pass on one screen in plain reference ops;
the functions before it are the same maths in pieces, on the fused ops, with dropout.
"""

import math

import autograd.numpy as np
import numpy as onp
from autograd.tracer import getval

from .blocks import encoder_block, gpt_block
from .errors import TinyLLMError
from .ops import (attention_reference, causal_mask, cross_entropy, distance_bias, dropout,
                  embedding, gelu_reference, layer_norm, layer_norm_reference, linear,
                  linear_reference, padding_mask)
from .tree import tree_leaves

INIT_STD = 0.02  # GPT-2's initialisation scale for every weight matrix and embedding


# ----------------------------------------------------------------------------- initialisation


def init_linear(rng, c_in, c_out, bias, std=INIT_STD, dtype="float32"):
    """A linear layer: weights ~ N(0, std^2), zero bias."""
    layer = {"w": (rng.standard_normal((c_in, c_out)) * std).astype(dtype)}
    if bias:
        layer["b"] = onp.zeros(c_out, dtype=dtype)
    return layer


def init_layer_norm(c, bias, dtype="float32"):
    """A layer norm that starts as the identity on normalised input: gain 1, shift 0."""
    norm = {"g": onp.ones(c, dtype=dtype)}
    if bias:
        norm["b"] = onp.zeros(c, dtype=dtype)
    return norm


def init_gpt_block(rng, config, dtype="float32"):
    """One GPT block's parameters."""
    c, bias = config.n_embd, config.bias
    # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 L), since each
    # of the 2 L residual additions adds variance and the stream should not grow with depth.
    proj_std = INIT_STD / math.sqrt(2 * config.n_layer)
    return {
        "ln_1": init_layer_norm(c, bias, dtype),
        "attn": {
            "c_attn": init_linear(rng, c, 3 * c, bias, dtype=dtype),
            "c_proj": init_linear(rng, c, c, bias, std=proj_std, dtype=dtype),
        },
        "ln_2": init_layer_norm(c, bias, dtype),
        "mlp": {
            "c_fc": init_linear(rng, c, 4 * c, bias, dtype=dtype),
            "c_proj": init_linear(rng, 4 * c, c, bias, std=proj_std, dtype=dtype),
        },
    }


def init_gpt(config, rng, dtype="float32"):
    """Fresh GPT parameters for `config`, drawn from the numpy Generator `rng`."""
    config.validate()
    v, t, c = config.vocab_size, config.block_size, config.n_embd
    params = {
        "wte": (rng.standard_normal((v, c)) * INIT_STD).astype(dtype),
        "wpe": (rng.standard_normal((t, c)) * INIT_STD).astype(dtype),
        "h": [init_gpt_block(rng, config, dtype) for _ in range(config.n_layer)],
        "ln_f": init_layer_norm(c, config.bias, dtype),
    }
    if not config.tie_weights:
        params["lm_head"] = {"w": (rng.standard_normal((c, v)) * INIT_STD).astype(dtype)}
    return params


def check_finite_outputs(values):
    """Raise a one-line TinyLLMError if a model's outputs (probabilities, vectors) hold NaN or
    infinity. Loading refuses weights that are not finite, but finite weights can still overflow
    float32 on the way (an altered or corrupted checkpoint), and a NaN would otherwise be printed
    as a probability, a ranking or a vector."""
    if not onp.isfinite(values).all():
        raise TinyLLMError("the model's outputs are not finite numbers (its weights overflow):"
                           " the checkpoint is corrupted or was altered")


def count_params(params):
    """Total number of scalars in a parameter tree."""
    return sum(int(onp.size(leaf)) for leaf in tree_leaves(params))


# ----------------------------------------------------------------------------- forward and loss


def embed(params, ids, config, rng=None):
    """Token plus learned position embeddings: ids (B, T) -> (B, T, C)."""
    t = ids.shape[1]
    if t > config.block_size:
        raise TinyLLMError(f"sequence of {t} tokens is longer than block_size {config.block_size}")
    x = embedding(params["wte"], ids) + params["wpe"][:t]  # (B, T, C) + (T, C) -> (B, T, C)
    return dropout(x, config.dropout, rng)


def gpt_hidden(params, ids, config, rng=None):
    """The final-normed residual stream of a GPT: token ids (B, T) -> hidden states (B, T, C).

    `rng` turns dropout on (training); None means evaluation.
    """
    x = embed(params, ids, config, rng)  # (B, T, C)
    mask = causal_mask(ids.shape[1], getval(params["wte"]).dtype)  # (T, T), broadcast over (B, H)
    for block in params["h"]:
        x = gpt_block(x, **block, n_head=config.n_head, mask=mask,
                      dropout_p=config.dropout, rng=rng)  # (B, T, C)
    return layer_norm(x, **params["ln_f"])  # (B, T, C)


def encoder_mask(config, t, dtype, valid=None):
    """The additive attention mask of a bidirectional pass over T tokens, or None for no mask.

    Padding (`valid` (B, T) of 0/1) is hidden: (B, 1, 1, T). A model pretrained with
    config.distance_bias also has its distance bias (`ops.distance_bias`, (H, T, T)) in every
    bidirectional pass, in pretraining, fine-tuning, `fill` and `embed` alike; the sum of both
    is (B, H, T, T).
    """
    mask = None if valid is None else padding_mask(valid, dtype)  # (B, 1, 1, T)
    if config.distance_bias:
        bias = distance_bias(config.n_head, t, dtype)  # (H, T, T)
        mask = bias if mask is None else mask + bias
    return mask


def bidirectional_hidden(params, ids, config, valid=None, rng=None):
    """The GPT parameter tree run bidirectionally (as an encoder): ids (B, T) -> (B, T, C).

    The only difference from `gpt_hidden` is the mask (`encoder_mask`): no causal mask, so each
    position sees the whole sequence; `valid` (B, T) of 0/1 marks real tokens, and padding is
    hidden from attention.
    """
    x = embed(params, ids, config, rng)  # (B, T, C)
    mask = encoder_mask(config, ids.shape[1], getval(params["wte"]).dtype, valid)
    for block in params["h"]:
        x = encoder_block(x, **block, n_head=config.n_head, mask=mask,
                          dropout_p=config.dropout, rng=rng)  # (B, T, C)
    return layer_norm(x, **params["ln_f"])  # (B, T, C)


def lm_head_weight(params):
    """The (C, V) matrix that turns hidden states into logits: wte^T when tied."""
    if "lm_head" in params:
        return params["lm_head"]["w"]
    return np.transpose(params["wte"])  # (V, C) -> (C, V)


def gpt_forward(params, ids, config, rng=None):
    """Next-token logits: token ids (B, T) -> (B, T, V)."""
    return linear(gpt_hidden(params, ids, config, rng), lm_head_weight(params))


def gpt_loss(params, ids, targets, config, rng=None, mask=None):
    """Mean next-token cross-entropy: ids (B, T), targets (B, T), mask (B, T) or None -> scalar.

    The targets are the inputs shifted left by one: the text makes its own labels.
    """
    logits = gpt_forward(params, ids, config, rng)  # (B, T, V)
    flat_mask = None if mask is None else np.reshape(mask, (-1,))
    return cross_entropy(np.reshape(logits, (-1, logits.shape[-1])), np.reshape(targets, (-1,)),
                         flat_mask)


# ----------------------------------------------------------------------------- the whole model on one screen


def gpt_reference(params, ids, config):
    """The GPT forward pass on one screen, from the plain `*_reference` ops (no dropout):
    token ids (B, T) -> logits (B, T, V), equal to `gpt_forward` in value and gradient (a test
    checks both). Read this first; the functions above are the same maths split into pieces
    and run on the fused ops.
    """
    b, t = ids.shape
    n_head, c = config.n_head, config.n_embd
    d = c // n_head  # head size D
    x = params["wte"][ids] + params["wpe"][:t]  # (B, T, C): token + position embeddings
    mask = causal_mask(t, getval(params["wte"]).dtype)  # (T, T): 0 on and below the diagonal

    def heads(a):  # (B, T, C) -> (B, H, T, D)
        return np.transpose(np.reshape(a, (b, t, n_head, d)), (0, 2, 1, 3))

    for block in params["h"]:
        # causal self-attention, pre-LN, residual
        qkv = linear_reference(layer_norm_reference(x, **block["ln_1"]), **block["attn"]["c_attn"])
        q, k, v = np.split(qkv, 3, axis=-1)  # (B, T, 3C) -> 3 x (B, T, C)
        a = attention_reference(heads(q), heads(k), heads(v), mask)  # (B, H, T, D)
        a = np.reshape(np.transpose(a, (0, 2, 1, 3)), (b, t, c))  # (B, H, T, D) -> (B, T, C)
        x = x + linear_reference(a, **block["attn"]["c_proj"])
        # position-wise MLP, pre-LN, residual: C -> 4C -> GELU -> C
        h = gelu_reference(linear_reference(layer_norm_reference(x, **block["ln_2"]),
                                            **block["mlp"]["c_fc"]))  # (B, T, 4C)
        x = x + linear_reference(h, **block["mlp"]["c_proj"])  # (B, T, C)
    x = layer_norm_reference(x, **params["ln_f"])  # (B, T, C)
    return linear_reference(x, lm_head_weight(params))  # (B, T, C) @ (C, V) -> (B, T, V)
