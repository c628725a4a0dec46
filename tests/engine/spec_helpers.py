"""Shared helpers for the speculative decoding tests (not a test module)."""

from __future__ import annotations

import math
from collections import Counter


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square with `dof` degrees of freedom at one-sided
    normal quantile z (3.09: p = 0.001), by the Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2_goodness(counts: list[float], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic of observed counts against probabilities, and its degrees of
    freedom, over categories with expected count >= 5 (the rest pooled into one)."""
    n = sum(counts)
    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for obs, p in zip(counts, probs, strict=True):
        exp = p * n
        if exp >= 5:
            stat += (obs - exp) ** 2 / exp
            dof += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    return stat, dof


def chi2_two_sample(a: list[int], b: list[int]) -> tuple[float, int]:
    """Pearson's chi-square homogeneity statistic of two samples of categories, and its
    degrees of freedom; categories with fewer than 10 draws in total are pooled."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cats: list[tuple[int, int]] = []
    rare = [0, 0]
    for tok in set(ca) | set(cb):
        if ca[tok] + cb[tok] >= 10:
            cats.append((ca[tok], cb[tok]))
        else:
            rare[0] += ca[tok]
            rare[1] += cb[tok]
    if sum(rare):
        cats.append((rare[0], rare[1]))
    stat = 0.0
    for oa, ob in cats:
        tot = oa + ob
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    return stat, len(cats) - 1
