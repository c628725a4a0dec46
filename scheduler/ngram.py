"""N-gram prompt lookup: propose the tokens that followed an earlier match of the suffix.

For a sequence (prompt + outputs) t_0 .. t_{L-1}, try n = max_n down to min_n: find
the most recent earlier occurrence of the last n tokens (one that ends before the
sequence does) and propose the up to k tokens that followed it. No match: no drafts.

Example, min_n 2, max_n 3, k 2, tokens [5, 6, 7, 8, 5, 6, 7]: the suffix [5, 6, 7]
occurred at positions 0..2, followed by [8, 5]; so the proposal is [8, 5].

`NgramIndex` keeps, per n, a dict from each n-gram to the end of its latest occurrence
and extends it with the tokens appended since the last call, so a step costs O(new
tokens * (max_n - min_n + 1)), not a scan of the whole history. It needs only token
ids, so it runs in the scheduler: the controller sees how many drafts each sequence
has before it chooses k.
"""

from __future__ import annotations


class NgramIndex:
    """Incremental n-gram index of one growing token sequence."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self._num_indexed = 0  # n-grams ending at positions < this are in _ends

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the
        longest matching suffix (min_n..max_n tokens); [] when none matches.

        token_ids must extend the sequence of earlier calls (it only ever grows)."""
        length = len(token_ids)
        if length < self._num_indexed + 1:
            raise ValueError(
                f"the sequence shrank: {length} tokens, {self._num_indexed + 1} seen before"
            )
        self._index(token_ids, length - 1)  # occurrences that end before the last token
        if k <= 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._ends[n].get(tuple(token_ids[length - n :]))
            if end is not None:
                return token_ids[end + 1 : end + 1 + k]
        return []

    def _index(self, token_ids: list[int], stop: int) -> None:
        """Index the n-grams that end at positions [_num_indexed, stop)."""
        for end in range(self._num_indexed, stop):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._ends[n][tuple(token_ids[end - n + 1 : end + 1])] = end
        self._num_indexed = max(self._num_indexed, stop)
