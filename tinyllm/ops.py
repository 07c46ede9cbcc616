"""Tensor ops for transformers on `autograd.numpy`: each in a readable reference form, and where it
pays, a fused form with a hand-written gradient.

Shape letters used across tinyllm: B batch, T time (sequence position), C channels (n_embd),
H heads, D head size (C / H), V vocabulary, N = B * T rows, K classes.

Why fused forms? autograd differentiates a function by recording every numpy call and replaying
their gradients backwards. A layer norm written as six numpy calls records six nodes, allocates
six intermediate arrays and, in the backward pass, six more. A fused op is one
`autograd.extend.primitive` whose vector-Jacobian product (VJP) we write by hand from the maths,
so the whole op is one node with the minimum of temporaries. `tests/test_ops.py` proves each fused
form equals its reference form in value and gradient, and checks every hand-written VJP against
finite differences.

How a fused op is written (every one below follows this idiom). In PyTorch terms it is a
`torch.autograd.Function` whose `forward` calls `ctx.save_for_backward`:

    def layer_norm(x, g, b):                  # the wrapper = forward + save_for_backward
        x_hat, rstd = _normalize(getval(x))   # plain numpy on the plain value of x
        return _layer_norm_fused(x, g, b, x_hat, rstd)

    @primitive                                # autograd records this call as ONE node and
    def _layer_norm_fused(x, g, b, x_hat, rstd):   # never looks inside it
        return x_hat * g + b                  # the output, from what was saved

    def _layer_norm_vjp(argnums, ans, args, kwargs):   # = backward, set up at forward time
        x, g, b, x_hat, rstd = args           # the saved tensors, as plain arrays
        def vjp(dy): ...                      # dL/d(output) -> dL/d(each input in argnums)
        return vjp

    defvjp_argnums(_layer_norm_fused, _layer_norm_vjp)  # "this is the primitive's backward"

The wrapper computes the forward pass with plain numpy and hands the primitive both the
differentiable inputs and the saved intermediates. The primitive's body may not even read
those inputs (`_layer_norm_fused` never reads x, `_attention_fused` never reads q and k,
`_cross_entropy_fused` never reads logits): they are arguments only so that autograd knows
the output depends on them and routes their gradients to the hand-written VJP. (Arguments are
passed positionally: autograd traces positional arguments only.)

The VJP maker is called once per forward pass, right after the primitive, as
`maker(argnums, ans, args, kwargs)`: `argnums` are the positions of the arguments that need a
gradient in this call (a frozen weight or a bias that is None is absent), `ans` is the
primitive's output, `args` its positional arguments as plain arrays. It returns `vjp(g)`, which
takes g = dL/d(output) and returns one gradient per position in `argnums`, in that order. Every
multi-argument VJP here is written the same way: it fills a dict `grads` (position -> gradient)
for the positions asked for and returns `tuple(grads[i] for i in argnums)`. `defvjp` (used for
an op with one differentiable input) is the short form: `maker(ans, *args)`.

float32 discipline: every constant below is a Python float, never a numpy float64 scalar, because
numpy promotes `float32_array * float64_scalar` to float64 and the whole step silently doubles in
cost. Other ways float64 creeps in, avoided here: the VJPs of `np.mean`/`np.var` (an integer
count), of `np.max`/`np.min`, `np.where` and `np.maximum`. Parameter gradients still come back
float32 (they are added into float32 zeros), which hides the promotion, so the tests check the
dtype of the loss and of activations.

Threads are kept apart from the maths: the maths functions below read as plain numpy on whole
arrays, and the one place that splits work over two cores is `on_two_cores` (its own section).
"""

import concurrent.futures
import math
import os
import threading

import autograd.numpy as np
import numpy as onp  # plain numpy inside primitives: their insides are never traced
from autograd.extend import defvjp, defvjp_argnums, primitive
from autograd.tracer import getval, isbox

from . import system

LN_EPS = 1e-5  # layer norm's variance floor, as in PyTorch and GPT-2
GELU_C = math.sqrt(2.0 / math.pi)  # the tanh approximation's constant (Hendrycks & Gimpel, 2016)
DISTANCE_BIAS_FLOOR = -40.0  # the distance bias goes no lower (see `distance_bias`)
MASK_VALUE = -1e9  # additive mask: large enough that exp() underflows to exactly 0, finite in float32


# ----------------------------------------------------------------------------- linear, embedding


