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

What it covers: the mean next-token cross-entropy of `models.gpt_loss` (no loss mask), and the
masked-token loss of `mlm.mlm_loss` (the same blocks run bidirectionally, the loss at the
chosen positions only), with or without biases, with a tied or an untied LM head, and dropout 0
(`supports(config)`); pretraining's evaluations use its forward pass alone (`gpt_loss_fn`).
Anything else (dropout, loss masks, LoRA, classifiers, fine-tuning the encoder) takes the
reference path through autograd. `tests/test_fast.py` checks that the loss
and every gradient equal autograd's on the reference model, over random shapes, in float64 to
1e-10 and in float32 to its rounding, and that whole training steps (the flat-buffer AdamW at
the end of this module) equal `train.train_step`'s.

Shapes: B batch, T time, C channels, H heads, D head size, V vocabulary, N = B T rows. Every
activation is kept 2-D, (N, C), so that each linear layer and its two gradients are single 2-D
matmuls (which use both cores); only attention works on (B, H, T, D).

Speed rules followed throughout (see ops.py for the measurements behind them): constants are
Python floats (a numpy float64 scalar would promote float32 arrays to float64), elementwise work
is done in place where the input is no longer needed, `on_two_cores` splits the elementwise
passes over the attention weights, the MLP activations and AdamW's buffers between the two
cores, and causal attention computes only the blocks of its score matrix that the mask does not
zero (`query_blocks`: 10 of 16 at the default context of 256 tokens; the default run's training
steps take about 9% less time for it on a 2-core machine).

