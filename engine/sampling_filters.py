"""Top-k, top-p and min-p: which tokens each sampling row may draw from.

Applied after temperature, in this order (Hugging Face's): top-k; top-p on the
renormalised top-k distribution (the smallest set of most likely tokens with mass
>= top_p; the top token is always kept); min-p (drop p < min_p * p_max). Dropped
tokens get logit -inf. Tokens tied with the k-th logit are kept.

Work follows the rows that need it: only rows with top_p < 1 are sorted (one full
sort each); rows with only top-k use a partial `topk`; min-p needs a row max.
Which path a row takes depends on its own parameters only, so its kept set does not
depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class FilterParams:
    """Filter settings of R sampling rows, grouped by the path that applies them."""

    top_k_rows: torch.Tensor | None  # (Q,) int64 rows with top-k on and top-p off
    top_k: torch.Tensor | None  # (Q,) int64 their k, in [1, V)
    top_k_max: int  # max of top_k (0 when no such row), so no device sync to find it
    top_p_rows: torch.Tensor | None  # (S,) int64 rows with top_p < 1 (sorted path)
    top_p: torch.Tensor | None  # (S,) float32 their top_p, in (0, 1)
    top_p_top_k: torch.Tensor | None  # (S,) int64 their k, in [1, V] (V = off)
    min_p: torch.Tensor | None  # (R,) float32 in [0, 1]; None when every row has 0

    @staticmethod
    def build(
        top_k: list[int], top_p: list[float], min_p: list[float], vocab_size: int, device
    ) -> FilterParams | None:
        """From per-row values (top_k 0 = off, top_p 1 = off, min_p 0 = off); None if
        no row filters."""
        ks = [min(k, vocab_size) if k > 0 else vocab_size for k in top_k]
        k_rows = [
            i for i, (k, p) in enumerate(zip(ks, top_p, strict=True)) if k < vocab_size and p >= 1
        ]
        p_rows = [i for i, p in enumerate(top_p) if p < 1]
        if not k_rows and not p_rows and not any(m > 0 for m in min_p):
            return None

        def i64(values: list[int]) -> torch.Tensor | None:
            return torch.tensor(values, dtype=torch.int64, device=device) if values else None

        def f32(values: list[float]) -> torch.Tensor | None:
            return torch.tensor(values, dtype=torch.float32, device=device) if values else None

        return FilterParams(
            top_k_rows=i64(k_rows),
            top_k=i64([ks[i] for i in k_rows]),
            top_k_max=max((ks[i] for i in k_rows), default=0),
            top_p_rows=i64(p_rows),
            top_p=f32([top_p[i] for i in p_rows]),
            top_p_top_k=i64([ks[i] for i in p_rows]),
            min_p=f32(min_p) if any(m > 0 for m in min_p) else None,
        )


def filter_logits(logits: torch.Tensor, f: FilterParams | None) -> torch.Tensor:
    """Set tokens outside each row's kept set to -inf.

    logits: (R, V) float32, temperature already applied; modified in place and returned.
    """
    if f is None:
        return logits
    if f.top_k_rows is not None:
        logits[f.top_k_rows] = _top_k(logits[f.top_k_rows], f.top_k, f.top_k_max)
    if f.top_p_rows is not None:
        logits[f.top_p_rows] = _top_k_top_p(logits[f.top_p_rows], f.top_p_top_k, f.top_p)
    if f.min_p is not None:
        # p_i < min_p * p_max  <=>  l_i < l_max + log(min_p); log(0) = -inf keeps all
        floor = logits.max(-1, keepdim=True).values + f.min_p.log()[:, None]
        logits.masked_fill_(logits < floor, float("-inf"))
    return logits


def _top_k(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Keep logits >= each row's k-th largest: logits (Q, V), k (Q,) <= k_max -> (Q, V)."""
    kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill_(logits < kth, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p through one descending sort: logits (S, V) -> (S, V)."""
    ninf = float("-inf")
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # ties by id
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits.masked_fill_(sorted_logits < kth, ninf)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # 0 for the top token: it is always kept
    sorted_logits.masked_fill_(mass_before >= top_p[:, None], ninf)
    return logits.scatter_(-1, order, sorted_logits)
