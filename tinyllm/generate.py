"""Sampling text from a trained model, one token at a time.

Autoregressive generation: feed the context, take the logits at the last position, turn them
into a distribution, draw a token, append it, repeat. The model sees at most block_size tokens,
so a longer context keeps its last block_size tokens.

Shaping the distribution (applied in this order):
- temperature: divide the logits by it. < 1 sharpens, > 1 flattens; 0 means greedy (argmax).
- top-k: keep the k most likely tokens.
- top-p (nucleus, Holtzman et al. 2020): keep the smallest set of most likely tokens whose
  probabilities add up to at least p.

Two loops, each written once: `generate_ids` samples one sequence (any temperature; a context
longer than block_size slides), and `greedy_batch` decodes many prompts greedily at once, which
is what scoring needs (few-shot answers, instruction-tuned responses). For a prompt whose answer
fits in the context the two give the same tokens at temperature 0 (a test checks it).

Both run on a key/value cache by default (tinyllm/kv_cache.py: each step feeds the model only
the new token); `use_cache=False` (the `--no-cache` flag) runs the plain loops below, which feed
the whole context every step, and are the way to read and check what generation does. The two
give the same tokens (tests/test_kv_cache.py).

Decoding an encoder-decoder is tinyllm/decoding.py: its decoder reads the encoder's output
and starts from <bos>, so its loop differs.
"""

import numpy as onp

from .errors import TinyLLMError
from .kv_cache import GPTCache, greedy_batch_cached
from .models import check_finite_outputs, gpt_forward
from .ops import softmax

MAX_NEW_TOKENS = 200  # a few lines of text: enough to judge a sample, quick on a CPU


def top_k_filter(logits, k):
    """Set all but the k largest logits to -inf. Example: [1, 3, 2], k=2 -> [-inf, 3, 2]."""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = onp.sort(logits)[-k]
    return onp.where(logits < kth, -onp.inf, logits)


def top_p_filter(probs, p):
    """Zero the tail of a distribution outside the top-p nucleus and renormalise.

    Example: probs [0.5, 0.3, 0.2], p=0.7 -> keeps 0.5 and 0.3 (sum 0.8 >= 0.7) -> [0.625, 0.375, 0].
    """
    if p is None or p >= 1.0:
        return probs
    order = onp.argsort(-probs)  # most likely first
    before = onp.cumsum(probs[order]) - probs[order]  # mass strictly before each token
    keep = onp.zeros_like(probs, dtype=bool)
    keep[order[before < p]] = True  # a token is in if the mass before it is still short of p
    kept = onp.where(keep, probs, 0.0)
    return kept / kept.sum()


def next_token_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """Logits (V,) -> probabilities (V,) after temperature, top-k and top-p. Temperature > 0.

    The largest logit is subtracted before dividing (softmax does not change): a temperature so
    small that a logit / temperature overflows then sends the others to -inf, never to inf - inf.
    """
    logits = logits.astype(onp.float64)
    with onp.errstate(over="ignore"):  # -inf is the intended result of that overflow
        logits = top_k_filter((logits - logits.max()) / temperature, top_k)
    return top_p_filter(softmax(logits), top_p)


def sample_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Choose the next token id from the last position's logits (V,)."""
    if temperature == 0:
        return int(onp.argmax(logits))
    probs = next_token_distribution(logits, temperature, top_k, top_p)
    check_finite_outputs(probs)
    return int(rng.choice(len(probs), p=probs))


def generate_ids(params, config, ids, max_new_tokens, rng, temperature=1.0, top_k=None,
                 top_p=None, stop=None, use_cache=True):
    """Extend token ids by up to max_new_tokens; returns the new ids only.

    `stop(new_ids) -> bool` ends generation early when it returns True (e.g. a stop text or
    an end-of-text token was produced). `use_cache=False` recomputes the whole window each step.
    """
    if not ids:
        raise TinyLLMError("generation needs at least one token of context")
    next_logits = GPTCache(params, config).next_logits if use_cache else (
        lambda window: last_logits(params, config, window))
    context, new = list(ids), []
    for _ in range(max_new_tokens):
        logits = next_logits(context[-config.block_size:])  # (V,) after the last block_size ids
        token = sample_token(logits, rng, temperature, top_k, top_p)
        context.append(token)
        new.append(token)
        if stop is not None and stop(new):
            break
    return new


