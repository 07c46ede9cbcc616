"""The fast training path of a GPT: its forward and backward passes written out by hand in numpy.

The reference model (models.py on blocks.py, attention.py and ops.py) is how a reader learns a
GPT, and autograd derives its backward pass by recording every numpy call on a tape. This module
computes the same loss and the same gradients for pretraining with no tape at all, the way llm.c
writes a GPT in C: each layer has a `*_forward` that returns its output and a cache, and a
`*_backward` that turns dL/d(output) into dL/d(input) and the layer's parameter gradients. In
PyTorch terms the cache is what a `torch.autograd.Function` keeps with `ctx.save_for_backward`;
here it is a plain tuple handed from the forward to the backward call. Each backward's derivation
is in its docstring. What the tape costs and this path does not: a boxed array and a node per
numpy call, a zero-filled gradient tree at every dict or list lookup, and the float64 that some
autograd VJPs bring in.

What it covers: the mean next-token cross-entropy of `models.gpt_loss` (no loss mask), with or
without biases, with a tied or an untied LM head, and dropout 0 (`supports(config)`). Anything
else (dropout, loss masks, LoRA, classifiers, the encoder) takes the reference path through
autograd. `tests/test_fast.py` checks that the loss and every gradient equal autograd's on the
reference model, over random shapes, in float64 to 1e-10 and in float32 to its rounding.

Shapes: B batch, T time, C channels, H heads, D head size, V vocabulary, N = B T rows. Every
activation is kept 2-D, (N, C), so that each linear layer and its two gradients are single 2-D
matmuls (which use both cores); only attention works on (B, H, T, D).

Speed rules followed throughout (see ops.py for the measurements behind them): constants are
Python floats (a numpy float64 scalar would promote float32 arrays to float64), elementwise work
is done in place where the input is no longer needed, and `on_two_cores` splits the elementwise
passes over the attention weights and the MLP activations between the two cores.
"""

import math

import numpy as onp

from .ops import GELU_C, LN_EPS, MASK_VALUE, on_two_cores

GELU_A = 0.044715  # the cubic coefficient of GELU's tanh form (Hendrycks & Gimpel, 2016)


def supports(config):
    """True if the fast path computes exactly this model's pretraining loss (dropout off)."""
    return config.dropout == 0.0


# ----------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None):
    """y = x W + b: (N, C_in) -> (N, C_out). The cache is x itself (the caller keeps it)."""
    y = x @ w  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w, with_bias):
    """Gradients of y = x W + b: returns (dx, dW, db or None).

    y_nj = sum_i x_ni W_ij + b_j, so dx_ni = sum_j dy_nj W_ij (dx = dy W^T),
    dW_ij = sum_n x_ni dy_nj (dW = x^T dy) and db_j = sum_n dy_nj.
    """
    dx = dy @ w.T  # (N, C_out) @ (C_out, C_in) -> (N, C_in)
    dw = x.T @ dy  # (C_in, N) @ (N, C_out) -> (C_in, C_out)
    return dx, dw, (dy.sum(axis=0) if with_bias else None)


# ----------------------------------------------------------------------------- layer norm


def layer_norm_forward(x, g, b=None):
    """y = x_hat g + b with x_hat = (x - mean) / sqrt(var + eps) per row: (N, C) -> (N, C).

    Returns y and the cache (x_hat, rstd), rstd = 1 / sqrt(var + eps) of shape (N, 1).
    """
    n = x.shape[-1]
    x_hat = x - x.sum(axis=-1, keepdims=True) * (1.0 / n)  # (N, C), centred
    var = onp.einsum("nc,nc->n", x_hat, x_hat)[:, None] * (1.0 / n)  # (N, 1)
    rstd = 1.0 / onp.sqrt(var + LN_EPS)  # (N, 1)
    x_hat *= rstd
    y = x_hat * g
    if b is not None:
        y += b
    return y, (x_hat, rstd)


