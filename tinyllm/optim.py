"""AdamW, gradient clipping and the learning-rate schedule, as pure functions over parameter trees.

AdamW (Loshchilov & Hutter, 2019) is Adam (Kingma & Ba, 2015) with the weight decay taken out of
the gradient and applied to the weights directly ("decoupled"), so that decay is not rescaled by
Adam's per-parameter step sizes. For one parameter p with gradient g at step t (from 1):
    m = b1 m + (1 - b1) g                 first moment: a running mean of gradients
    v = b2 v + (1 - b2) g^2               second moment: a running mean of squared gradients
    m_hat = m / (1 - b1^t)                bias corrections: m and v start at 0
    v_hat = v / (1 - b2^t)
    p = p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)
"""

import math

import numpy as onp

from .tree import flatten, tree_leaves, tree_map, unflatten

ADAM_EPS = 1e-8  # keeps the step finite where v_hat is ~0; PyTorch's default


def adamw_init(params):
    """Optimizer state for a parameter tree: zero moments and step 0."""
    zeros = lambda p: onp.zeros_like(p)  # noqa: E731 - moments have each parameter's shape and dtype
    return {"m": tree_map(zeros, params), "v": tree_map(zeros, params), "step": 0}


def decays(p):
    """Weight decay applies to matrices (ndim >= 2: weights, embeddings), not to biases and norm
    gains, which set scales and offsets and should not be pulled towards 0."""
    return p.ndim >= 2


def _adamw_leaf(p, g, m, v, lr, step, beta1, beta2, weight_decay, grad_scale=1.0):
    """One AdamW update for one array: returns new (p, m, v) of p's dtype; g is used as
    grad_scale * g (that is how clipping is applied, at no extra pass over the gradients).

    Written as the Adam paper's "more efficient" ordering (Kingma & Ba, end of section 2): the
    bias corrections are folded into the step size and epsilon, so that
        m_hat / (sqrt(v_hat) + eps) = [sqrt(1 - b2^t) / (1 - b1^t)] m / (sqrt(v) + eps sqrt(1 - b2^t)).
    Each line is one pass over the array; the constants are Python floats so float32 stays float32.
    """
    m = m * beta1
    m += g * ((1.0 - beta1) * grad_scale)  # m = b1 m + (1 - b1) g
    v = v * beta2
    v += (g * g) * ((1.0 - beta2) * grad_scale**2)  # v = b2 v + (1 - b2) g^2
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step  # bias corrections: m and v start at 0
    denom = onp.sqrt(v)
    denom += ADAM_EPS * math.sqrt(bc2)
    update = m / denom
    update *= lr * math.sqrt(bc2) / bc1
    if weight_decay and decays(p):
        new_p = p * (1.0 - lr * weight_decay)  # decoupled decay: shrink the weights directly
        new_p -= update
    else:
        new_p = p - update
    return new_p, m, v


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_scale=1.0):
    """One AdamW step over a whole tree: (params, grads, state, lr) -> (new params, new state).

    Pure: the inputs are not modified.
    Example (one scalar-like parameter, no decay): p = 1, g = 0.5, lr = 0.1, fresh state ->
    m = 0.05, v = 0.0025 (b2 = 0.99), m_hat = 0.5, v_hat = 0.25, p = 1 - 0.1 * 0.5 / 0.5 = 0.9.
    """
    step = state["step"] + 1
    flat_m, flat_v = flatten(state["m"]), flatten(state["v"])
    flat_g = flatten(grads)
    new_p, new_m, new_v = {}, {}, {}
    for key, p in flatten(params).items():
        new_p[key], new_m[key], new_v[key] = _adamw_leaf(
            p, flat_g[key], flat_m[key], flat_v[key], float(lr), step, beta1, beta2, weight_decay,
            grad_scale,
        )
    return unflatten(new_p), {"m": unflatten(new_m), "v": unflatten(new_v), "step": step}


def global_norm(grads):
    """The L2 norm of all gradients taken together, as one long vector."""
    return math.sqrt(sum(float(onp.vdot(g, g)) for g in tree_leaves(grads)))


def clip_scale(norm, max_norm):
    """The factor that brings a gradient of global norm `norm` down to max_norm (1 if already
    below; max_norm <= 0 turns clipping off). Example: norm 4, max_norm 1 -> ~0.25."""
    if max_norm <= 0 or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by one factor so that their global norm is at most max_norm.

    Returns (clipped grads, norm before clipping). Scaling them together keeps the direction of
    the step; max_norm <= 0 turns clipping off.
    """
    norm = global_norm(grads)
    scale = clip_scale(norm, max_norm)
    if scale == 1.0:
        return grads, norm
    return tree_map(lambda g: g * scale, grads), norm


def lr_at(it, lr, min_lr, warmup_iters, decay_iters):
    """Learning rate at step `it` (from 0): linear warm-up, then cosine decay to min_lr.

    Example with lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000:
    it=0 -> 1e-5 (1/100 of the way up), it=99 -> 1e-3 (peak), it=1050 -> 5.5e-4 (half-way down
    the cosine), it=2000 -> 1e-4, and min_lr from then on.
    """
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
