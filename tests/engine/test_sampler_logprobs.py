"""Logprobs of sampled tokens (the model's raw distribution) and the prompt helper."""

import math

import pytest
import torch

from tandem.engine.plan import SamplingParams
from tandem.engine.sampler import (
    Sampler,
    SampleRow,
    SamplingMetadata,
    compute_token_logprobs,
)


def sample(logits: torch.Tensor, params: list[SamplingParams]):
    rows = [SampleRow(p, i, 0, [0], [1, 1]) for i, p in enumerate(params)]
    out = Sampler()(logits, SamplingMetadata.build(rows, (0,), logits.shape[-1], "cpu"))
    return out, out.to_token_logprobs(rows)


def test_hand_computed_logprob_and_rank():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    # logit_bias makes greedy pick token 0, whose raw rank is 3
    out, (lp,) = sample(logits, [SamplingParams(temperature=0.0, logprobs=2, logit_bias={0: 9})])
    lse = math.log(math.exp(1) + math.exp(3) + math.exp(2))
    assert lp.token_id == 0 and lp.rank == 3
    assert lp.logprob == pytest.approx(1 - lse, abs=1e-6)
    assert [t for t, _ in lp.top] == [1, 2]
    assert [v for _, v in lp.top] == pytest.approx([3 - lse, 2 - lse], abs=1e-6)


def test_logprobs_are_the_raw_log_softmax_whatever_the_sampling_settings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, top_p=0.9, logprobs=0),
        SamplingParams(temperature=1.3, top_k=20, logprobs=3, frequency_penalty=1.0),
        SamplingParams(temperature=1.0),  # asks for none
        SamplingParams(temperature=0.5, min_p=0.05, logprobs=20),
    ]
    out, lps = sample(logits, params)
    want = torch.log_softmax(logits, -1)
    tokens = out.token_ids
    torch.testing.assert_close(out.logprobs, want.gather(1, tokens[:, None])[:, 0])
    order = want.argsort(-1, descending=True)  # distinct random logits: no ties
    ranks = (order == tokens[:, None]).nonzero()[:, 1] + 1
    assert torch.equal(out.ranks, ranks)
    assert out.top_ids.shape == (5, 20)
    assert torch.equal(out.top_ids, order[:, :20])
    torch.testing.assert_close(out.top_logprobs, want.gather(1, order[:, :20]))
    assert lps[3] is None
    for lp, p, i in zip(lps, params, range(5), strict=True):
        if p.logprobs is None:
            continue
        assert lp.token_id == tokens[i].item() and lp.rank == ranks[i].item()
        assert len(lp.top) == p.logprobs
        assert [t for t, _ in lp.top] == order[i, : p.logprobs].tolist()
        assert all(a >= b for (_, a), (_, b) in zip(lp.top, lp.top[1:], strict=False))


def test_no_logprobs_when_no_row_asks():
    out, lps = sample(torch.randn(2, 10), [SamplingParams(), SamplingParams(temperature=0.0)])
    assert out.logprobs is None and out.top_ids is None and lps == [None, None]


def test_compute_token_logprobs_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 50, generator=g)
    ids = torch.randint(0, 50, (7,), generator=g)
    lp, rank, top_ids, top_lp = compute_token_logprobs(logits, ids, 4)
    want = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, want[torch.arange(7), ids])
    assert torch.equal(rank, (want > want[torch.arange(7), ids][:, None]).sum(-1) + 1)
    ref_lp, ref_ids = want.topk(4, -1)
    assert torch.equal(top_ids, ref_ids) and torch.equal(top_lp, ref_lp)
    lp0, _, top_ids0, top_lp0 = compute_token_logprobs(logits.bfloat16(), ids, 0)
    assert top_ids0.shape == (7, 0) and top_lp0.shape == (7, 0) and lp0.dtype == torch.float32
    torch.testing.assert_close(lp0, torch.log_softmax(logits.bfloat16().float(), -1)[range(7), ids])


def test_compute_token_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="token_ids"):
        compute_token_logprobs(torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="num_top"):
        compute_token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), -1)
