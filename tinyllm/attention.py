"""Multi-head attention, written once and used three ways (Vaswani et al. 2017, section 3.2):

- causal self-attention in the GPT decoder (queries, keys and values from one sequence, a causal mask),
- bidirectional self-attention in the encoder (no mask, or only a padding mask),
- cross-attention in the encoder-decoder (queries from the decoder, keys and values from the encoder).

The three differ only in where q, k and v come from and in the mask, so `multi_head_attention`
takes projected q, k, v and a mask, and the two thin wrappers below do the projections.

Parameters are plain dicts of arrays: a projection is {"w": (C_in, C_out), "b": (C_out,)}, with "b"
absent when the model has no biases.
"""

import autograd.numpy as np

from .ops import attention, linear


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, D): give each head its own slice of the channels."""
    b, t, c = x.shape
    return np.transpose(np.reshape(x, (b, t, n_head, c // n_head)), (0, 2, 1, 3))


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C): the inverse of `split_heads`."""
    b, h, t, d = x.shape
    return np.reshape(np.transpose(x, (0, 2, 1, 3)), (b, t, h * d))


def multi_head_attention(q, k, v, c_proj, n_head, mask=None, dropout_p=0.0, rng=None):
    """Attend with H heads in parallel, then mix the heads with an output projection.

    q (B, Tq, C), k and v (B, Tk, C), mask broadcastable to (B, H, Tq, Tk) -> (B, Tq, C).
    """
    heads = attention(
        split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head),  # (B, H, T, D)
        mask, dropout_p, rng,
    )  # (B, H, Tq, D)
    return linear(merge_heads(heads), **c_proj)  # (B, Tq, C) -> (B, Tq, C)


def self_attention(x, c_attn, c_proj, n_head, mask=None, dropout_p=0.0, rng=None):
    """Self-attention: q, k, v all from x (B, T, C), made by one (C, 3C) matmul -> (B, T, C).

    One matmul for all three is faster than three; `np.split` (not slicing) divides the result,
    because the gradient of a slice scatters into a zero array of the full size, three times.
    """
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)  # (B, T, 3C) -> 3 x (B, T, C)
    return multi_head_attention(q, k, v, c_proj, n_head, mask, dropout_p, rng)


def cross_attention(x, memory, c_q, c_kv, c_proj, n_head, mask=None, dropout_p=0.0, rng=None):
    """Cross-attention: queries from x (B, Tq, C), keys and values from memory (B, Tk, C).

    `mask` is usually the source padding mask, so no query attends to padding in the memory.
    """
    q = linear(x, **c_q)  # (B, Tq, C)
    k, v = np.split(linear(memory, **c_kv), 2, axis=-1)  # (B, Tk, 2C) -> 2 x (B, Tk, C)
    return multi_head_attention(q, k, v, c_proj, n_head, mask, dropout_p, rng)
