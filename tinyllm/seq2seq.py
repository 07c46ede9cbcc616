"""The encoder-decoder transformer of "Attention Is All You Need" (Vaswani et al. 2017), pre-LN.

    source ids (B, S) -> embed + positions -> N encoder blocks -> memory (B, S, C)
    target ids (B, T) -> embed + positions -> N decoder blocks (causal self-attention,
                         cross-attention to memory, MLP) -> layer norm -> logits (B, T, V)

Trained by teacher forcing: the decoder reads the target shifted right behind a begin token,
<bos> y1 y2 ... yn, and predicts y1 y2 ... yn <eos>, every position at once.

Parameter tree (V vocab, C channels, L = n_layer, P = block_size):
    src_wte (V, C)          source token embedding; also the target one when share_embeddings
    tgt_wte (V, C)          only when the embeddings are not shared
    src_wpe, tgt_wpe (P, C) only with positions="learned" (sinusoidal encodings are not learned)
    encoder [L blocks]      {"ln_1", "attn": {"c_attn", "c_proj"}, "ln_2", "mlp"}, as GPT's blocks
    enc_ln_f                the encoder's final layer norm (pre-LN needs one at the end)
    decoder [L blocks]      {"ln_1", "attn", "ln_2", "xattn": {"c_q", "c_kv", "c_proj"}, "ln_3", "mlp"}
    dec_ln_f                the decoder's final layer norm
    lm_head {"w": (C, V)}   only when the output head is not tied to the target embedding

This file is the model only (config, init, encoder and decoder forward passes, loss); the
training run is tinyllm/seq2seq_run.py and decoding is tinyllm/decoding.py.
"""

import math
from dataclasses import dataclass

import autograd.numpy as np
import numpy as onp
from autograd.tracer import getval

from .attention import cross_attention, self_attention
from .blocks import encoder_block, feed_forward
from .errors import TinyLLMError
from .models import INIT_STD, init_gpt_block, init_layer_norm, init_linear
from .ops import (causal_mask, cross_entropy, dropout, embedding, layer_norm, linear, log_softmax,
                  padding_mask)

POSITIONS = ("sinusoidal", "learned", "none")  # "none" exists to test permutation equivariance