def linear_reference(x, w, b=None):
    """Affine map y = x W + b over the last axis: (..., C_in) -> (..., C_out)."""
    y = x @ w
    return y if b is None else y + b


def linear(x, w, b=None):
    """Affine map y = x W + b as one fused op; same values as `linear_reference`.

    The leading axes are flattened so that the forward and both gradients are single 2-D
    matmuls, which use both cores (a broadcast 3-D matmul and its gradient are slower).
    """
    return _linear_fused(x, w, b)


@primitive
def _linear_fused(x, w, b):
    y = x.reshape(-1, x.shape[-1]) @ w  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (w.shape[1],))  # (N, C_out) -> (..., C_out)


def _linear_vjp(argnums, ans, args, kwargs):
    x, w, _ = args

    def vjp(g):
        g2 = g.reshape(-1, w.shape[1])  # (N, C_out)
        grads = {}
        if 0 in argnums:
            grads[0] = (g2 @ w.T).reshape(x.shape)  # dx = g W^T
        if 1 in argnums:
            grads[1] = x.reshape(-1, w.shape[0]).T @ g2  # dW = x^T g, summed over rows
        if 2 in argnums:
            grads[2] = g2.sum(axis=0)  # db = g summed over rows
        return tuple(grads[i] for i in argnums)

    return vjp


defvjp_argnums(_linear_fused, _linear_vjp)


def embedding(table, ids):
    """Look up rows of `table` (V, C) for integer `ids` (...) -> (..., C).

    Example: table = [[0, 0], [1, 1], [2, 2]], ids = [2, 0] -> [[2, 2], [0, 0]].
    The gradient adds each incoming row back into the row it came from (autograd does this).
    """
    return table[ids]


# ----------------------------------------------------------------------------- GELU