Two cores: a training step runs the two halves of its batch at once, each on one core with
one BLAS thread (`gpt_loss_and_grads_in_halves`), where the BLAS library allows it and runs
two threads (else one half after the other, with the same results). Measured at
nanoGPT's CPU recipe on a 2-core machine: the forward and backward passes take about 31 ms as
two halves against 41-50 ms as one batch whose matrix products use both cores, because then
every elementwise pass runs on two cores as well, and OpenBLAS's second thread no longer spins
beside them.
"""

import math

import numpy as onp

from .ops import LN_EPS, MASK_VALUE, distance_bias, gelu_rows, on_two_cores, run_both
from .optim import ADAM_EPS, clip_scale, decays
from .tree import flatten, tree_map, unflatten


ATTENTION_BLOCK = 64  # query rows per block of causal attention (`query_blocks`)


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


def _layer_norm_rows(x, g, b, y, x_hat, rstd):
    """The layer norm of a block of rows, into y, x_hat and rstd (see `layer_norm_forward`)."""
    n = x.shape[-1]
    onp.subtract(x, onp.einsum("nc->n", x)[:, None] * (1.0 / n), out=x_hat)  # centred
    var = onp.einsum("nc,nc->n", x_hat, x_hat)[:, None] * (1.0 / n)  # (rows, 1)
    onp.divide(1.0, onp.sqrt(var + LN_EPS), out=rstd)
    x_hat *= rstd
    onp.multiply(x_hat, g, out=y)
    if b is not None:
        y += b


def layer_norm_forward(x, g, b=None):
    """y = x_hat g + b with x_hat = (x - mean) / sqrt(var + eps) per row: (N, C) -> (N, C).

    Returns y and the cache (x_hat, rstd), rstd = 1 / sqrt(var + eps) of shape (N, 1). Rows
    are independent, so the two cores take half of them each.
    """
    y, x_hat = onp.empty_like(x), onp.empty_like(x)
    rstd = onp.empty((x.shape[0], 1), dtype=x.dtype)
    on_two_cores(_layer_norm_rows, x, g, b, y, x_hat, rstd)
    return y, (x_hat, rstd)


def _layer_norm_backward_rows(u, x_hat, rstd, g):
    """dx for a block of rows, written over u (which holds dy): see `layer_norm_backward`."""
    n = x_hat.shape[-1]
    u *= g  # (rows, C): the gradient at x_hat
    mean_u = onp.einsum("nc->n", u)[:, None] * (1.0 / n)  # (rows, 1)
    mean_ux = onp.einsum("nc,nc->n", u, x_hat)[:, None] * (1.0 / n)  # (rows, 1)
    u -= mean_u
    u -= x_hat * mean_ux
    u *= rstd


def layer_norm_backward(dy, cache, g, with_bias):
    """Gradients of the layer norm: returns (dx, dg, db or None); dy is overwritten by dx.

    With u = dy g (the gradient reaching x_hat) and mean() over a row's C channels:
        dg = sum_n dy x_hat,   db = sum_n dy,
        dx = rstd (u - mean(u) - x_hat mean(u x_hat)).
    Why dx: x_hat_c = (x_c - mu) rstd, and both mu and rstd depend on every x_c of the row;
    d mu / d x_c = 1/C and d rstd / d x_c = -rstd^2 x_hat_c / C, so the chain rule gives
    dx_c = rstd u_c - rstd mean(u) - rstd x_hat_c mean(u x_hat).
    """
    x_hat, rstd = cache
    dg = onp.einsum("nc,nc->c", dy, x_hat)  # (C,)
    db = dy.sum(axis=0) if with_bias else None
    on_two_cores(_layer_norm_backward_rows, dy, x_hat, rstd, g)
    return dy, dg, db


# ----------------------------------------------------------------------------- GELU


def gelu_forward(h):
    """GELU (tanh form) of h (N, 4C): returns y and the cache, the slope gelu'(h).

    The backward pass is then one multiply: dh = dy gelu'(h).
    """
    y, slope = onp.empty_like(h), onp.empty_like(h)
    on_two_cores(gelu_rows, h, y, slope)  # ops.gelu_rows: value and slope, one tanh
    return y, slope


# ----------------------------------------------------------------------------- attention


def softmax_rows(s, mask):
    """s <- softmax(s + mask) along the last axis, in place; s (B, H, R, K), the scores of R
    query rows over K keys (a block of `query_blocks`), and mask additive, (R, K) or, with a
    distance bias, (H, R, K).

    Softmax is unchanged by subtracting a constant from a row, and subtracting at least the
    row's maximum keeps exp() from overflowing. The row maxima cost more than the rest of
    the softmax together here (a reduction over short rows), so the whole block's maximum is
    subtracted instead: one cheap reduction, folded into the mask. It is only at fault if
    some row's scores all lie far below it; then exp() underflows that row towards 0, which
    the row sums show (< 1e-20, while e^-46 still keeps float32's precision), and the
    softmax is recomputed with each row's own maximum.
    """
    e = onp.add(s, mask - s.max())  # (..., R, K); the top score becomes 0
    onp.exp(e, out=e)
    total = onp.einsum("...ij->...i", e)[..., None]  # (..., R, 1) row sums
    if total.min() < 1e-20:  # some row underflowed: shift each row by its own maximum
        onp.add(s, mask, out=e)
        e -= e.max(axis=-1, keepdims=True)
        onp.exp(e, out=e)
        total = onp.einsum("...ij->...i", e)[..., None]
    onp.divide(e, total, out=s)


def query_blocks(t, causal):
    """[(rows, keys)]: the query rows of attention taken together, and how many keys they see.

    Causal attention lets query i see keys 0..i only, so its scores above the diagonal are
    masked to exactly 0 and computing them is wasted work. The rows are therefore taken in
    blocks of ATTENTION_BLOCK, each with the keys up to its last row: only the blocks of the
    score matrix on or below the diagonal are computed. At T = 256 that is 10 of 16 blocks,
    5/8 of the attention's products and exponentials; at T <= ATTENTION_BLOCK it is one
    block, the whole matrix. Without the causal mask every row sees every key: one block.
    Example: t=150, causal -> [(rows 0:64, 64 keys), (64:128, 128), (128:150, 150)].
    """
    if not causal:
        return [(slice(0, t), t)]
    return [(slice(start, min(start + ATTENTION_BLOCK, t)), min(start + ATTENTION_BLOCK, t))
            for start in range(0, t, ATTENTION_BLOCK)]


def _attention_rows(q, k, v, mask, p, y, blocks):
    """For a block of the batch: p = softmax(q k^T + mask) (q is pre-scaled), y = p v, computed
    for each (rows, keys) of `blocks` (`query_blocks`); the entries of p right of a block's
    keys are never written, and nothing reads them.

    k, v and y may be strided views (a head's rows are C apart in the (N, 3C) projection);
    the matmuls read and write them in place, with no copy.
    """
    for rows, keys in blocks:
        scores = p[..., rows, :keys]  # (B, H, R, K) view
        onp.matmul(q[..., rows, :], onp.swapaxes(k[..., :keys, :], -1, -2), out=scores)
        softmax_rows(scores, mask[..., rows, :keys])
        onp.matmul(scores, v[..., :keys, :], out=y[..., rows, :])  # (B, H, R, K) @ (B, H, K, D)


def attention_forward(qkv, b, t, n_head, mask, blocks):
    """Multi-head attention from the fused projection qkv (N, 3C) -> (N, C); `mask` is additive,
    causal (T, T), a distance bias (H, T, T) or zeros, and `blocks` the (rows, keys) to compute
    (`query_blocks`: for the causal mask, its blocks above the diagonal are skipped).

    q is scaled by 1/sqrt(D) before the scores are taken (the same scores, one pass over the
    smaller tensor); k and v are read where they lie in qkv, and each head writes its output
    straight into its channels of y. Returns y and the cache (q scaled, k, v, P), each
    (B, H, T, .), k and v as views of qkv.
    """
    c = qkv.shape[1] // 3
    d = c // n_head
    heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (N, 3C) -> (3, B, H, T, D)
    q = heads[0] * (1.0 / math.sqrt(d))  # (B, H, T, D), a scaled copy
    k, v = heads[1], heads[2]  # (B, H, T, D) views
    p = onp.empty((b, n_head, t, t), dtype=qkv.dtype)
    y = onp.empty((b, t, n_head, d), dtype=qkv.dtype)  # (B, T, H, D) is (N, C) in memory
    on_two_cores(_attention_rows, q, k, v, mask, p, y.transpose(0, 2, 1, 3), blocks)
    return y.reshape(b * t, c), (q, k, v, p, blocks)


def _attention_backward_rows(q, k, v, p, dy, dq, dk, dv, blocks):
    """The backward of `_attention_rows` for a block of the batch, into dq, dk, dv.

    y = P v:                  dv = P^T dy,  dP = dy v^T
    P = softmax(S) by rows:   dS = P (dP - rowsum(dP P))   (elementwise products; the Jacobian
                              of a softmax row is diag(P) - P P^T)
    S = q k^T (q pre-scaled): dq = dS k (then times 1/sqrt(D) for the unscaled q), dk = dS^T q.
    The mask is a constant: it has no gradient, and P = 0 where it hid a key, so dS = 0 there.
    dS and dq are computed block by block of query rows, as the forward pass did; dk and dv
    by the same blocks taken as key columns, each from the query rows that see it (those
    from the block's first row on), so they too read only what the forward pass wrote.
    """
    ds = onp.empty_like(p)  # (B, H, T, T), written where p was
    for rows, keys in blocks:
        probs, d_scores = p[..., rows, :keys], ds[..., rows, :keys]  # (B, H, R, K) views
        onp.matmul(dy[..., rows, :], onp.swapaxes(v[..., :keys, :], -1, -2), out=d_scores)  # dP
        d_scores -= onp.einsum("...ij,...ij->...i", d_scores, probs)[..., None]
        d_scores *= probs
        onp.matmul(d_scores, k[..., :keys, :], out=dq[..., rows, :])
    dq *= 1.0 / math.sqrt(q.shape[-1])
    for cols, _ in blocks:
        seen_by = slice(cols.start, None)  # the query rows that see these keys
        onp.matmul(onp.swapaxes(p[..., seen_by, cols], -1, -2), dy[..., seen_by, :],
                   out=dv[..., cols, :])
        onp.matmul(onp.swapaxes(ds[..., seen_by, cols], -1, -2), q[..., seen_by, :],
                   out=dk[..., cols, :])


def attention_backward(dy, cache):
    """Gradient of `attention_forward`: dy (N, C) -> dqkv (N, 3C).

    dq, dk and dv are written straight into their channels of dqkv, as strided views.
    """
    q, k, v, p, blocks = cache
    b, n_head, t, d = q.shape
    dyh = dy.reshape(b, t, n_head, d).transpose(0, 2, 1, 3)  # (B, H, T, D) view
    dqkv = onp.empty((b, t, 3, n_head, d), dtype=dy.dtype)  # (N, 3C) in memory
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # 3 x (B, H, T, D) views
    on_two_cores(_attention_backward_rows, q, k, v, p, dyh, dq, dk, dv, blocks)
    return dqkv.reshape(b * t, 3 * n_head * d)


# ----------------------------------------------------------------------------- one block


def block_forward(x, block, n_head, b, t, mask, blocks):
    """One pre-LN GPT block, as `blocks.gpt_block`: x (N, C) -> (N, C), and its cache."""
    attn, mlp = block["attn"], block["mlp"]
    a1, ln_1 = layer_norm_forward(x, **block["ln_1"])  # (N, C)
    qkv = linear_forward(a1, **attn["c_attn"])  # (N, 3C)
    att, att_cache = attention_forward(qkv, b, t, n_head, mask, blocks)  # (N, C)
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


def gpt_loss_and_grads(params, ids, targets, config, causal=True, counted=None, backward=True):
    """`models.gpt_loss` (no mask, no dropout) and its gradient: (loss, grads tree like params).

    ids and targets (B, T) of integers. The forward pass keeps each block's cache; the backward
    pass walks the blocks in reverse. For the masked-language-model objective (`mlm.mlm_loss`),
    causal=False lets every position attend to the whole sequence (`models.bidirectional_hidden`)
    and counted (B, T) of bools marks the positions whose cross-entropy counts: the loss is the
    mean over them, and only their hidden states go through the output layer (the other rows
    of dlogits would be zero). counted=None counts every position. backward=False returns
    (loss, None) after the forward pass: the loss alone, for evaluation.
    """
    b, t = ids.shape
    n, c = b * t, config.n_embd
    wte, wpe = params["wte"], params["wpe"]
    ids_flat = onp.asarray(ids).reshape(n)
    x = (wte[ids_flat].reshape(b, t, c) + wpe[:t]).reshape(n, c)  # (N, C) token + position
    if causal:
        mask = onp.triu(onp.full((t, t), MASK_VALUE, dtype=wte.dtype), k=1)  # (T, T) additive
    elif config.distance_bias:
        mask = distance_bias(config.n_head, t, wte.dtype)  # (H, T, T), as models.encoder_mask
    else:
        mask = onp.zeros((t, t), dtype=wte.dtype)  # nothing hidden
    blocks = query_blocks(t, causal)  # the same (rows, keys) for every layer
    caches = []
    for block in params["h"]:
        x, cache = block_forward(x, block, config.n_head, b, t, mask, blocks)
        if backward:  # an evaluation keeps no layer's cache: one layer's arrays at a time
            caches.append(cache)
    af, ln_f = layer_norm_forward(x, **params["ln_f"])  # (N, C)
    head = params["lm_head"]["w"] if "lm_head" in params else wte.T  # (C, V)
    targets_flat = onp.asarray(targets).reshape(n)
    if counted is None:
        picked, picked_targets = af, targets_flat  # (N, C), (N,)
    else:
        rows = onp.flatnonzero(counted)  # (M,) the counted positions, b * T + t
        picked, picked_targets = af[rows], targets_flat[rows]  # (M, C), (M,)
    loss, dlogits = cross_entropy_forward_backward(picked @ head, picked_targets)  # (M, V)
    if not backward:
        return loss, None
    dpicked = dlogits @ head.T  # (M, V) @ (V, C) -> (M, C)
    dhead = picked.T @ dlogits  # (C, M) @ (M, V) -> (C, V)
    if counted is None:
        dx = dpicked
    else:
        dx = onp.zeros_like(af)  # positions that do not count send no gradient back
        dx[rows] = dpicked
    grads = {}
    dx, grads["ln_f"] = _norm_grads(dx, ln_f, params["ln_f"])
    block_grads = [None] * len(caches)
    for i in reversed(range(len(caches))):
        dx, block_grads[i] = block_backward(dx, caches[i], params["h"][i])
    grads["h"] = block_grads
    dwte = embedding_backward(dx, ids_flat, wte.shape[0])
    if "lm_head" in params:
        grads["lm_head"] = {"w": dhead}
    else:
        dwte += dhead.T  # tied: the head is wte^T, so its gradient adds transposed
    dwpe = onp.zeros_like(wpe)
    dwpe[:t] = dx.reshape(b, t, c).sum(axis=0)  # positions are shared by the batch
    grads["wte"], grads["wpe"] = dwte, dwpe
    return loss, _like(params, grads)


def embedding_backward(dx, ids, vocab_size):
    """The gradient of a table lookup x = table[ids]: row v gets the sum of the rows dx (N, C)
    whose id is v -> (V, C).

    Example: ids [2, 0, 2], dx rows [a, b, c] -> rows [b, 0, a + c]. The rows are sorted by
    id and each run of equal ids summed by one `add.reduceat` (several times faster than
    `add.at`, which adds one row at a time).
    """
    order = onp.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = onp.flatnonzero(onp.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    table = onp.zeros((vocab_size, dx.shape[1]), dtype=dx.dtype)
    table[sorted_ids[starts]] = onp.add.reduceat(dx[order], starts, axis=0)
    return table


def _like(params, grads):
    """grads rearranged in the key order of params (AdamW and checkpoints walk that order)."""
    if isinstance(params, dict):
        return {k: _like(params[k], grads[k]) for k in params}
    if isinstance(params, list):
        return [_like(p, g) for p, g in zip(params, grads)]
    return grads


def gpt_loss_and_grads_in_halves(params, ids, targets, config, causal=True, counted=None,
                                 backward=True):
    """`gpt_loss_and_grads` of the whole batch, computed as two halves, at once on two cores.

    The loss is a mean over the counted positions, so with n_a of them in the first rows of the
    batch and n_b in the others: loss = (n_a loss_a + n_b loss_b) / (n_a + n_b), and the same
    weights combine the gradients (a gradient is linear in the loss). Each half runs the whole
    forward and backward pass on its own core (`ops.run_both`): every pass of the step runs on
    two cores, where splitting each matrix product and each elementwise pass separately hands
    work between threads some two hundred times a step. The results equal the whole batch's up
    to float rounding (sums are taken in another order), and they are the same whether the
    halves ran at once or one after the other: a run gives the same numbers on one core or
    two, which is what lets a run killed on one machine setting resume exactly on another. A
    batch of one row, or one whose half counts no position, runs whole.
    """
    b, t = ids.shape
    half = b // 2
    if counted is None:
        n_a, n_b = half * t, (b - half) * t
    else:
        n_a, n_b = int(counted[:half].sum()), int(counted[half:].sum())
    if n_a == 0 or n_b == 0:
        return gpt_loss_and_grads(params, ids, targets, config, causal, counted,
                                  backward=backward)

    def part(rows):
        return lambda: gpt_loss_and_grads(params, ids[rows], targets[rows], config, causal,
                                          None if counted is None else counted[rows],
                                          backward=backward)

    (loss_a, grads_a), (loss_b, grads_b) = run_both(part(slice(None, half)),
                                                    part(slice(half, None)))
    w_a, w_b = n_a / (n_a + n_b), n_b / (n_a + n_b)
    if not backward:
        return w_a * loss_a + w_b * loss_b, None
    return w_a * loss_a + w_b * loss_b, _weighted_sum(grads_a, w_a, grads_b, w_b)


def _weighted_sum(a, w_a, b, w_b):
    """w_a a + w_b b for two trees of arrays, written into a's arrays."""

    def leaf(x, y):
        x *= w_a
        x += w_b * y
        return x

    return tree_map(leaf, a, b)


def batch_loss_and_grads(config, objective="clm", backward=True):
    """loss_and_grads(params, batch) -> (loss, grads) for a training batch of `objective`:
    "clm", batch (ids, targets); "mlm" (tinyllm/mlm.py), batch (corrupted ids, original ids,
    chosen (B, T) bools), run bidirectionally with the loss at the chosen positions only.
    backward=False gives (loss, None), from the forward pass alone."""
    if not supports(config):
        raise ValueError("the fast path needs dropout 0; use the reference path")
    if objective == "clm":
        return lambda params, batch: gpt_loss_and_grads_in_halves(
            params, batch[0], batch[1], config, backward=backward)
    if objective == "mlm":
        return lambda params, batch: gpt_loss_and_grads_in_halves(
            params, batch[0], batch[1], config, causal=False, counted=batch[2],
            backward=backward)
    raise ValueError(f"no fast path for the objective {objective!r}")


def gpt_value_and_grad(config, objective="clm"):
    """A `value_and_grad(params, batch, rng) -> (loss, grads)` for the training loop, on this
    path (see `batch_loss_and_grads` for the batch); rng is unused (no dropout)."""
    loss_and_grads = batch_loss_and_grads(config, objective)

    def value_and_grad(params, batch, rng):
        return loss_and_grads(params, batch)

    return value_and_grad


def gpt_loss_fn(config, objective="clm"):
    """A `loss_fn(params, batch, rng) -> loss` on this path, the forward pass alone, for the
    training loop's evaluations: the loss of `models.gpt_loss` (or `mlm.mlm_loss`) to float
    rounding, in about a third of the time of the reference forward pass on a 2-core machine
    (two halves at once, causal blocks skipped). rng is unused (no dropout)."""
    loss_only = batch_loss_and_grads(config, objective, backward=False)

    def loss_fn(params, batch, rng):
        return loss_only(params, batch)[0]

    return loss_fn


# ----------------------------------------------------------------------------- the optimizer step
#
# `optim.adamw_step` updates a tree leaf by leaf: about 40 small arrays, each pass of each a
# separate numpy call, with the trees flattened and rebuilt around it. Here the weights, the
# two moments and the gradients each live in one flat buffer, so an AdamW step is a dozen
# passes over one long vector, split between the two cores; the trees the loop keeps and
# checkpoints are views into the buffers. The maths and its order of operations are those of
# `optim._adamw_leaf`, so the numbers are the same; tests/test_fast.py checks it.


class FlatLayout:
    """Where each leaf of a parameter tree sits in one flat vector: the leaves that decay
    (matrices, `optim.decays`) first, so that weight decay applies to one leading slice."""

    def __init__(self, params):
        flat = flatten(params)
        self.tree_order = list(flat)  # the order the trees are rebuilt in
        self.paths = sorted(flat, key=lambda path: not decays(flat[path]))  # decayed first
        self.shapes = {path: flat[path].shape for path in self.paths}
        self.dtype = flat[self.paths[0]].dtype
        self.sizes = [flat[path].size for path in self.paths]
        self.n_decay = sum(n for path, n in zip(self.paths, self.sizes) if decays(flat[path]))

    def pack(self, tree):
        """A tree shaped like the parameters -> one new flat vector."""
        flat = flatten(tree)
        return onp.concatenate([onp.ravel(flat[path]) for path in self.paths]).astype(
            self.dtype, copy=False)

    def unpack(self, vector):
        """A flat vector -> a tree of views into it, shaped like the parameters."""
        leaves, start = {}, 0
        for path, size in zip(self.paths, self.sizes):
            leaves[path] = vector[start:start + size].reshape(self.shapes[path])
            start += size
        return unflatten({path: leaves[path] for path in self.tree_order})


def _adam_update(g, m, v, new_m, new_v, update, lr, step, beta1, beta2, grad_scale):
    """The moments and the Adam update of `optim._adamw_leaf`, for a slice of the flat buffers:
    new_m, new_v and update (lr m_hat / (sqrt(v_hat) + eps)) are written in place."""
    onp.multiply(m, beta1, out=new_m)
    onp.multiply(g, (1.0 - beta1) * grad_scale, out=update)
    new_m += update  # m = b1 m + (1 - b1) g
    onp.multiply(v, beta2, out=new_v)
    onp.multiply(g, g, out=update)
    update *= (1.0 - beta2) * grad_scale**2
    new_v += update  # v = b2 v + (1 - b2) g^2
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step  # bias corrections, folded in as there
    onp.sqrt(new_v, out=update)
    update += ADAM_EPS * math.sqrt(bc2)
    onp.divide(new_m, update, out=update)
    update *= lr * math.sqrt(bc2) / bc1


def adamw_flat(p, g, m, v, lr, step, beta1, beta2, weight_decay, grad_scale, n_decay):
    """One AdamW step over flat buffers -> new (p, m, v) buffers; the inputs are unchanged.

    The first n_decay elements decay. The moments and the update are computed on both cores
    at once, half of the buffers each (every element's update depends on that element alone).
    """
    new_p, new_m, new_v, update = (onp.empty_like(p) for _ in range(4))
    on_two_cores(_adam_update, g, m, v, new_m, new_v, update, lr, step, beta1, beta2, grad_scale)
    onp.multiply(p[:n_decay], 1.0 - lr * weight_decay, out=new_p[:n_decay])  # decoupled decay
    new_p[n_decay:] = p[n_decay:]
    new_p -= update
    return new_p, new_m, new_v


def gpt_train_step(config, objective="clm"):
    """A training step on this path with the contract of `train.train_step` (minus its
    value_and_grad): step(params, opt_state, batch, lr, tc, rng) -> (params, opt_state, loss,
    norm). Gradients by `batch_loss_and_grads`, clipping by the global norm, AdamW on flat
    buffers; the trees it returns are views into new buffers (the inputs are never changed),
    and when the next call gets those same trees back it reads the buffers without copying.
    """
    loss_and_grads = batch_loss_and_grads(config, objective)
    last = {}  # the trees the previous call returned -> their buffers

    def step(params, opt_state, batch, lr, tc, rng):
        loss, grads = loss_and_grads(params, batch)
        if last.get("trees") == (id(params), id(opt_state["m"]), id(opt_state["v"])):
            layout, p, m, v = last["layout"], last["p"], last["m"], last["v"]
        else:  # the first step, or a state from elsewhere (a resumed checkpoint)
            layout = FlatLayout(params)
            p, m, v = layout.pack(params), layout.pack(opt_state["m"]), layout.pack(opt_state["v"])
        g = layout.pack(grads)
        norm = math.sqrt(float(onp.vdot(g, g)))
        t = opt_state["step"] + 1
        p, m, v = adamw_flat(p, g, m, v, float(lr), t, tc.beta1, tc.beta2, tc.weight_decay,
                             clip_scale(norm, tc.grad_clip), layout.n_decay)
        new_params = layout.unpack(p)
        new_state = {"m": layout.unpack(m), "v": layout.unpack(v), "step": t}
        last.clear()
        last.update(trees=(id(new_params), id(new_state["m"]), id(new_state["v"])),
                    layout=layout, p=p, m=m, v=v, keep=(new_params, new_state))
        return new_params, new_state, loss, norm

    return step
