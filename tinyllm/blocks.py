"""Transformer blocks: the feed-forward MLP, the pre-LayerNorm GPT block and the encoder block.

A block reads the residual stream x (B, T, C) and adds to it twice:
    x = x + attention(layer_norm(x))    # tokens exchange information
    x = x + mlp(layer_norm(x))          # each token computes on what it gathered
Normalising before each sub-layer ("pre-LN", as in GPT-2; Xiong et al. 2020) keeps the residual
path clean, which is why such models train without the careful warm-up post-LN needs.
"""

from .attention import self_attention
from .ops import dropout, gelu, layer_norm, linear


def feed_forward(x, c_fc, c_proj, dropout_p=0.0, rng=None):
    """Position-wise feed-forward net: C -> 4C -> GELU -> C. (B, T, C) -> (B, T, C)."""
    h = gelu(linear(x, **c_fc))  # (B, T, C) -> (B, T, 4C)
    return dropout(linear(h, **c_proj), dropout_p, rng)  # (B, T, 4C) -> (B, T, C)


def gpt_block(x, ln_1, attn, ln_2, mlp, n_head, mask, dropout_p=0.0, rng=None):
    """One GPT block: causal self-attention then MLP, each pre-normed and residual. (B, T, C)."""
    a = self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, mask=mask,
                       dropout_p=dropout_p, rng=rng)  # (B, T, C)
    x = x + dropout(a, dropout_p, rng)
    return x + feed_forward(layer_norm(x, **ln_2), **mlp, dropout_p=dropout_p, rng=rng)


def encoder_block(x, ln_1, attn, ln_2, mlp, n_head, mask=None, dropout_p=0.0, rng=None):
    """One encoder block (Vaswani et al. 2017, pre-LN): bidirectional self-attention, then MLP.

    It is the GPT block's computation with another mask: no causal mask, so every token sees
    every other token. `mask` is additive or None: padding hidden, (B, 1, 1, T), and for a model
    pretrained with a distance bias that bias too, (B, H, T, T) (see `models.encoder_mask`).
    """
    return gpt_block(x, ln_1, attn, ln_2, mlp, n_head, mask, dropout_p, rng)
