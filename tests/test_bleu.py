"""Tests of corpus BLEU-4 and exact match (tinyllm/bleu.py) against hand-worked examples."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllm.bleu import bleu_can_score, clipped_matches, corpus_bleu, exact_match, ngrams


def test_ngrams_worked_example():
    assert ngrams(["a", "b", "a", "b"], 2) == {("a", "b"): 2, ("b", "a"): 1}


def test_clipping():
    assert clipped_matches(["the", "the", "the"], ["the", "cat"], 1) == (1, 3)


def test_hand_worked_corpus_bleu():
    # pair 1: 'the cat sat on the mat' vs 'the cat is on the mat'
    #   1-grams 5/6 (sat misses), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat),
    #   4-grams 0/3
    # pair 2: 'a b c d' vs itself: 4/4, 3/3, 2/2, 1/1
    # corpus: p = 9/10, 6/8, 3/6, 1/4; c = r = 10, so BP = 1
    # BLEU = (0.9 * 0.75 * 0.5 * 0.25) ^ (1/4) = 0.084375 ^ 0.25 = 0.53896
    bleu = corpus_bleu(["the cat sat on the mat", "a b c d"], ["the cat is on the mat", "a b c d"])
    assert bleu == pytest.approx(53.896, abs=1e-3)


def test_brevity_penalty():
    # candidate 'a b c d' (4 words) vs reference 'a b c d e' (5): all p_n = 1, BP = exp(1 - 5/4)
    assert corpus_bleu(["a b c d"], ["a b c d e"]) == pytest.approx(100 * math.exp(-0.25))
    assert corpus_bleu(["a b c d e f"], ["a b c d e"]) < 100  # longer: no penalty, lower precision


def test_no_four_gram_match_gives_zero():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == 0.0
    assert corpus_bleu([""], ["a b"]) == 0.0


WORDS = st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=7)


@given(st.lists(WORDS.map(" ".join), min_size=1, max_size=5))
def test_identical_corpus_scores_100_if_it_has_a_4gram_else_0(texts):
    """Every precision of a corpus against itself is 1 (BP = 1 too), as long as there is a 4-gram
    to count; a corpus of texts all shorter than 4 words has none, and BLEU-4 is then 0."""
    has_4gram = any(len(t.split()) >= 4 for t in texts)
    assert corpus_bleu(texts, texts) == pytest.approx(100.0 if has_4gram else 0.0)
    assert bleu_can_score(texts) == has_4gram


def test_bleu_can_score_only_with_a_reference_of_four_words():
    assert not bleu_can_score(["2023-07-14", "a b c"]) and not bleu_can_score([])
    assert bleu_can_score(["2023-07-14", "the cat sat down"])


def test_exact_match():
    assert exact_match(["a", "b ", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert exact_match([" olleh\n", "olle"], ["olleh", "olleh"]) == 0.5
    assert exact_match([], []) == 0.0
