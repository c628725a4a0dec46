"""verify.py: coupled acceptance, and standard rejection sampling converging to p.

Rejection sampling is checked on synthetic p and q: N = 40000 replicas of one
sequence with K = 3 drafts sampled from q, each with its own noise. The first emitted
token must be distributed as p_0 and, given the first j drafts were kept, the next
emitted token as p_j (the p_j here do not depend on the prefix). Chi-square at
p = 0.001.
"""

from __future__ import annotations

import pytest
import torch
from spec_helpers import chi2_critical, chi2_goodness

from tandem.engine.verify import coupled_accept, rejection_sample

N = 40000
V = 12
K = 3


def test_coupled_accept_counts_the_matching_prefix():
    target = [[5, 6, 9], [5, 6, 9], [1, 2, 3], [4, 4], [7]]
    drafts = [[5, 7], [5, 6], [2, 2], [4], []]
    assert coupled_accept(target, drafts) == [1, 2, 0, 1, 0]


def test_coupled_accept_rejects_bad_shapes():
    with pytest.raises(ValueError, match="needs 3 target tokens"):
        coupled_accept([[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="target windows"):
        coupled_accept([[1]], [])
    with pytest.raises(ValueError, match="K\\+1"):
        rejection_sample(
            torch.ones(1, 2, 3),
            None,
            torch.zeros(1, 2, dtype=torch.long),
            torch.tensor([2]),
            torch.ones(1, 2),
            torch.zeros(1, 2, 3),
        )


def _synthetic(seed: int, one_hot_q: bool):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, dim=-1)
    q = 0.5 * q + 0.5 * p[:K]  # a draft that is right about half the time
    p[0, 3] = 0.0  # a token the target never emits, that the draft likes
    p[0] /= p[0].sum()
    q[0, 3] += 0.3
    q[0] /= q[0].sum()
    if one_hot_q:  # a deterministic proposer: always the same drafts (p's modes)
        drafts = p[:K].argmax(-1).expand(N, K)
        return p, None, drafts.contiguous(), g
    drafts = torch.stack([torch.multinomial(q[j], N, True, generator=g) for j in range(K)], 1)
    return p, q, drafts, g


@pytest.mark.parametrize("one_hot_q", [False, True], ids=["draft-q", "one-hot-q"])
def test_rejection_sampling_emits_the_target_distribution(one_hot_q):
    p, q, drafts, g = _synthetic(0, one_hot_q)
    u = torch.rand(N, K, generator=g).clamp_min(1e-7)
    gumbel = -torch.log(-torch.log(torch.rand(N, K + 1, V, generator=g).clamp(1e-9, 1 - 1e-7)))
    target = p.expand(N, -1, -1)
    draft_q = None if q is None else q.expand(N, -1, -1)
    num_drafts = torch.full((N,), K, dtype=torch.int64)
    acc, tokens = rejection_sample(target, draft_q, drafts, num_drafts, u, gumbel)
    assert ((tokens >= 0).sum(1) == acc + 1).all()
    assert (tokens[:, 0] != 3).all()  # p_0(3) = 0 is never emitted, though q likes it
    for j in range(K + 1):
        reached = acc >= j  # the first j drafts were kept: token j is the next emitted
        emitted = tokens[reached, j]
        assert len(emitted) > 500, f"too few samples reach position {j}"
        counts = emitted.bincount(minlength=V).double().tolist()
        stat, dof = chi2_goodness(counts, p[j].tolist())
        assert stat < chi2_critical(dof), f"position {j}: chi2 {stat:.1f} with {dof} dof"
    # acceptance of the first draft is the overlap sum(min(p, q)) (one-hot q: p_0(d))
    want = p[0, drafts[0, 0]].item() if q is None else torch.minimum(p[0], q[0]).sum().item()
    assert abs((acc >= 1).double().mean().item() - want) < 0.015


def test_rejection_sampling_respects_num_drafts_and_bonus():
    p = torch.zeros(2, K + 1, V)
    p[:, :, 4] = 1.0  # the target is certain: token 4 everywhere
    drafts = torch.full((2, K), 4)
    num_drafts = torch.tensor([K, 1])
    u = torch.full((2, K), 0.5)
    gumbel = torch.zeros(2, K + 1, V)
    acc, tokens = rejection_sample(p, None, drafts, num_drafts, u, gumbel)
    assert acc.tolist() == [K, 1]
    assert tokens[0].tolist() == [4] * (K + 1)  # all kept, then the bonus token
    assert tokens[1].tolist() == [4, 4, -1, -1]