def layer_norm_backward(dy, cache, g, with_bias):
    """Gradients of the layer norm: returns (dx, dg, db or None); dy is overwritten.

    With u = dy g (the gradient reaching x_hat) and mean() over a row's C channels:
        dg = sum_n dy x_hat,   db = sum_n dy,
        dx = rstd (u - mean(u) - x_hat mean(u x_hat)).
    Why dx: x_hat_c = (x_c - mu) rstd, and both mu and rstd depend on every x_c of the row;
    d mu / d x_c = 1/C and d rstd / d x_c = -rstd^2 x_hat_c / C, so the chain rule gives
    dx_c = rstd u_c - rstd mean(u) - rstd x_hat_c mean(u x_hat).
    """
    x_hat, rstd = cache
    n = x_hat.shape[-1]
    dg = onp.einsum("nc,nc->c", dy, x_hat)  # (C,)
    db = dy.sum(axis=0) if with_bias else None
    u = dy
    u *= g  # (N, C): the gradient at x_hat
    mean_u = u.sum(axis=-1, keepdims=True) * (1.0 / n)  # (N, 1)
    mean_ux = onp.einsum("nc,nc->n", u, x_hat)[:, None] * (1.0 / n)  # (N, 1)
    u -= mean_u
    u -= x_hat * mean_ux
    u *= rstd
    return u, dg, db


# ----------------------------------------------------------------------------- GELU


def _gelu_rows(h, y, slope):
    """Fill y = gelu(h) and slope = gelu'(h) for a block of rows, sharing one tanh.

    gelu(h)  = h G with the gate G = 0.5 (1 + t), t = tanh(c h (1 + a h^2)),
    gelu'(h) = G + 0.5 c h (1 - t^2) (1 + 3 a h^2)   (the product rule, and tanh' = 1 - tanh^2).
    """
    h2 = h * h
    t = h2 * (GELU_A * GELU_C)
    t += GELU_C
    t *= h
    onp.tanh(t, out=t)  # t = tanh(c h (1 + a h^2))
    onp.add(t, 1.0, out=slope)
    slope *= 0.5  # G
    onp.multiply(h, slope, out=y)  # y = h G
    h2 *= 3 * GELU_A
    h2 += 1.0
    h2 *= h
    h2 *= 0.5 * GELU_C  # 0.5 c h (1 + 3 a h^2)
    onp.multiply(t, t, out=t)
    onp.subtract(1.0, t, out=t)  # 1 - t^2
    h2 *= t
    slope += h2  # G + 0.5 c h (1 - t^2)(1 + 3 a h^2)


def gelu_forward(h):
    """GELU (tanh form) of h (N, 4C): returns y and the cache, the slope gelu'(h).

    The backward pass is then one multiply: dh = dy gelu'(h).
    """
    y, slope = onp.empty_like(h), onp.empty_like(h)
    on_two_cores(_gelu_rows, h, y, slope)
    return y, slope


# ----------------------------------------------------------------------------- attention


def _attention_rows(q, k, v, mask, p, y):
    """For a block of the batch: p = softmax(q k^T + mask) (q is pre-scaled), y = p v."""
    onp.matmul(q, onp.swapaxes(k, -1, -2), out=p)  # (B, H, T, D) @ (B, H, D, T) -> (B, H, T, T)
    p += mask
    p -= p.max(axis=-1, keepdims=True)  # softmax is shift-invariant; this keeps exp() finite
    onp.exp(p, out=p)
    p *= 1.0 / p.sum(axis=-1, keepdims=True)
    onp.matmul(p, v, out=y)  # (B, H, T, T) @ (B, H, T, D) -> (B, H, T, D)


def attention_forward(qkv, b, t, n_head, mask):
    """Causal multi-head attention from the fused projection qkv (N, 3C) -> (N, C).

    q is scaled by 1/sqrt(D) before the scores are taken (the same scores, one pass over the
    smaller tensor). Returns y and the cache (q scaled, k, v, P), each (B, H, T, .).
    """
    c = qkv.shape[1] // 3
    d = c // n_head
    heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (N, 3C) -> (3, B, H, T, D)
    q = heads[0] * (1.0 / math.sqrt(d))  # (B, H, T, D), a scaled copy
    k, v = onp.ascontiguousarray(heads[1]), onp.ascontiguousarray(heads[2])
    p = onp.empty((b, n_head, t, t), dtype=qkv.dtype)
    y = onp.empty_like(q)
    on_two_cores(_attention_rows, q, k, v, mask, p, y)
    y = y.transpose(0, 2, 1, 3).reshape(b * t, c)  # (B, H, T, D) -> (B, T, H, D) -> (N, C)
    return y, (q, k, v, p)