def gelu_reference(x):
    """GELU in GPT-2's tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3)))


def gelu_rows(x, y, slope):
    """Fill y = gelu(x) and, unless slope is None, slope = gelu'(x), sharing one tanh.

    gelu(x)  = x G,  with the gate G = 0.5 (1 + t) and t = tanh(c x (1 + a x^2)), a = 0.044715
    gelu'(x) = G + 0.5 c x (1 - t^2) (1 + 3 a x^2)
    Every step writes into an existing buffer: on this machine class an elementwise pass over the
    MLP activations costs about as much as a small matmul, so the number of passes is the cost.
    """
    x2 = x * x
    t = x2 * (0.044715 * GELU_C)
    t += GELU_C
    t *= x
    onp.tanh(t, out=t)  # t = tanh(c x (1 + a x^2))
    gate = onp.add(t, 1.0, out=slope if slope is not None else None)
    gate *= 0.5  # G
    onp.multiply(x, gate, out=y)  # y = x G
    if slope is None:
        return
    x2 *= 3 * 0.044715
    x2 += 1.0
    x2 *= x
    x2 *= 0.5 * GELU_C  # 0.5 c x (1 + 3 a x^2)
    onp.multiply(t, t, out=t)
    onp.subtract(1.0, t, out=t)  # 1 - t^2
    x2 *= t
    slope += x2  # slope held G; now G + 0.5 c x (1 - t^2)(1 + 3 a x^2)


def gelu(x):
    """GELU (tanh form) as one fused op; same values as `gelu_reference`.

    The forward pass computes the value and the slope together (they share the tanh), and
    `_with_slope` hands both to autograd: the backward pass is then a single multiply.
    """
    xv = onp.asarray(getval(x))
    if xv.ndim == 0:  # a single number: nothing to fuse
        return gelu_reference(x)
    y = onp.empty_like(xv)
    if not isbox(x):  # not being differentiated (evaluation, sampling): skip the slope
        on_two_cores(gelu_rows, xv, y, None)
        return y
    slope = onp.empty_like(xv)
    on_two_cores(gelu_rows, xv, y, slope)
    return _with_slope(x, y, slope)


@primitive
def _with_slope(x, y, slope):
    """An elementwise op whose value y = f(x) and slope f'(x) were computed ahead: returns y.

    Its VJP is g * f'(x). Passing the precomputed arrays in as arguments (rather than stashing them
    somewhere) keeps the op a pure function that autograd can trace.
    """
    return y


defvjp(_with_slope, lambda ans, x, y, slope: lambda g: g * slope)


# ----------------------------------------------------------------------------- layer norm


def layer_norm_reference(x, g, b=None):
    """Layer norm over the last axis (Ba, Kiros & Hinton, 2016): normalise, then scale and shift."""
    n = x.shape[-1]
    mu = np.sum(x, axis=-1, keepdims=True) * (1.0 / n)  # (..., 1)
    xc = x - mu  # (..., C)
    var = np.sum(xc * xc, axis=-1, keepdims=True) * (1.0 / n)  # (..., 1)
    y = xc / np.sqrt(var + LN_EPS) * g  # (..., C)
    return y if b is None else y + b


def _normalize(x):
    """Return (x_hat, 1/std) for a plain array x (..., C): x_hat has mean 0, variance 1 per row."""
    n = x.shape[-1]
    x_hat = x - x.sum(axis=-1, keepdims=True) * (1.0 / n)  # (..., C), centred
    var = onp.einsum("...c,...c->...", x_hat, x_hat)[..., None] * (1.0 / n)  # (..., 1)
    rstd = 1.0 / onp.sqrt(var + LN_EPS)  # (..., 1)
    x_hat *= rstd
    return x_hat, rstd


def layer_norm(x, g, b=None):
    """Layer norm as one fused op; same values as `layer_norm_reference`.

    x_hat and 1/std are computed once here and handed to the primitive, whose VJP needs them.
    (autograd traces only positional arguments, so the primitive is called positionally: this
    is what lets a caller write `layer_norm(x, **params)` and still get gradients for g and b.)
    """
    x_hat, rstd = _normalize(getval(x))
    return _layer_norm_fused(x, g, b, x_hat, rstd)


@primitive
def _layer_norm_fused(x, g, b, x_hat, rstd):
    y = x_hat * g
    if b is not None:
        y += b
    return y


def _layer_norm_vjp(argnums, ans, args, kwargs):
    _, g, _, x_hat, rstd = args
    n = x_hat.shape[-1]  # g and b are broadcast over all the other axes: sum over those

    def vjp(dy):
        grads = {}
        if 0 in argnums:
            # dx = (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)) / std, per row
            dx_hat = dy * g
            mean_d = dx_hat.sum(axis=-1, keepdims=True) * (1.0 / n)
            mean_dx = onp.einsum("...c,...c->...", dx_hat, x_hat)[..., None] * (1.0 / n)
            dx_hat -= mean_d
            dx_hat -= x_hat * mean_dx
            dx_hat *= rstd
            grads[0] = dx_hat
        if 1 in argnums:
            grads[1] = onp.einsum("nc,nc->c", dy.reshape(-1, n), x_hat.reshape(-1, n))  # dg
        if 2 in argnums:
            grads[2] = dy.reshape(-1, n).sum(axis=0)  # db
        return tuple(grads[i] for i in argnums)

    return vjp


defvjp_argnums(_layer_norm_fused, _layer_norm_vjp)


# ----------------------------------------------------------------------------- softmax family


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`; rows sum to 1.

    Softmax is unchanged by adding a constant to a row, so we subtract the row maximum to keep
    exp() from overflowing. The maximum is taken with `getval` (no gradient flows through it):
    the result does not depend on it, and differentiating np.max is slow and promotes to float64.
    """
    e = np.exp(x - getval(x).max(axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    """log(softmax(x)), computed as x - logsumexp(x) so that it never takes log(0)."""
    shifted = x - getval(x).max(axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def cross_entropy_reference(logits, targets, mask=None):
    """Mean of -log p(target) over positions whose mask is 1: (N, V), (N,), (N,) -> scalar.

    Example: logits [[0, 0]] (p = [0.5, 0.5]), targets [1] -> ln 2 = 0.693.
    `mask` marks the positions that count (1) and those ignored (0), such as padding.
    """
    logp = log_softmax(logits)  # (N, V)
    picked = logp[np.arange(logits.shape[0]), targets]  # (N,)
    if mask is None:
        return -np.sum(picked) * (1.0 / logits.shape[0])
    return -np.sum(picked * mask) / np.maximum(np.sum(mask), 1.0)


def cross_entropy(logits, targets, mask=None):
    """Softmax cross-entropy as one fused op; same value as `cross_entropy_reference`.

    The log-probabilities and the per-row weights (mask / count) are computed once here and
    handed to the primitive, whose VJP reuses them: d loss / d logits = (softmax - onehot) * weight.
    """
    lv = getval(logits)  # (N, V)
    logp = lv - lv.max(axis=-1, keepdims=True)
    logp -= onp.log(onp.exp(logp).sum(axis=-1, keepdims=True))  # (N, V) log-softmax
    n = lv.shape[0]
    if mask is None:
        weight = onp.full(n, 1.0 / n, dtype=lv.dtype)  # (N,)
    else:
        weight = onp.asarray(mask, dtype=lv.dtype)  # (N,) a 0/1 mask of any dtype, as float
        weight = weight * (1.0 / max(float(weight.sum()), 1.0))
    return _cross_entropy_fused(logits, targets, weight, logp)


@primitive
def _cross_entropy_fused(logits, targets, weight, logp):
    picked = logp[onp.arange(logp.shape[0]), targets]  # (N,) log p(target)
    return -onp.dot(picked, weight)


def _cross_entropy_vjp(ans, logits, targets, weight, logp):
    def vjp(g):
        grad = onp.exp(logp)  # (N, V) softmax
        grad[onp.arange(logp.shape[0]), targets] -= 1.0
        grad *= weight[:, None] * g
        return grad

    return vjp


defvjp(_cross_entropy_fused, _cross_entropy_vjp)


# ----------------------------------------------------------------------------- masks, dropout


def causal_mask(t, dtype="float32"):
    """Additive causal mask (T, T): 0 where query i may see key j (j <= i), MASK_VALUE above.

    Example: causal_mask(3) -> [[0, -1e9, -1e9], [0, 0, -1e9], [0, 0, 0]].
    Added to the attention scores before softmax, it gives the future zero weight.
    """
    upper = np.triu(np.ones((t, t), dtype=dtype), k=1)  # 1 strictly above the diagonal
    return upper * MASK_VALUE


def padding_mask(valid, dtype="float32"):
    """Additive key mask (B, 1, 1, T) from a 0/1 array `valid` (B, T): keys that are padding get
    MASK_VALUE, so no query attends to them.

    Example: valid [[1, 1, 0]] -> [[[[0, 0, -1e9]]]].
    """
    return ((1.0 - np.asarray(valid, dtype=dtype)) * MASK_VALUE)[:, None, None, :]


def distance_bias(n_head, t, dtype="float32"):
    """Additive attention bias (H, T, T) that favours near tokens: head h subtracts
    slope_h * |i - j| from the score of query i for key j, with slopes 1, 1/2, 1/4, ... (one per
    head, halving), and no more than DISTANCE_BIAS_FLOOR: head 0 looks mostly at a token's
    neighbours, the last heads almost everywhere.

    This is ALiBi (Press et al., 2022, "Train short, test long"), made symmetric for an encoder;
    ALiBi's slopes for H heads are 2^(-8h/H), h = 1..H, steeper ones are used here because the
    encoder's first job is to read a masked token's neighbours. It is a constant: nothing
    learns it, and it costs one addition. Example: distance_bias(2, 3)[1] ->
    [[0, -0.5, -1], [-0.5, 0, -0.5], [-1, -0.5, 0]].

    Why the floor: without it, head 0 at T = 256 subtracts up to 255, and softmax's exp() of
    scores that far down gives subnormal floats (below 1.2e-38 in float32), which Intel
    processors add and multiply dozens of times slower than normal ones: it made a masked
    pretraining step 1.4 times slower than a causal one there. A key held at the floor keeps
    at most e^-40 (4e-18) of the weight of the key with the top score, far below float32's
    rounding of a sum (6e-8), so the attention's outputs and gradients change by float32
    rounding at most: a 750-step masked pretraining run logs the same losses either way.
    """
    slopes = 0.5 ** onp.arange(n_head)  # (H,): 1, 1/2, 1/4, ...
    offsets = onp.abs(onp.arange(t)[:, None] - onp.arange(t)[None, :])  # (T, T): |i - j|
    bias = onp.maximum(-slopes[:, None, None] * offsets, DISTANCE_BIAS_FLOOR)  # (H, T, T)
    return bias.astype(dtype)


def dropout(x, p, rng):
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (Srivastava et al.).

    `rng` is a numpy Generator, passed in so that a run is reproducible from its seed; with p = 0
    or rng = None (evaluation) this is the identity.
    """
    if p == 0.0 or rng is None:
        return x
    keep = rng.random(getval(x).shape, dtype="float32") >= p  # (...) bool
    return x * (keep.astype(getval(x).dtype) * (1.0 / (1.0 - p)))


# ----------------------------------------------------------------------------- attention core


def attention_reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + mask) v, written plainly (Vaswani et al. 2017, eq. 1).

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, D), mask broadcastable to (..., Tq, Tk)
    -> (..., Tq, D).
    """
    scores = q @ np.swapaxes(k, -1, -2) * (1.0 / math.sqrt(q.shape[-1]))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores + mask
    return softmax(scores) @ v  # (..., Tq, Tk) @ (..., Tk, D) -> (..., Tq, D)


def attention(q, k, v, mask=None, dropout_p=0.0, rng=None):
    """Scaled dot-product attention as one fused op: same values as `attention_reference`.

    q (B, H, Tq, D), k and v (B, H, Tk, D), mask broadcastable to (B, H, Tq, Tk) -> (B, H, Tq, D).
    The attention weights P are computed here, once, and handed to the primitive, whose VJP
    needs them. Dropout, when on, drops attention weights as in the paper and in GPT-2.
    """
    qv, kv = getval(q), getval(k)
    p = onp.empty(qv.shape[:-1] + (kv.shape[-2],), dtype=qv.dtype)  # (B, H, Tq, Tk)
    on_two_cores(_attention_weights_rows, qv, kv, mask, p)
    keep = None
    if dropout_p > 0.0 and rng is not None:
        keep = (rng.random(p.shape, dtype="float32") >= dropout_p).astype(p.dtype)
        keep *= 1.0 / (1.0 - dropout_p)
    return _attention_fused(q, k, v, p, keep)


def _attention_weights_rows(q, k, mask, p):
    """Fill p with softmax(q k^T / sqrt(D) + mask), in place (q, k, p share their leading axes)."""
    onp.matmul(q, onp.swapaxes(k, -1, -2), out=p)  # (..., Tq, D) @ (..., D, Tk) -> (..., Tq, Tk)
    p *= 1.0 / math.sqrt(q.shape[-1])
    if mask is not None:
        p += mask
    p -= p.max(axis=-1, keepdims=True)  # softmax is shift-invariant; this keeps exp() finite
    onp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)


def attention_weights(q, k, mask=None):
    """The attention weights softmax(q k^T / sqrt(D) + mask) alone, as plain arrays: for looking
    at what a head attends to (not differentiated). (..., Tq, D), (..., Tk, D) -> (..., Tq, Tk)."""
    q, k = onp.asarray(getval(q)), onp.asarray(getval(k))
    p = onp.empty(q.shape[:-1] + (k.shape[-2],), dtype=onp.result_type(q, k))
    _attention_weights_rows(q, k, mask, p)
    return p


@primitive
def _attention_fused(q, k, v, p, keep):
    return (p if keep is None else p * keep) @ v  # (..., Tq, Tk) @ (..., Tk, D) -> (..., Tq, D)


def _attention_backward_rows(q, k, v, p, keep, g, dq, dk, dv):
    """The VJP of attention for a slice of the batch, written into dq, dk, dv.

    out = P' v with P' = P * keep:  dv = P'^T g,  dP = (g v^T) * keep
    P = softmax(S):                  dS = P * (dP - rowsum(dP * P))
    S = q k^T / sqrt(D):             dq = dS k / sqrt(D),  dk = dS^T q / sqrt(D)
    """
    dropped = p if keep is None else p * keep
    onp.matmul(onp.swapaxes(dropped, -1, -2), g, out=dv)
    dp = g @ onp.swapaxes(v, -1, -2)  # (..., Tq, Tk)
    if keep is not None:
        dp *= keep
    ds = dp * p
    ds -= p * ds.sum(axis=-1, keepdims=True)
    ds *= 1.0 / math.sqrt(q.shape[-1])
    onp.matmul(ds, k, out=dq)
    onp.matmul(onp.swapaxes(ds, -1, -2), q, out=dk)


def _attention_vjp(argnums, ans, args, kwargs):
    q, k, v, p, keep = args

    def vjp(g):
        dq, dk, dv = onp.empty_like(q), onp.empty_like(k), onp.empty_like(v)
        on_two_cores(_attention_backward_rows, q, k, v, p, keep, g, dq, dk, dv)
        grads = {0: dq, 1: dk, 2: dv}  # one pass gives all three: they share dS
        return tuple(grads[i] for i in argnums)

    return vjp


defvjp_argnums(_attention_fused, _attention_vjp)


# ----------------------------------------------------------------------------- two cores
#
# The only threading in tinyllm. numpy's matmuls use both cores, but its elementwise loops and
# batched small matmuls use one; they release the GIL, so two threads each working on half of
# the rows overlap. The gain is modest and memory-bound: measured about 1 ms per step for GELU
# and 1-2 ms for the attention core at nanoGPT's recipe size (2-6% of a ~50 ms step). The maths
# functions above know nothing of it: each works on whatever rows it is given, and
# `on_two_cores(fn, ...)` gives the same result as calling `fn(...)` (a test checks it).
#
# A process asked to keep to one core (OPENBLAS_NUM_THREADS=1 or OMP_NUM_THREADS=1, as for each
# rank of `mpirun -n 2` on a 2-core machine, or a one-thread benchmark) gets no second thread
# here either: two ranks with two threads each would fight over the same two cores.
#
# `run_both(call_a, call_b)` is the coarser split the fast training path uses: two whole calls
# (the two halves of a batch) at once, each kept to one core. Inside them `on_two_cores` runs
# its function inline and matrix products use one BLAS thread (system.one_blas_thread), so there
# are never more busy threads than cores.

_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2)
_MIN_PARALLEL_SIZE = 1 << 15  # below ~32k elements the thread hand-off costs more than it saves


def one_thread_asked(environ=os.environ):
    """True if the environment limits numpy's BLAS to one thread."""
    return "1" in (environ.get("OPENBLAS_NUM_THREADS"), environ.get("OMP_NUM_THREADS"))


ONE_CORE = one_thread_asked()  # read once, at import: the BLAS library reads it then too


class _ThisThread(threading.local):
    active = False  # True while this thread runs one of the two calls of `run_both`


_ON_ONE_CORE = _ThisThread()


def on_two_cores(fn, *arrays):
    """fn(*arrays), run as two calls at once, each on half of the rows (axis 0) of the arrays.

    `fn` must write its results into output arrays among `arrays`, row i of each output
    depending only on row i of the inputs. An array is split if it has as many dimensions and
    rows as the first one; any other (None, or a mask that broadcasts over the rows, such as a
    causal mask (T, T)) is passed whole to both calls.
    Example: on_two_cores(f, x (B, T, C), mask (T, T), out (B, T, C)) runs
    f(x[:B//2], mask, out[:B//2]) and f(x[B//2:], mask, out[B//2:]).
    """
    first = arrays[0]
    rows = first.shape[0] if first.ndim else 0
    if ONE_CORE or _ON_ONE_CORE.active or rows < 2 or first.size < _MIN_PARALLEL_SIZE:
        fn(*arrays)
        return

    def part(rows_wanted):
        return [a[rows_wanted] if _has_rows(a, first) else a for a in arrays]

    half = rows // 2
    other = _POOL.submit(fn, *part(slice(None, half)))
    fn(*part(slice(half, None)))
    other.result()  # re-raises any error from the other thread


def _has_rows(a, first):
    """True if `a` has one row per row of `first` (so it is split with it)."""
    return a is not None and onp.ndim(a) == first.ndim and onp.shape(a)[0] == first.shape[0]


def can_run_two_at_once():
    """True if `run_both` can run its two calls at once, each kept to one core: the BLAS library
    lets tinyllm set its thread count, and it is 2 (two cores, the machine this was measured
    on). With more cores OpenBLAS's own threads are left to serve each product, as before;
    with one (OPENBLAS_NUM_THREADS=1, as under mpirun) there is no second core to use."""
    if ONE_CORE or _ON_ONE_CORE.active:
        return False
    threads = system.blas_threads()
    return threads is not None and threads[0]() == 2


def run_both(call_a, call_b):
    """(call_a(), call_b()): at the same time, each on one core, where `can_run_two_at_once()`;
    otherwise one after the other on this thread. The results are the same either way.

    While they run at once, matrix products use one BLAS thread, and `on_two_cores` runs its
    function inline in each call.
    """
    if not can_run_two_at_once():
        return call_a(), call_b()
    with system.one_blas_thread():
        other = _POOL.submit(_on_one_core, call_a)
        try:
            mine = _on_one_core(call_b)
        finally:
            concurrent.futures.wait([other])  # never leave a half running
        return other.result(), mine  # re-raises any error from the other thread


def _on_one_core(call):
    """call() with `on_two_cores` inline in this thread (see `run_both`)."""
    _ON_ONE_CORE.active = True
    try:
        return call()
    finally:
        _ON_ONE_CORE.active = False