def last_logits(params, config, window):
    """The plain way: the whole window (a list of ids) through the model -> the last logits (V,)."""
    ids = onp.asarray(window, dtype=onp.int32)[None, :]  # (1, T)
    return gpt_forward(params, ids, config)[0, -1]  # (1, T, V) -> (V,)


def generate_text(params, config, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS,
                  temperature=1.0, top_k=None, top_p=None, seed=None, stop_text=None,
                  use_cache=True, on_text=None):
    """Complete `prompt` with the model; returns the completion (without the prompt).

    Generation ends at max_new_tokens, at the end-of-text token, or just before `stop_text`,
    whichever comes first. An empty prompt starts from a newline (or end-of-text).
    `use_cache=False` generates without the key/value cache (same tokens, slower).
    `on_text(piece)`, if given, gets the completion as it is made, each piece final (see
    `TextStream`): the pieces add up to the text returned.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    ids = tokenizer.encode(prompt) if prompt else _start_ids(tokenizer, eot)
    return complete_ids(params, config, tokenizer, ids, max_new_tokens,
                        onp.random.default_rng(seed), temperature, top_k, top_p, stop_text,
                        use_cache, on_text)[0]


def complete_ids(params, config, tokenizer, ids, max_new_tokens, rng, temperature=1.0,
                 top_k=None, top_p=None, stop_text=None, use_cache=True, on_text=None):
    """(text, new ids): the completion of the token ids `ids`, its text passed to `on_text` as
    it is made (see `TextStream`). It ends at max_new_tokens, at the end-of-text token (not
    part of the text), or just before `stop_text`. `generate_text` and `tinyllm generate
    --instruction` both use it."""
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    stream = TextStream(tokenizer, stop_text, on_text)

    def stop(new):
        if eot is not None and new[-1] == eot:
            return True  # end of text, which is not part of it
        return stream.add(new[-1])

    new = generate_ids(params, config, ids, max_new_tokens, rng, temperature, top_k, top_p,
                       stop, use_cache)
    return stream.finish(), new


class TextStream:
    """The text of new tokens as they come, each character passed on once and final, and the
    stop text looked for in the new text only, so that a step costs the same at token 100,000
    as at token 10 (decoding all the text so far at every step made a long run quadratic).

    Two things hold a character back. It may be unfinished: byte-level BPE can split a
    character's UTF-8 bytes over tokens, and a text that ends in the middle of one decodes to a
    last U+FFFD that the next token may complete (the characters before it never change). And it
    may be the start of the stop text, which the next tokens may finish.
    Example, stop text "\n\n": "ab\n" passes on "ab" and holds "\n"; then "\nc" stops, and the
    completion is "ab".
    """

    def __init__(self, tokenizer, stop_text=None, on_text=None):
        self.tokenizer, self.stop_text = tokenizer, stop_text or ""
        self.on_text = on_text or (lambda piece: None)
        self.pending = []  # ids since the decoded text last ended on a whole character
        self.used = 0  # characters of decode(pending) already taken
        self.held = ""  # taken text that may be the start of the stop text
        self.parts = []  # the text passed on so far
        self.stopped = False

    def add(self, token):
        """Take the next token; True once the stop text has appeared (the text ends before it)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        whole = not text.endswith("\ufffd")  # else the last character may still be unfinished
        settled = text if whole else text[:-1]
        self._take(settled[self.used:])
        self.pending, self.used = ([], 0) if whole else (self.pending, len(settled))
        return self.stopped

    def finish(self):
        """Generation has ended: what was held back is final. Returns the whole completion."""
        if not self.stopped:
            self._take(self.tokenizer.decode(self.pending)[self.used:])
            self._pass_on(self.held)
        return "".join(self.parts)

    def _take(self, piece):
        held = self.held + piece
        if self.stop_text and self.stop_text in held:
            self._pass_on(held[:held.index(self.stop_text)])
            self.held, self.stopped = "", True
            return
        keep = _stop_prefix_at_end(held, self.stop_text)
        self._pass_on(held[:len(held) - keep])
        self.held = held[len(held) - keep:]

    def _pass_on(self, piece):
        if piece:
            self.parts.append(piece)
            self.on_text(piece)


