"""Logits processing: penalties, logit_bias, min_tokens; metadata; bad input."""

import pytest
import torch

from tandem.engine.plan import SamplingParams
from tandem.engine.sampler import Sampler, SampleRow, SamplingMetadata, process_logits

NINF = float("-inf")
RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
PROMPT, OUTPUT = [0, 1], [3, 3, 2]  # token 3 twice and token 2 once in the output


def meta_for(params: list[SamplingParams], outputs=None, eos=(5,), vocab=6) -> SamplingMetadata:
    outputs = outputs or [OUTPUT] * len(params)
    rows = [SampleRow(p, 0, len(o), PROMPT, o) for p, o in zip(params, outputs, strict=True)]
    return SamplingMetadata.build(rows, eos, vocab, "cpu")


def processed(params: SamplingParams, outputs=None, eos=(5,)) -> list[float]:
    logits = torch.tensor([RAW])
    return process_logits(logits, meta_for([params], outputs and [outputs], eos))[0].tolist()


def greedy(**kw) -> int:
    p = SamplingParams(temperature=0.0, **kw)
    return Sampler()(torch.tensor([RAW]), meta_for([p])).token_ids.item()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    # seen (prompt or output): 0, 1, 2, 3; 2.0/2, -1.0*2, 0.5/2, 3.0/2; 4 and 5 unseen
    assert processed(SamplingParams(repetition_penalty=2.0)) == [1.0, -2.0, 0.25, 1.5, -2.0, 1.0]


def test_frequency_penalty_subtracts_per_occurrence_in_the_output():
    assert processed(SamplingParams(frequency_penalty=0.5)) == [2.0, -1.0, 0.0, 2.0, -2.0, 1.0]


def test_presence_penalty_subtracts_once_per_output_token():
    assert processed(SamplingParams(presence_penalty=0.25)) == [2.0, -1.0, 0.25, 2.75, -2.0, 1.0]


def test_penalties_and_bias_together():
    p = SamplingParams(
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logit_bias={4: 5.0, 0: -0.5},
    )
    # token 2: 0.5/2 - 0.5 - 0.25; token 3: 3/2 - 1.0 - 0.25; token 4: -2 + 5
    assert processed(p) == [0.5, -2.0, -0.5, 0.25, 3.0, 1.0]


def test_penalties_change_the_greedy_choice():
    assert greedy() == 3
    assert greedy(frequency_penalty=0.6) == 0  # 3 -> 1.8 < 2.0
    assert greedy(presence_penalty=1.5) == 0  # 3 -> 1.5
    assert greedy(repetition_penalty=2.0) == 3  # 1.5 vs token 0's 1.0
    assert greedy(repetition_penalty=4.0) == 5  # 0.75 vs 0.5, unseen token 5 keeps 1.0
    assert greedy(logit_bias={4: 5.5}) == 4


def test_rows_without_settings_are_untouched_and_input_is_not_modified():
    logits = torch.tensor([RAW, RAW, RAW])
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams()]
    out = process_logits(logits, meta_for(params))
    assert torch.equal(logits, before)
    assert out[0].tolist() == RAW and out[2].tolist() == RAW
    assert out[1].tolist() == [2.0, -1.0, -0.5, 1.0, -2.0, 1.0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0.0, 4.0, 0.0, 9.0]] * 3)  # eos 5, then stop id 3
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    outputs = [[], [7 % 6], [1, 1]]  # 0, 1 and 2 outputs so far
    meta = meta_for([p] * 3, outputs)
    out = process_logits(logits, meta)
    assert out[0].tolist() == [0.0, 1.0, 0.0, NINF, 0.0, NINF]
    assert out[1].tolist() == out[0].tolist()
    assert out[2].tolist() == logits[2].tolist()
    assert Sampler()(logits, meta).token_ids.tolist() == [1, 1, 5]


def test_min_tokens_mask_holds_when_sampling():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0]]).expand(2000, -1)
    p = SamplingParams(min_tokens=1)
    rows = [SampleRow(p, s, 0, [1], []) for s in range(2000)]
    tokens = Sampler()(logits, SamplingMetadata.build(rows, (5, 2), 6, "cpu")).token_ids
    assert not ((tokens == 5) | (tokens == 2)).any()
    assert set(tokens.tolist()) == {0, 1, 3, 4}


def test_metadata_skips_what_no_row_needs():
    plain = meta_for([SamplingParams(temperature=0.0)] * 2)
    assert plain.random is None and plain.penalties is None and plain.logit_bias is None
    assert plain.min_tokens_mask is None and plain.num_logprobs is None
    mixed = meta_for(
        [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(presence_penalty=1.0)]
    )
    assert mixed.random.rows.tolist() == [0, 2] and not mixed.all_random
    assert mixed.random.filters is None
    assert mixed.penalties.rows.tolist() == [2] and mixed.penalties.in_prompt is None
    assert mixed.penalties.output_counts[0].tolist() == [0, 0, 1, 2, 0, 0]
    logprobs = meta_for([SamplingParams(logprobs=2), SamplingParams(logprobs=5)])
    assert logprobs.num_logprobs == 5


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="logit_bias token id 9"):
        meta_for([SamplingParams(logit_bias={9: 1.0})])
    with pytest.raises(ValueError, match="output token id -1"):
        meta_for([SamplingParams(frequency_penalty=1.0)], [[-1]])
    with pytest.raises(ValueError, match="eos/stop token id 6"):
        meta_for([SamplingParams(min_tokens=1, stop_token_ids=[6])], [[]])
    with pytest.raises(ValueError, match="at least one row"):
        SamplingMetadata.build([], (0,), 6, "cpu")
    meta = meta_for([SamplingParams()])
    with pytest.raises(ValueError, match=r"logits must be \(1, 6\)"):
        Sampler()(torch.zeros(2, 6), meta)