def _attention_backward_rows(q, k, v, p, dy, dq, dk, dv):
    """The backward of `_attention_rows` for a block of the batch, into dq, dk, dv.

    y = P v:                  dv = P^T dy,  dP = dy v^T
    P = softmax(S) by rows:   dS = P (dP - rowsum(dP P))   (elementwise products; the Jacobian
                              of a softmax row is diag(P) - P P^T)
    S = q k^T (q pre-scaled): dq = dS k (then times 1/sqrt(D) for the unscaled q), dk = dS^T q.
    The mask is a constant: it has no gradient, and P = 0 where it hid a key, so dS = 0 there.
    """
    onp.matmul(onp.swapaxes(p, -1, -2), dy, out=dv)  # (B, H, T, T) @ (B, H, T, D)
    ds = dy @ onp.swapaxes(v, -1, -2)  # dP: (B, H, T, D) @ (B, H, D, T) -> (B, H, T, T)
    ds -= onp.einsum("...ij,...ij->...i", ds, p)[..., None]
    ds *= p
    onp.matmul(ds, k, out=dq)
    dq *= 1.0 / math.sqrt(q.shape[-1])
    onp.matmul(onp.swapaxes(ds, -1, -2), q, out=dk)


def attention_backward(dy, cache):
    """Gradient of `attention_forward`: dy (N, C) -> dqkv (N, 3C)."""
    q, k, v, p = cache
    b, n_head, t, d = q.shape
    dyh = onp.ascontiguousarray(dy.reshape(b, t, n_head, d).transpose(0, 2, 1, 3))  # (B, H, T, D)
    dqkv = onp.empty((3, b, n_head, t, d), dtype=dy.dtype)  # dq, dk, dv stacked
    on_two_cores(_attention_backward_rows, q, k, v, p, dyh, dqkv[0], dqkv[1], dqkv[2])
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(b * t, 3 * n_head * d)  # -> (B, T, 3, H, D)


# ----------------------------------------------------------------------------- one block


def block_forward(x, block, n_head, b, t, mask):
    """One pre-LN GPT block, as `blocks.gpt_block`: x (N, C) -> (N, C), and its cache."""
    attn, mlp = block["attn"], block["mlp"]
    a1, ln_1 = layer_norm_forward(x, **block["ln_1"])  # (N, C)
    qkv = linear_forward(a1, **attn["c_attn"])  # (N, 3C)
    att, att_cache = attention_forward(qkv, b, t, n_head, mask)  # (N, C)
    x1 = linear_forward(att, **attn["c_proj"])
    x1 += x  # residual: x + attention(ln_1(x))
    a2, ln_2 = layer_norm_forward(x1, **block["ln_2"])  # (N, C)
    h = linear_forward(a2, **mlp["c_fc"])  # (N, 4C)
    u, slope = gelu_forward(h)  # (N, 4C)
    x2 = linear_forward(u, **mlp["c_proj"])
    x2 += x1  # residual: x1 + mlp(ln_2(x1))
    return x2, (a1, ln_1, att_cache, att, a2, ln_2, u, slope)


def _linear_grads(dy, x, layer):
    """dx and the gradient dict of a linear layer {"w", "b"?}."""
    dx, dw, db = linear_backward(dy, x, layer["w"], "b" in layer)
    return dx, ({"w": dw} if db is None else {"w": dw, "b": db})


def _norm_grads(dy, cache, norm):
    """dx and the gradient dict of a layer norm {"g", "b"?}; dy is overwritten."""
    dx, dg, db = layer_norm_backward(dy, cache, norm["g"], "b" in norm)
    return dx, ({"g": dg} if db is None else {"g": dg, "b": db})


def block_backward(dx2, cache, block):
    """Gradient of `block_forward`: dL/dx2 (N, C) -> dL/dx (N, C) and the block's gradients.

    Each residual x_out = x_in + f(x_in) passes its gradient on twice: straight through to
    x_in, and through f, so dx_in = dx_out + f'(x_in)^T dx_out.
    """
    a1, ln_1, att_cache, att, a2, ln_2, u, slope = cache
    attn, mlp = block["attn"], block["mlp"]
    du, g_mlp_proj = _linear_grads(dx2, u, mlp["c_proj"])  # (N, 4C)
    du *= slope  # through GELU: dh = du gelu'(h)
    da2, g_fc = _linear_grads(du, a2, mlp["c_fc"])  # (N, C)
    dx1, g_ln_2 = _norm_grads(da2, ln_2, block["ln_2"])
    dx1 += dx2  # the residual path around the MLP
    datt, g_attn_proj = _linear_grads(dx1, att, attn["c_proj"])  # (N, C)
    dqkv = attention_backward(datt, att_cache)  # (N, 3C)
    da1, g_c_attn = _linear_grads(dqkv, a1, attn["c_attn"])  # (N, C)
    dx, g_ln_1 = _norm_grads(da1, ln_1, block["ln_1"])
    dx += dx1  # the residual path around attention
    grads = {"ln_1": g_ln_1, "attn": {"c_attn": g_c_attn, "c_proj": g_attn_proj},
             "ln_2": g_ln_2, "mlp": {"c_fc": g_fc, "c_proj": g_mlp_proj}}
    return dx, grads


