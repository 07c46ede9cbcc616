"""Scores of generated text against references, written out by hand: corpus BLEU-4 (Papineni et
al. 2002) and exact match. Both the seq2seq commands and instruction fine-tuning use them.

BLEU compares candidate translations with one reference each, over the whole corpus at once:

    p_n  = sum over sentences of n-gram matches (each clipped to its count in the reference)
           / sum over sentences of the candidate's n-grams,                n = 1..4
    BP   = 1 if c > r else exp(1 - r / c)   (c, r: total candidate and reference lengths)
    BLEU = BP * exp((log p_1 + log p_2 + log p_3 + log p_4) / 4)

Words are the whitespace-separated pieces of a text. There is no smoothing: if some p_n is 0
(no 4-gram matches anywhere), BLEU is 0, as in the original definition. Reported as 0..100.
"""

import math
from collections import Counter


def ngrams(words, n):
    """Counter of the n-grams of a word list. Example: ['a', 'b', 'a', 'b'], 2 -> {('a','b'): 2,
    ('b','a'): 1}."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def clipped_matches(candidate, reference, n):
    """(matches, total) n-grams of the candidate, each n-gram counted at most as often as it
    occurs in the reference. Example: 'the the the' vs 'the cat', n=1 -> (1, 3)."""
    cand, ref = ngrams(candidate, n), ngrams(reference, n)
    return sum(min(count, ref[g]) for g, count in cand.items()), sum(cand.values())


def corpus_bleu(candidates, references, max_n=4):
    """BLEU-4 of candidate texts against reference texts (one each), as a percentage 0..100."""
    if len(candidates) != len(references):
        raise ValueError("need one reference per candidate")
    matches, totals = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand_text, ref_text in zip(candidates, references):
        cand, ref = cand_text.split(), ref_text.split()
        c_len, r_len = c_len + len(cand), r_len + len(ref)
        for n in range(1, max_n + 1):
            m, t = clipped_matches(cand, ref, n)
            matches[n - 1] += m
            totals[n - 1] += t
    if c_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if c_len > r_len else math.exp(1.0 - r_len / c_len)
    return 100.0 * brevity * math.exp(log_p)


def bleu_can_score(references, max_n=4):
    """Can BLEU-max_n be above 0 against these references? Only if one has max_n words: without a
    reference 4-gram, p_4 is 0. Example: ["2023-07-14"] -> False; ["the cat sat down"] -> True."""
    return any(len(text.split()) >= max_n for text in references)


def exact_match(candidates, references):
    """Fraction (0..1) of candidates equal to their reference after stripping outer whitespace.

    Example: [" olleh\\n", "olle"] against ["olleh", "olleh"] -> 0.5; no candidates -> 0.0.
    """
    if not candidates:
        return 0.0
    same = sum(c.strip() == r.strip() for c, r in zip(candidates, references))
    return same / len(candidates)