@dataclass(frozen=True)
class Seq2SeqConfig:
    """The shape of an encoder-decoder transformer."""

    vocab_size: int = 64  # one vocabulary for both sides; set from the tokenizer
    block_size: int = 64  # most tokens on either side (a target counts its <bos> or <eos>)
    n_layer: int = 2  # encoder blocks, and as many decoder blocks (the paper's base model: 6)
    n_head: int = 4  # attention heads; head size D = n_embd / n_head = 16
    n_embd: int = 64  # d_model, channels C (the paper: 512); 64 learns the dates task fully
    dropout: float = 0.0  # the paper uses 0.1; short runs on generated data do not overfit
    bias: bool = True  # biases in linear layers and layer norms
    positions: str = "sinusoidal"  # the paper's fixed encodings; "learned" as in GPT
    share_embeddings: bool = True  # one table for source and target tokens (paper, section 3.4)
    tie_weights: bool = True  # the output head reuses the target embedding (paper, section 3.4)

    def validate(self):
        """Raise TinyLLMError for settings that cannot make a model; return self."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise TinyLLMError(f"--{name.replace('_', '-')} must be positive")
        if self.n_embd % self.n_head:
            raise TinyLLMError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if self.positions not in POSITIONS:
            raise TinyLLMError(f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TinyLLMError(f"--dropout must be in [0, 1), got {self.dropout}")
        return self


# ----------------------------------------------------------------------------- initialisation


def init_cross_decoder_block(rng, config, dtype="float32"):
    """A decoder block with cross-attention: a GPT block plus "ln_3" and "xattn"."""
    c, bias = config.n_embd, config.bias
    block = init_gpt_block(rng, config, dtype)  # ln_1, attn, ln_2, mlp
    # GPT-2 scales each projection into the residual stream by 1/sqrt(number of residual writes);
    # this block writes 3 times, not 2, so its projections get 0.02/sqrt(3 L), not 0.02/sqrt(2 L)
    proj_std = INIT_STD / math.sqrt(3 * config.n_layer)
    block["attn"]["c_proj"]["w"] *= math.sqrt(2.0 / 3.0)  # 0.02/sqrt(2 L) -> 0.02/sqrt(3 L)
    block["mlp"]["c_proj"]["w"] *= math.sqrt(2.0 / 3.0)
    block["xattn"] = {
        "c_q": init_linear(rng, c, c, bias, dtype=dtype),
        "c_kv": init_linear(rng, c, 2 * c, bias, dtype=dtype),
        "c_proj": init_linear(rng, c, c, bias, std=proj_std, dtype=dtype),
    }
    block["ln_3"] = init_layer_norm(c, bias, dtype)
    return block


def init_seq2seq(config, rng, dtype="float32"):
    """Fresh encoder-decoder parameters for `config`, drawn from the numpy Generator `rng`."""
    config.validate()
    v, p, c = config.vocab_size, config.block_size, config.n_embd
    table = lambda rows: (rng.standard_normal((rows, c)) * INIT_STD).astype(dtype)  # noqa: E731
    params = {"src_wte": table(v)}
    if not config.share_embeddings:
        params["tgt_wte"] = table(v)
    if config.positions == "learned":
        params["src_wpe"], params["tgt_wpe"] = table(p), table(p)
    params["encoder"] = [init_gpt_block(rng, config, dtype) for _ in range(config.n_layer)]
    params["enc_ln_f"] = init_layer_norm(c, config.bias, dtype)
    params["decoder"] = [init_cross_decoder_block(rng, config, dtype) for _ in range(config.n_layer)]
    params["dec_ln_f"] = init_layer_norm(c, config.bias, dtype)
    if not config.tie_weights:
        params["lm_head"] = {"w": (rng.standard_normal((c, v)) * INIT_STD).astype(dtype)}
    return params



# ----------------------------------------------------------------------------- positions, embedding


def sinusoidal_positions(n_pos, n_embd, dtype="float32"):
    """The paper's fixed position encodings (section 3.5): (P, C), not learned.

    PE[pos, 2i] = sin(pos / 10000^(2i / C)), PE[pos, 2i + 1] = cos(pos / 10000^(2i / C)).
    Example: n_embd = 2 -> PE[pos] = [sin(pos), cos(pos)]; PE[0] = [0, 1].
    Each pair of channels is a clock of its own period, so PE[pos + k] is a rotation of PE[pos].
    """
    pos = onp.arange(n_pos, dtype=onp.float64)[:, None]  # (P, 1)
    rate = 10000.0 ** (-onp.arange(0, n_embd, 2, dtype=onp.float64) / n_embd)  # (ceil(C/2),)
    pe = onp.zeros((n_pos, n_embd))
    pe[:, 0::2] = onp.sin(pos * rate)
    pe[:, 1::2] = onp.cos(pos * rate)[:, : n_embd // 2]
    return pe.astype(dtype)


def embed_tokens(table, ids, wpe, config, rng=None):
    """Token embedding scaled by sqrt(C) (paper, section 3.4) plus positions: (B, T) -> (B, T, C).

    The scaling lifts embeddings drawn with std 0.02 to the scale of the sinusoids (amplitude 1),
    so that the position signal does not drown the token. `wpe` is the learned table or None.
    """
    t = ids.shape[1]
    if t > config.block_size:
        raise TinyLLMError(f"sequence of {t} tokens is longer than block_size {config.block_size}")
    x = embedding(table, ids) * math.sqrt(config.n_embd)  # (B, T, C)
    dtype = getval(table).dtype
    if config.positions == "sinusoidal":
        x = x + sinusoidal_positions(t, config.n_embd, dtype)  # (B, T, C) + (T, C)
    elif config.positions == "learned":
        x = x + wpe[:t]
    return dropout(x, config.dropout, rng)


def target_table(params):
    """The target embedding (V, C): the source one when they are shared."""
    return params.get("tgt_wte", params["src_wte"])


def output_weight(params):
    """The (C, V) matrix that turns decoder states into logits: the target embedding^T when tied."""
    if "lm_head" in params:
        return params["lm_head"]["w"]
    return np.transpose(target_table(params))  # (V, C) -> (C, V)


# ----------------------------------------------------------------------------- encoder, decoder


def encoder_forward(params, src, config, src_valid=None, rng=None):
    """The encoder: source ids (B, S), valid (B, S) of 0/1 or None -> memory (B, S, C).

    Bidirectional: no causal mask; only padding is hidden (by `blocks.encoder_block`).
    """
    x = embed_tokens(params["src_wte"], src, params.get("src_wpe"), config, rng)  # (B, S, C)
    dtype = getval(params["src_wte"]).dtype
    pad = None if src_valid is None else padding_mask(src_valid, dtype)  # (B, 1, 1, S)
    for block in params["encoder"]:
        x = encoder_block(x, **block, n_head=config.n_head, mask=pad,
                          dropout_p=config.dropout, rng=rng)  # (B, S, C)
    return layer_norm(x, **params["enc_ln_f"])  # (B, S, C)


def cross_decoder_block(x, memory, ln_1, attn, ln_2, xattn, ln_3, mlp, n_head, self_mask,
                        memory_mask=None, dropout_p=0.0, rng=None):
    """One decoder block of the paper, pre-LN: three residual sub-layers. (B, T, C) -> (B, T, C).

    1. causal self-attention: each target position reads the positions before it;
    2. cross-attention: each target position reads the whole (unpadded) source memory (B, S, C);
    3. the position-wise MLP.
    """
    a = self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, mask=self_mask,
                       dropout_p=dropout_p, rng=rng)  # (B, T, C)
    x = x + dropout(a, dropout_p, rng)
    a = cross_attention(layer_norm(x, **ln_2), memory, **xattn, n_head=n_head, mask=memory_mask,
                        dropout_p=dropout_p, rng=rng)  # (B, T, C) reading (B, S, C)
    x = x + dropout(a, dropout_p, rng)
    return x + feed_forward(layer_norm(x, **ln_3), **mlp, dropout_p=dropout_p, rng=rng)


def decoder_forward(params, tgt_in, memory, config, src_valid=None, rng=None):
    """The decoder: target ids (B, T) and memory (B, S, C) -> next-token logits (B, T, V)."""
    x = embed_tokens(target_table(params), tgt_in, params.get("tgt_wpe"), config, rng)  # (B, T, C)
    dtype = getval(params["src_wte"]).dtype
    self_mask = causal_mask(tgt_in.shape[1], dtype)  # (T, T)
    memory_mask = None if src_valid is None else padding_mask(src_valid, dtype)  # (B, 1, 1, S)
    for block in params["decoder"]:
        x = cross_decoder_block(x, memory, **block, n_head=config.n_head, self_mask=self_mask,
                                memory_mask=memory_mask, dropout_p=config.dropout, rng=rng)
    return linear(layer_norm(x, **params["dec_ln_f"]), output_weight(params))  # (B, T, V)


def seq2seq_forward(params, src, tgt_in, config, src_valid=None, rng=None):
    """Teacher-forced logits: source (B, S), shifted target (B, T) -> (B, T, V)."""
    memory = encoder_forward(params, src, config, src_valid, rng)  # (B, S, C)
    return decoder_forward(params, tgt_in, memory, config, src_valid, rng)


# ----------------------------------------------------------------------------- loss


def label_smoothed_cross_entropy_reference(logits, targets, mask, smoothing):
    """Cross-entropy against q = (1 - eps) onehot(target) + eps / V, written plainly.

    (N, V), (N,), (N,) 0/1, eps -> scalar mean over positions whose mask is 1.
    Example: logits [[0, 0]], target [1], eps 0.1: q = [0.05, 0.95], -sum q log p = ln 2.
    """
    v = logits.shape[-1]
    onehot = (onp.arange(v)[None, :] == onp.asarray(targets)[:, None]).astype(getval(logits).dtype)
    q = onehot * (1.0 - smoothing) + smoothing / v  # (N, V)
    per_row = -np.sum(q * log_softmax(logits), axis=-1)  # (N,)
    m = onp.asarray(mask, dtype=getval(logits).dtype)
    return np.sum(per_row * m) / max(float(m.sum()), 1.0)


def label_smoothed_cross_entropy(logits, targets, mask, smoothing):
    """The same loss as the reference, split as (1 - eps) NLL + eps (uniform cross-entropy).

    Label smoothing (Szegedy et al. 2016; the paper uses eps = 0.1) asks the model to keep a
    little probability on every token: it "hurts perplexity, as the model learns to be more
    unsure, but improves accuracy and BLEU" (paper, section 5.4). The NLL part is the fused
    `ops.cross_entropy`; the uniform part is -mean_v log p_v over the same positions.
    """
    nll = cross_entropy(logits, targets, mask)  # scalar, fused
    if smoothing == 0.0:
        return nll
    lv = getval(logits)
    weight = onp.asarray(mask, dtype=lv.dtype)
    weight = weight * (1.0 / max(float(weight.sum()), 1.0))  # (N,) mask / count
    uniform = -np.sum(np.sum(log_softmax(logits), axis=-1) * weight) * (1.0 / lv.shape[-1])
    return nll * (1.0 - smoothing) + uniform * smoothing


def seq2seq_loss(params, batch, config, smoothing=0.0, rng=None):
    """Teacher-forcing loss of a batch (src, src_valid, tgt_in, tgt_out, tgt_mask) -> scalar."""
    src, src_valid, tgt_in, tgt_out, tgt_mask = batch
    logits = seq2seq_forward(params, src, tgt_in, config, src_valid, rng)  # (B, T, V)
    v = logits.shape[-1]
    return label_smoothed_cross_entropy(np.reshape(logits, (-1, v)), onp.reshape(tgt_out, (-1,)),
                                        onp.reshape(tgt_mask, (-1,)), smoothing)
