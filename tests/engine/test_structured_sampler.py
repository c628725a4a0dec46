"""The sampler's grammar mask: constrained rows keep only allowed tokens (after
penalties, bias and min_tokens), free rows in the same batch are untouched, and a
row left empty by min_tokens falls back to what the grammar allows."""

import pytest
import torch

from tandem.engine.plan import SamplingParams
from tandem.engine.sampler import Sampler, SampleRow, SamplingMetadata, process_logits

NINF = float("-inf")
VOCAB = 70  # three bitmask words, the last one partial
EOS = 5


def bitmask(tokens: set[int], vocab: int = VOCAB) -> bytes:
    words = [0] * -(-vocab // 32)
    for t in tokens:
        words[t // 32] |= 1 << (t % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


def row(params: SamplingParams, allowed: set[int] | None, outputs=(), pos=0) -> SampleRow:
    mask = None if allowed is None else bitmask(allowed)
    return SampleRow(params, 1234, pos, [], list(outputs), allowed=mask)


def reference(logits: torch.Tensor, allowed: list[set[int] | None]) -> torch.Tensor:
    """The masked logits by a plain per-row loop."""
    out = logits.clone()
    for r, toks in enumerate(allowed):
        if toks is not None:
            for t in range(out.shape[1]):
                if t not in toks:
                    out[r, t] = NINF
    return out


ALLOWED = [{3, 40, 69}, None, {0, 31, 32, 63, 64}, None, {EOS}]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_constrained_and_free_rows_in_one_batch(temperature):
    torch.manual_seed(0)
    logits = torch.randn(len(ALLOWED), VOCAB) * 3
    params = SamplingParams(temperature=temperature, seed=7, top_k=20)
    rows = [row(params, a, pos=i) for i, a in enumerate(ALLOWED)]
    meta = SamplingMetadata.build(rows, (EOS,), VOCAB, "cpu")
    assert meta.grammar is not None and meta.grammar.bias.shape == (3, VOCAB)
    assert torch.equal(process_logits(logits, meta), reference(logits, ALLOWED))
    got = Sampler()(logits, meta).token_ids.tolist()
    # the same rows sampled from the reference-masked logits with no mask at all
    free_rows = [row(params, None, pos=i) for i in range(len(ALLOWED))]
    free_meta = SamplingMetadata.build(free_rows, (EOS,), VOCAB, "cpu")
    want = Sampler()(reference(logits, ALLOWED), free_meta).token_ids.tolist()
    assert got == want
    for tok, a in zip(got, ALLOWED, strict=True):
        assert a is None or tok in a
    # free rows give what they give without any constrained row beside them
    alone = Sampler()(
        logits[[1, 3]], SamplingMetadata.build([free_rows[1], free_rows[3]], (EOS,), VOCAB, "cpu")
    )
    assert alone.token_ids.tolist() == [got[1], got[3]]


def test_seeded_constrained_rows_cover_the_allowed_set_only():
    logits = torch.zeros(1, VOCAB)
    allowed = {2, 33, 65}
    seen = set()
    for pos in range(200):
        meta = SamplingMetadata.build(
            [row(SamplingParams(temperature=1.0, seed=1), allowed, pos=pos)], (EOS,), VOCAB, "cpu"
        )
        seen.add(Sampler()(logits, meta).token_ids.item())
    assert seen == allowed


def test_mask_applies_after_penalties_and_bias():
    logits = torch.zeros(1, VOCAB)
    p = SamplingParams(temperature=0.0, logit_bias={9: 100.0, 4: 1.0}, frequency_penalty=5.0)
    meta = SamplingMetadata.build([row(p, {3, 4}, outputs=[4])], (EOS,), VOCAB, "cpu")
    out = process_logits(logits, meta)[0]
    assert out[9] == NINF and out[3] == 0.0 and out[4] == -4.0  # bias, penalty, then mask
    assert Sampler()(logits, meta).token_ids.item() == 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_grammar_wins_over_min_tokens(temperature):
    """min_tokens masks eos while the grammar allows only eos: eos stays allowed."""
    logits = torch.randn(2, VOCAB)
    p = SamplingParams(temperature=temperature, seed=3, min_tokens=4, max_tokens=8, top_p=0.9)
    rows = [row(p, {EOS}, outputs=[7]), row(p, None, outputs=[7])]
    meta = SamplingMetadata.build(rows, (EOS,), VOCAB, "cpu")
    out = Sampler()(logits, meta).token_ids.tolist()
    assert out[0] == EOS and out[1] != EOS
    # a grammar allowing eos and more keeps min_tokens: eos stays masked
    meta = SamplingMetadata.build([row(p, {EOS, 8}, outputs=[7])], (EOS,), VOCAB, "cpu")
    assert Sampler()(logits[:1], meta).token_ids.item() == 8


def test_logprobs_stay_the_models_raw_ones():
    logits = torch.randn(1, VOCAB)
    p = SamplingParams(temperature=0.0, logprobs=1)
    meta = SamplingMetadata.build([row(p, {10})], (EOS,), VOCAB, "cpu")
    out = Sampler()(logits, meta)
    assert out.token_ids.item() == 10
    assert out.logprobs.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 10].item())


def test_bitmask_of_the_wrong_size_is_refused():
    bad = SampleRow(SamplingParams(), 0, 0, [], [], allowed=bitmask({1}, vocab=32))
    with pytest.raises(ValueError, match="grammar bitmask has 4 bytes, need 12"):
        SamplingMetadata.build([bad], (EOS,), VOCAB, "cpu")
