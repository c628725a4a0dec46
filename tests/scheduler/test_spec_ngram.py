"""N-gram prompt lookup: longest suffix match, most recent occurrence, incremental index."""

from __future__ import annotations

import random

import pytest

from tandem.scheduler.ngram import NgramIndex


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition, by scanning: longest n, then the latest earlier occurrence."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for end in range(length - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_docstring_example():
    assert NgramIndex(2, 3).propose([5, 6, 7, 8, 5, 6, 7], 2) == [8, 5]


def test_prefers_the_longest_match_then_the_most_recent():
    idx = NgramIndex(1, 3)
    # [2, 3] occurs twice (followed by 9, then by 4); the 3-gram [1, 2, 3] only once
    tokens = [1, 2, 3, 9, 0, 2, 3, 4, 1, 2, 3]
    assert idx.propose(tokens, 3) == [9, 0, 2]
    idx2 = NgramIndex(1, 2)
    assert idx2.propose(tokens, 3) == [4, 1, 2]  # the latest [2, 3]


def test_no_match_and_too_short_sequences():
    idx = NgramIndex(2, 4)
    assert idx.propose([7], 4) == []
    assert idx.propose([7, 8], 4) == []
    assert idx.propose([7, 8, 9, 10], 4) == []
    assert idx.propose([7, 8, 9, 10, 7, 8], 4) == [9, 10, 7, 8]
    assert idx.propose([7, 8, 9, 10, 7, 8], 0) == []


def test_proposal_is_cut_at_the_end_of_the_sequence():
    # [3, 3] last occurred ending one before the end: only one token follows it
    assert NgramIndex(2, 2).propose([3, 3, 3], 4) == [3]


def test_incremental_index_equals_the_definition():
    rng = random.Random(0)
    for trial in range(20):
        min_n, max_n = rng.randint(1, 2), rng.randint(2, 4)
        idx = NgramIndex(min_n, max_n)
        tokens = [rng.randint(0, 3) for _ in range(3)]
        for _ in range(60):
            k = rng.randint(0, 5)
            assert idx.propose(tokens, k) == brute_force(tokens, min_n, max_n, k), (
                trial,
                tokens,
            )
            tokens.extend(rng.randint(0, 3) for _ in range(rng.randint(1, 3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramIndex(3, 2)
    idx = NgramIndex(1, 2)
    idx.propose([1, 2, 3, 4], 2)
    with pytest.raises(ValueError, match="shrank"):
        idx.propose([1, 2], 2)