def _stop_prefix_at_end(text, stop):
    """Length of the longest end of `text` that begins `stop` (0 if none). Example: "ab\n",
    "\n\n" -> 1; "abc", "cat" -> 1; "abc", "x" -> 0."""
    for start in range(max(0, len(text) - len(stop) + 1), len(text)):
        if stop.startswith(text[start:]):
            return len(text) - start
    return 0


def _start_ids(tokenizer, eot):
    try:
        return tokenizer.encode("\n")
    except TinyLLMError:
        if eot is None:
            raise TinyLLMError("the prompt is empty and the tokenizer has no newline") from None
        return [eot]


def check_sampling_args(temperature, top_k, top_p, max_new_tokens):
    """One-line errors for sampling settings that make no sense."""
    if not temperature >= 0:  # written so that NaN fails it too
        raise TinyLLMError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise TinyLLMError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise TinyLLMError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise TinyLLMError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


# ----------------------------------------------------------------------------- batched greedy decoding


def greedy_batch(params, config, prompts, limits, stop_id, batch_size=64, use_cache=True):
    """Greedy answers to many prompts at once: token lists -> new token lists (stop_id removed).

    The prompts sit left-aligned in one right-padded batch; at each step every unfinished row
    takes the argmax at its own last position and writes it just after. Because attention is
    causal, the padding to the right of a row never changes its logits, so each row gets what
    decoding it alone would give, at the cost of one forward pass per step for the whole batch.
    A row stops at `stop_id` (end of text, or a newline for a one-line answer), after
    `limits[i]` new tokens, or when it fills the context (block_size): there is no sliding here.
    With `use_cache` (the default) the same loop runs on a key/value cache
    (`kv_cache.greedy_batch_cached`): the prompts are read once, then one token per row a step.
    """
    decode = greedy_batch_cached if use_cache else _greedy_chunk
    out = []
    for start in range(0, len(prompts), batch_size):
        out += decode(params, config, prompts[start:start + batch_size],
                      limits[start:start + batch_size], stop_id)
    return out


def _greedy_chunk(params, config, prompts, limits, stop_id):
    t = config.block_size
    lengths = onp.array([len(p) for p in prompts])  # (N,)
    ids = onp.zeros((len(prompts), t), dtype=onp.int32)  # (N, T)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    ends = onp.minimum(lengths + onp.asarray(limits), t)  # (N,) last position + 1 allowed
    done = lengths >= ends
    rows = onp.arange(len(prompts))
    while not done.all():
        width = int(lengths[~done].max())
        logits = onp.asarray(gpt_forward(params, ids[:, :width], config))  # (N, W, V)
        nxt = logits[rows, onp.minimum(lengths, width) - 1].argmax(axis=-1)  # (N,)
        active = rows[~done]
        ids[active, lengths[active]] = nxt[active]
        lengths[active] += 1
        done[active[nxt[active] == stop_id]] = True  # this row's answer is complete
        done |= lengths >= ends
    new = []
    for row, prompt in enumerate(prompts):
        tokens = ids[row, len(prompt):lengths[row]].tolist()
        new.append(tokens[:tokens.index(stop_id)] if stop_id in tokens else tokens)
    return new
