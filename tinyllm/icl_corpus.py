"""A generated pretraining corpus that teaches in-context learning, and held-out tasks to test it.

In-context learning needs the right data more than a big model (Chan et al. 2022, "Data
Distributional Properties Drive Emergent In-Context Learning"; Garg et al. 2022, "What Can
Transformers Learn In-Context?"). So this corpus is a long run of *episodes*. Each episode
draws a fresh random function and then writes demonstrations of it, one per line, in exactly
the template `tinyllm fewshot` uses for its prompts (tinyllm/fewshot_template.py):

    map each letter to a digit        <- the instruction line (in half of the episodes)
    q7                                <- "{input}{output}", inputs drawn with replacement
    c0
    q7                                <- a repeated input: the output can be copied from above
    ...
                                      <- a blank line ends the episode

A function is never reused, so the only way to predict an output is to find the same input
earlier in the episode and copy what followed it: the induction-head pattern of Olsson et al.
(2022). The first time an input appears its output is unpredictable (a uniform guess).

Families (input alphabet -> output alphabet): letters -> letters, letters -> digits,
digits -> letters. An episode's function is defined on a random domain of 2 to 6 inputs, and
outputs are drawn with replacement (a random function, not a permutation), so an undemonstrated
input cannot be guessed by elimination either.

Three in ten episodes are Olsson et al.'s plainest induction data instead: one random string
of 4 to 10 letters and digits, repeated on 3 to 6 lines ("repeat the line" as instruction in
half of them). Every token of a repeat can be predicted by "find this token earlier and copy
what followed it", which makes induction heads form sooner: with them, a 2-layer model reached
0.91 8-shot accuracy on unseen functions after 2000 steps, against 0.45 for a corpus without
repeats (and with domains of 2 to 8 inputs and 8 to 28 lines).

The corpus is generated deterministically from CORPUS_SEED. Held-out tasks come from other
seeds and are checked never to occur in the corpus (no episode holds all of a held-out task's
input -> output pairs).
"""

import functools

import numpy as onp

from .fewshot_template import demo_line, instruction_line

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

# family name -> (input alphabet, output alphabet, instruction line)
FAMILIES = {
    "letters-to-letters": (LETTERS, LETTERS, "map each letter to a letter"),
    "letters-to-digits": (LETTERS, DIGITS, "map each letter to a digit"),
    "digits-to-letters": (DIGITS, LETTERS, "map each digit to a letter"),
}

CORPUS_SEED = 20220308  # fixed: the corpus is the same on every machine and every run
N_EPISODES = 6000  # about 0.4 MB of text: varied enough, and it tokenizes in a second
DOMAIN_SIZES = (2, 6)  # inclusive range of how many distinct inputs one function has
DEMOS_PER_EPISODE = (12, 32)  # inclusive range of demonstration lines per episode
REPEAT_FRACTION = 0.3  # share of episodes that repeat a random string (induction-head data)
REPEAT_INSTRUCTION = "repeat the line"


def draw_function(rng, family, domain_size):
    """A random function: `domain_size` distinct inputs, each with an output drawn uniformly.

    Example: family "digits-to-letters", domain_size 2 -> e.g. {"3": "q", "8": "q"}.
    """
    inputs, outputs, _ = FAMILIES[family]
    domain = rng.choice(len(inputs), size=domain_size, replace=False)  # (domain_size,)
    images = rng.integers(0, len(outputs), size=domain_size)  # (domain_size,), with repeats
    return {inputs[i]: outputs[j] for i, j in zip(domain, images)}


def draw_records(rng, function, n):
    """n demonstrations of `function`, inputs drawn with replacement, as {"input", "output"} dicts."""
    keys = sorted(function)
    picks = rng.integers(0, len(keys), size=n)  # (n,)
    return [{"input": keys[i], "output": function[keys[i]]} for i in picks]


def episode_text(instruction, records):
    """One episode in the fewshot template, ending with a blank line.

    Example: ("map each digit to a letter", [{"input": "3", "output": "q"}])
        -> "map each digit to a letter\\n3q\\n\\n"
    """
    return instruction_line(instruction) + "".join(demo_line(r) for r in records) + "\n"


def repeat_episode(rng):
    """A random string of 4 to 10 letters and digits on 3 to 6 lines. Example: "k2qz\\nk2qz\\n..."."""
    alphabet = LETTERS + DIGITS
    line = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=rng.integers(4, 11)))
    head = instruction_line(REPEAT_INSTRUCTION if rng.random() < 0.5 else None)
    return head + (line + "\n") * int(rng.integers(3, 7)) + "\n"


def draw_episode(rng):
    """(function, text) of one random episode: a random function, or ({}, a repeated string)."""
    if rng.random() < REPEAT_FRACTION:
        return {}, repeat_episode(rng)
    family = list(FAMILIES)[rng.integers(len(FAMILIES))]
    function = draw_function(rng, family, int(rng.integers(DOMAIN_SIZES[0], DOMAIN_SIZES[1] + 1)))
    records = draw_records(rng, function, int(rng.integers(DEMOS_PER_EPISODE[0],
                                                           DEMOS_PER_EPISODE[1] + 1)))
    instruction = FAMILIES[family][2] if rng.random() < 0.5 else None
    return function, episode_text(instruction, records)


@functools.lru_cache(maxsize=4)
def corpus_episodes(seed=CORPUS_SEED, n_episodes=N_EPISODES):
    """The corpus as a tuple of (function, text) episodes; cached, since it is deterministic."""
    rng = onp.random.default_rng(seed)
    return tuple(draw_episode(rng) for _ in range(n_episodes))


def icl_corpus(seed=CORPUS_SEED, n_episodes=N_EPISODES):
    """The embedded corpus `tinyllm pretrain --data icl` trains on: all episodes joined."""
    return "".join(text for _, text in corpus_episodes(seed, n_episodes))


def seen_pairs(seed=CORPUS_SEED, n_episodes=N_EPISODES):
    """The set of input->output pairs of each corpus function, as frozensets (for novelty checks)."""
    return [frozenset(f.items()) for f, _ in corpus_episodes(seed, n_episodes) if f]


def occurs_in_corpus(function, seed=CORPUS_SEED, n_episodes=N_EPISODES):
    """True if some corpus episode's function agrees with `function` on every one of its inputs."""
    pairs = frozenset(function.items())
    return any(pairs <= seen for seen in seen_pairs(seed, n_episodes))


def heldout_task(seed, family="letters-to-letters", domain_size=4, n_records=60,
                 instruction=True):
    """A task never seen in pretraining: (header dict, records), ready for a task file.

    The function is redrawn until it occurs nowhere in the corpus. Domain size 4 by default:
    k demonstrations drawn with replacement cover a query's input with probability
    1 - (3/4)^k (0.25, 0.44, 0.68, 0.90 for k = 1, 2, 4, 8), so accuracy should rise with k.
    """
    rng = onp.random.default_rng([seed, 7919])  # a seed stream apart from CORPUS_SEED's
    function = draw_function(rng, family, domain_size)
    while occurs_in_corpus(function):
        function = draw_function(rng, family, domain_size)
    header = {"instruction": FAMILIES[family][2]} if instruction else {}
    return header, draw_records(rng, function, n_records)
