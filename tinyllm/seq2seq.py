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

A run directory is a standard tinyllm checkpoint (see checkpoint.py) with "kind": "seq2seq",
"model": the Seq2SeqConfig fields, and three more fields in config.json: "label_smoothing",
"schedule" ("cosine" or "noam") and "data" (the PAIRS path, or null for the embedded task) with
its "data_sha256". The tokenizer is a char tokenizer over both sides with the special tokens
<pad>, <bos> and <eos>.
"""

import math
import time
from dataclasses import dataclass, replace

import autograd.numpy as np
import numpy as onp
from autograd.tracer import getval

from .attention import cross_attention, self_attention
from .blocks import encoder_block, feed_forward
from .bleu import exact_match
from .checkpoint import load_checkpoint, register_model_kind, save_checkpoint
from .errors import TinyLLMError
from .models import INIT_STD, count_params, init_decoder_block, init_layer_norm, init_linear
from .ops import (causal_mask, cross_entropy, dropout, embedding, layer_norm, linear, log_softmax,
                  padding_mask)
from .seq2seq_data import (SEQ2SEQ_SPECIAL_TOKENS, encode_pairs, get_pair_batch, load_pairs,
                           make_arrays, pairs_text)
from .tokenizers import CharTokenizer
from .train import (prepare_out_dir, read_metrics, same_fingerprint, start_out_dir,
                    starting_state, stored_data_name, text_fingerprint, train_loop)

POSITIONS = ("sinusoidal", "learned", "none")  # "none" exists to test permutation equivariance
SCHEDULES = ("cosine", "noam")


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
    block = init_decoder_block(rng, config, dtype)  # ln_1, attn, ln_2, mlp
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
    params["encoder"] = [init_decoder_block(rng, config, dtype) for _ in range(config.n_layer)]
    params["enc_ln_f"] = init_layer_norm(c, config.bias, dtype)
    params["decoder"] = [init_cross_decoder_block(rng, config, dtype) for _ in range(config.n_layer)]
    params["dec_ln_f"] = init_layer_norm(c, config.bias, dtype)
    if not config.tie_weights:
        params["lm_head"] = {"w": (rng.standard_normal((c, v)) * INIT_STD).astype(dtype)}
    return params


register_model_kind("seq2seq", Seq2SeqConfig, init_seq2seq)


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


def encode(params, src, config, src_valid=None, rng=None):
    """The encoder: source ids (B, S), valid (B, S) of 0/1 or None -> memory (B, S, C).

    Bidirectional: no causal mask; only padding is hidden (by `blocks.encoder_block`).
    """
    x = embed_tokens(params["src_wte"], src, params.get("src_wpe"), config, rng)  # (B, S, C)
    dtype = getval(params["src_wte"]).dtype
    pad = None if src_valid is None else padding_mask(src_valid, dtype)  # (B, 1, 1, S)
    for block in params["encoder"]:
        x = encoder_block(x, **block, n_head=config.n_head, pad_mask=pad,
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


def decode(params, tgt_in, memory, config, src_valid=None, rng=None):
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
    memory = encode(params, src, config, src_valid, rng)  # (B, S, C)
    return decode(params, tgt_in, memory, config, src_valid, rng)


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


# ----------------------------------------------------------------------------- schedule


def noam_lr(it, d_model, warmup_iters, scale=1.0):
    """The paper's learning rate (section 5.3) at step `it` (from 0; the paper counts from 1):

        lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5),   step = it + 1

    It rises linearly for `warmup_iters` steps, peaks at d_model^-0.5 * warmup^-0.5, then decays
    as 1 / sqrt(step). Example: d_model 128, warmup 400 -> peak at it = 399: 0.0884 * 0.05 = 0.00442;
    it = 1599 (step 1600): 0.0884 / 40 = 0.00221, half the peak.
    """
    step = it + 1
    return scale * d_model**-0.5 * min(step**-0.5, step * max(1, warmup_iters) ** -1.5)


# ----------------------------------------------------------------------------- a training run


def learning_rate_schedule(name, d_model, tc):
    """The learning rate by step for `train.train_loop`: "cosine" (warm-up + cosine, the loop's
    own default: None) or "noam" (the paper's, `noam_lr`, which ignores --lr and --min-lr)."""
    if name == "cosine":
        return None
    return lambda it: noam_lr(it, d_model, tc.warmup_iters)


def train_seq2seq(model_config, tc, out_dir, data=None, label_smoothing=0.1, schedule="cosine",
                  resume=False, force=False, max_iters=None, eval_examples=500, log=print):
    """Train an encoder-decoder on PAIRS (a file or the embedded task) with checkpoints in out_dir.

    With resume=True the model, tokenizer, data and training settings come from the checkpoint;
    only `max_iters` may change. Ends with greedy decoding of up to `eval_examples` held-out
    pairs. Returns a summary dict.
    """
    prepare_out_dir(out_dir, resume, force)
    if resume:
        ckpt = load_checkpoint(out_dir, with_optimizer=True, kind="seq2seq")
        model_config, tokenizer, data = ckpt.model_config, ckpt.tokenizer, ckpt.meta.get("data")
        label_smoothing, schedule = ckpt.meta["label_smoothing"], ckpt.meta["schedule"]
        tc = replace(ckpt.train_config, max_iters=max_iters or ckpt.train_config.max_iters)
    tc.validate()
    check_training_options(label_smoothing, schedule)
    train_pairs, held_pairs = load_pairs(data)
    fingerprint = text_fingerprint(pairs_text(train_pairs + held_pairs))
    if resume and not same_fingerprint(ckpt.meta.get("data_sha256"),
                                       pairs_text(train_pairs + held_pairs)):
        raise TinyLLMError(f"--resume: the data {data!r} has changed since the run began")
    if not resume:
        tokenizer = CharTokenizer.train(pairs_text(train_pairs + held_pairs), SEQ2SEQ_SPECIAL_TOKENS)
        model_config = replace(model_config, vocab_size=tokenizer.vocab_size)
    model_config.validate()
    arrays = split_arrays(tokenizer, model_config.block_size, train_pairs, held_pairs)
    start_out_dir(out_dir, resume, force)

    state = starting_state(out_dir, tc, lambda rng: init_seq2seq(model_config, rng),
                           ckpt if resume else None, log)
    log(f"data: {data or 'dates (embedded task)'}, {len(train_pairs):,} training and"
        f" {len(held_pairs):,} held-out pairs (vocab {tokenizer.vocab_size});"
        f" model: {count_params(state.params):,} parameters")

    def loss_fn(params, batch, rng):
        return seq2seq_loss(params, batch, model_config, label_smoothing, rng)

    def sample(split, rng):
        return get_pair_batch(arrays[split], tc.batch_size, rng)

    extra = {"data": stored_data_name(data), "data_sha256": fingerprint, "label_smoothing": label_smoothing,
             "schedule": schedule}

    def save(s):
        save_checkpoint(out_dir, s.params, s.opt_state, s.rng_state, model_config, tc, tokenizer,
                        s.iteration, extra={**extra, "last_eval_iter": s.last_eval_iter},
                        kind="seq2seq")

    t0 = time.perf_counter()
    tokens = tc.batch_size * (arrays["train"][0].shape[1] + arrays["train"][2].shape[1])
    state = train_loop(state, tc, loss_fn, sample, save, out_dir, tokens,
                       lr_fn=learning_rate_schedule(schedule, model_config.n_embd, tc))
    seconds = time.perf_counter() - t0
    scored = held_pairs[:eval_examples]
    from .decoding import translate_texts  # imported here: decoding imports this module

    outputs = translate_texts(state.params, model_config, tokenizer, [p.source for p in scored],
                              [p.where for p in scored])
    return {"params": state.params, "model_config": model_config, "tokenizer": tokenizer,
            "seconds": seconds, "final": read_metrics(out_dir)[-1], "held_out": len(scored),
            "exact_match": exact_match(outputs, [p.target for p in scored]),
            "examples": list(zip(scored[:5], outputs[:5]))}


def check_training_options(label_smoothing, schedule):
    """One-line errors for seq2seq-specific training settings."""
    if not 0.0 <= label_smoothing < 1.0:
        raise TinyLLMError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    if schedule not in SCHEDULES:
        raise TinyLLMError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def split_arrays(tokenizer, block_size, train_pairs, held_pairs):
    """Encode both splits and pad them to the same lengths: {"train": arrays, "val": arrays}."""
    encoded = {"train": encode_pairs(tokenizer, train_pairs, block_size),
               "val": encode_pairs(tokenizer, held_pairs, block_size)}
    src_len = max(len(s) for sources, _ in encoded.values() for s in sources)
    tgt_len = max(len(t) for _, targets in encoded.values() for t in targets) + 1
    return {split: make_arrays(src, tgt, tokenizer.special_tokens, src_len, tgt_len)
            for split, (src, tgt) in encoded.items()}
