"""Lossless verification of draft tokens: which drafts a sequence keeps, and what follows.

A sequence with k drafts d_1..d_k runs a window of k+1 query tokens [t, d_1, .., d_k]
through the target; window row j (0..k) gives the target's distribution p_j for the
output after the first j drafts. Two verifiers, both lossless (emitted tokens are
distributed exactly as the target alone would sample them):

`coupled_accept` (what the engine uses). Row j's token x_j is sampled exactly as a
non-speculative step would sample that output position: the same processing and the
same Gumbel noise, a function of (seed, output position) only. Draft d_{j+1} is kept
iff d_{j+1} == x_j; at the first mismatch the sequence emits x_j and stops, and if all
k match, x_k is the bonus token. Every emitted token is the one the target would have
produced without speculation, so a seeded request gives the same output with
speculation on or off, and greedy rows accept exactly the drafts matching the argmax.
When the proposer samples its drafts with the same noise (the draft model does), the
two are Gumbel-coupled and agree often; for a deterministic proposal (n-gram, a one-hot
q) the acceptance probability is p(d), which is what rejection sampling gives too.

`rejection_sample` is standard speculative sampling (Leviathan et al. 2023, Chen et al.
2023): keep d_j with probability min(1, p(d_j) / q(d_j)); at the first rejection sample
normalize(max(0, p - q)); a bonus token from p_k when all k pass. Its acceptance is the
optimal 1 - TV(p, q) per position, but the emitted tokens depend on q, so outputs are
reproducible only given the same drafts. It is the reference the tests hold to the
target distribution on synthetic p and q.
"""

from __future__ import annotations

import torch


def coupled_accept(
    target_token_ids: list[list[int]], draft_token_ids: list[list[int]]
) -> list[int]:
    """Drafts kept per sequence: the length of the prefix where drafts match the target.

    target_token_ids[s]: the target's k+1 tokens of sequence s (row j = its token after
    j drafts); draft_token_ids[s]: its k drafts. Returns a in [0, k] per sequence; the
    sequence emits target_token_ids[s][: a + 1]. Host lists, not tensors: the step's
    sampled tokens reach the host in its one sync anyway, and a comparison per draft
    is cheaper there than a handful of tiny device ops.

    Example: target [[5, 6, 9]], drafts [[5, 7]] -> [1]: emits 5, 6.
    """
    if len(target_token_ids) != len(draft_token_ids):
        raise ValueError(
            f"{len(target_token_ids)} target windows for {len(draft_token_ids)} draft lists"
        )
    out = []
    for target, drafts in zip(target_token_ids, draft_token_ids, strict=True):
        if len(target) != len(drafts) + 1:
            raise ValueError(
                f"a window of {len(drafts)} drafts needs {len(drafts) + 1} "
                f"target tokens, got {len(target)}"
            )
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        out.append(a)
    return out


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_token_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    accept_uniforms: torch.Tensor,
    gumbel: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard lossless speculative sampling for S sequences at once.

    target_probs: (S, K+1, V) p_j, rows past k unused but for the bonus row k;
    draft_probs: (S, K, V) q_j that proposed draft_token_ids, or None for a
    deterministic proposer (one-hot q: accept with p(d), else sample p without d);
    draft_token_ids: (S, K) int64; num_drafts: (S,) int64 k per sequence;
    accept_uniforms: (S, K) in (0, 1); gumbel: (S, K+1, V) Gumbel(0, 1) noise for the
    residual or bonus draw at each row. Returns (num_accepted (S,) int64,
    token_ids (S, K+1) int64): the sequence emits token_ids[s, : a + 1] (the kept
    drafts, then the residual or bonus token); entries after that are -1.
    """
    _check_shapes(target_probs, draft_token_ids, num_drafts)
    num_seqs, num_k = draft_token_ids.shape
    ids = draft_token_ids[..., None]  # (S, K, 1)
    p_d = target_probs[:, :num_k].gather(2, ids)[..., 0]  # (S, K)
    q_d = torch.ones_like(p_d) if draft_probs is None else draft_probs.gather(2, ids)[..., 0]
    cols = torch.arange(num_k, device=ids.device)
    keep = (accept_uniforms * q_d <= p_d) & (cols < num_drafts[:, None])
    num_accepted = keep.to(torch.int64).cumprod(dim=1).sum(dim=1)  # (S,)

    seq = torch.arange(num_seqs, device=ids.device)
    p_a = target_probs[seq, num_accepted]  # (S, V) the row where the draw happens
    rejected = num_accepted < num_drafts
    if draft_probs is None:
        q_a = torch.zeros_like(p_a)
        q_a[seq[rejected], draft_token_ids[seq[rejected], num_accepted[rejected]]] = 1.0
    else:
        padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
        q_a = padded[seq, num_accepted]
    residual = torch.where(rejected[:, None], (p_a - q_a).clamp_min(0.0), p_a)
    # p == q up to rounding leaves no residual mass; rejection then had probability ~0
    empty = residual.sum(dim=1, keepdim=True) <= 0
    residual = torch.where(empty, p_a, residual)
    last = (residual.log() + gumbel[seq, num_accepted]).argmax(dim=1)  # (S,)

    out = torch.full((num_seqs, num_k + 1), -1, dtype=torch.int64, device=ids.device)
    out[:, :num_k] = torch.where(cols < num_accepted[:, None], draft_token_ids, -1)
    out[seq, num_accepted] = last
    return num_accepted, out


def _check_shapes(target: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor) -> None:
    if drafts.dim() != 2 or target.shape[:1] != drafts.shape[:1]:
        raise ValueError(
            f"need target rows (S, K+1, ...) and drafts (S, K); got {tuple(target.shape)} "
            f"and {tuple(drafts.shape)}"
        )
    if target.shape[1] != drafts.shape[1] + 1:
        raise ValueError(
            f"the target needs K+1 = {drafts.shape[1] + 1} rows per sequence, got {target.shape[1]}"
        )
    if num_drafts.shape != drafts.shape[:1]:
        raise ValueError(f"num_drafts must be ({drafts.shape[0]},), got {tuple(num_drafts.shape)}")
    if num_drafts.numel() and (num_drafts.min() < 0 or num_drafts.max() > drafts.shape[1]):
        raise ValueError(f"num_drafts must be in [0, {drafts.shape[1]}], got {num_drafts.tolist()}")