# ----------------------------------------------------------------------------- loss


def cross_entropy_forward_backward(logits, targets):
    """Mean cross-entropy of logits (N, V) at integer targets (N,), and its gradient (N, V).

    loss = -mean_n log softmax(logits_n)[target_n];
    dloss/dlogits_n = (softmax(logits_n) - onehot(target_n)) / N.
    The logits are overwritten by the gradient (nothing else needs them).
    """
    n = logits.shape[0]
    rows = onp.arange(n)
    logits -= logits.max(axis=-1, keepdims=True)  # shift-invariant: keeps exp() finite
    picked = logits[rows, targets]  # (N,) shifted logit of each target
    onp.exp(logits, out=logits)
    total = logits.sum(axis=-1)  # (N,) softmax denominators
    loss = float(onp.sum(onp.log(total) - picked)) / n  # -log p = log(sum exp) - logit
    logits *= (1.0 / n) / total[:, None]  # softmax / N
    logits[rows, targets] -= 1.0 / n
    return loss, logits


# ----------------------------------------------------------------------------- the whole model


def gpt_loss_and_grads(params, ids, targets, config):
    """`models.gpt_loss` (no mask, no dropout) and its gradient: (loss, grads tree like params).

    ids and targets (B, T) of integers. The forward pass keeps each block's cache; the backward
    pass walks the blocks in reverse.
    """
    b, t = ids.shape
    n, c = b * t, config.n_embd
    wte, wpe = params["wte"], params["wpe"]
    ids_flat = onp.asarray(ids).reshape(n)
    x = (wte[ids_flat].reshape(b, t, c) + wpe[:t]).reshape(n, c)  # (N, C) token + position
    mask = onp.triu(onp.full((t, t), MASK_VALUE, dtype=wte.dtype), k=1)  # (T, T) additive causal
    caches = []
    for block in params["h"]:
        x, cache = block_forward(x, block, config.n_head, b, t, mask)
        caches.append(cache)
    af, ln_f = layer_norm_forward(x, **params["ln_f"])  # (N, C)
    head = params["lm_head"]["w"] if "lm_head" in params else wte.T  # (C, V)
    logits = af @ head  # (N, C) @ (C, V) -> (N, V)
    loss, dlogits = cross_entropy_forward_backward(logits, onp.asarray(targets).reshape(n))

    grads = {}
    dx = dlogits @ head.T  # (N, V) @ (V, C) -> (N, C)
    dhead = af.T @ dlogits  # (C, N) @ (N, V) -> (C, V)
    dx, grads["ln_f"] = _norm_grads(dx, ln_f, params["ln_f"])
    block_grads = [None] * len(caches)
    for i in reversed(range(len(caches))):
        dx, block_grads[i] = block_backward(dx, caches[i], params["h"][i])
    grads["h"] = block_grads
    dwte = onp.zeros_like(wte)
    onp.add.at(dwte, ids_flat, dx)  # each row's gradient back to the token it was read from
    if "lm_head" in params:
        grads["lm_head"] = {"w": dhead}
    else:
        dwte += dhead.T  # tied: the head is wte^T, so its gradient adds transposed
    dwpe = onp.zeros_like(wpe)
    dwpe[:t] = dx.reshape(b, t, c).sum(axis=0)  # positions are shared by the batch
    grads["wte"], grads["wpe"] = dwte, dwpe
    return loss, _like(params, grads)


def _like(params, grads):
    """grads rearranged in the key order of params (AdamW and checkpoints walk that order)."""
    if isinstance(params, dict):
        return {k: _like(params[k], grads[k]) for k in params}
    if isinstance(params, list):
        return [_like(p, g) for p, g in zip(params, grads)]
    return grads


def gpt_value_and_grad(config):
    """A `value_and_grad(params, batch, rng) -> (loss, grads)` for the training loop, on this
    path: batch is (ids, targets); rng is unused (no dropout)."""
    if not supports(config):
        raise ValueError("the fast path needs dropout 0; use the reference path")

    def value_and_grad(params, batch, rng):
        return gpt_loss_and_grads(params, batch[0], batch[1], config)

    return value_and_grad
