"""draft_input.advance gives the same step input as building it afresh."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.draft_input import advance, can_advance
from tandem.engine.model_input import RunSeq, build_model_input

BS = 4


def _inp(positions, tables, tokens, buckets=True):
    runs = [RunSeq([t], p, tab, 0) for t, p, tab in zip(tokens, positions, tables, strict=True)]
    return build_model_input(runs, BS, "cpu", buckets=buckets)


@pytest.mark.parametrize("buckets", [True, False], ids=["torch-buckets", "no-buckets"])
def test_advance_equals_a_fresh_build(buckets):
    """Also without buckets (Triton, flash-attn, NPU): the draft steps of GPU backends
    advance in place too."""
    tables = [[3, 5, 6], [2, 7]]
    before = _inp([9, 5], tables, [11, 12], buckets)
    assert can_advance(before, [10, 6], BS)
    got = advance(before, torch.tensor([21, 22]))
    want = _inp([10, 6], tables, [21, 22], buckets)
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.logits_query_start == want.logits_query_start
    assert got.num_logits == want.num_logits
    g, w = got.attn_meta, want.attn_meta
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        assert torch.equal(getattr(g, name), getattr(w, name)), name
    assert (g.max_query_len, g.max_seq_len, g.num_tokens) == (
        w.max_query_len, w.max_seq_len, w.num_tokens,
    )  # fmt: skip
    assert g.runs is None
    gd, wd = g.decode, w.decode
    if not buckets:
        assert gd is None and wd is None
        return
    assert (gd.num_seqs, gd.query_len, gd.kv_len) == (wd.num_seqs, wd.query_len, wd.kv_len)
    assert torch.equal(gd.block_indices, wd.block_indices)
    assert torch.equal(gd.mask, wd.mask)
    assert gd.token_indices is None


def test_no_advance_into_a_new_block_or_for_runs():
    tables = [[3, 5, 6, 8], [2, 7]]
    inp = _inp([11, 5], tables, [1, 2])
    assert not can_advance(inp, [12, 6], BS)  # seq 0 would need block 8, not in the input
    for buckets in (True, False):
        runs = build_model_input([RunSeq([1, 2], 5, [2, 7], 1)], BS, "cpu", buckets=buckets)
        assert not can_advance(runs, [7], BS)  # a two-token run is not a decode step
    assert not can_advance(inp, [6], BS)  # a different number of sequences
