"""build_model_input: the flattened step tensors, buckets and logits rows."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.model_input import RunSeq, build_model_input


def test_docstring_example():
    inp = build_model_input([RunSeq([42], 9, [3, 5, 6], 0), RunSeq([1, 2, 3], 0, [2], 2)], 4, "cpu")
    assert inp.input_ids.tolist() == [42, 1, 2, 3]
    assert inp.positions.tolist() == [9, 0, 1, 2]
    assert inp.logits_indices.tolist() == [0, 3]
    assert inp.logits_query_start == [0, 1, 2] and inp.num_logits == [1, 1]
    m = inp.attn_meta
    assert m.query_start_loc.tolist() == [0, 1, 4]
    assert m.seq_lens.tolist() == [10, 3]
    assert m.block_tables.tolist() == [[3, 5, 6], [2, 0, 0]]
    assert m.slot_mapping.tolist() == [6 * 4 + 1, 8, 9, 10]
    assert (m.max_query_len, m.max_seq_len, m.num_tokens) == (3, 10, 4)
    # one decode, one run: each bucket names its tokens
    assert m.decode.token_indices.tolist() == [0] and m.runs.token_indices.tolist() == [1, 2, 3]
    assert m.decode.block_indices.tolist() == [3, 5, 6]
    assert m.decode.mask.shape == (1, 1, 1, 12)
    assert m.decode.mask[0, 0, 0].tolist() == [True] * 10 + [False] * 2


def test_runs_bucket_padding_and_causal_mask():
    # runs of 3 and 2 tokens: seq 0 has 2 earlier tokens, seq 1 none
    inp = build_model_input([RunSeq([1, 2, 3], 2, [7, 8], 3), RunSeq([4, 5], 0, [9], 0)], 4, "cpu")
    b = inp.attn_meta.runs
    assert inp.attn_meta.decode is None and b.token_indices is None  # the whole batch
    assert (b.num_seqs, b.query_len, b.kv_len) == (2, 3, 8)
    # pad slot of seq 1 repeats its last real query (token 4 of the flat batch)
    assert b.query_indices.tolist() == [0, 1, 2, 3, 4, 4]
    assert b.output_indices.tolist() == [0, 1, 2, 3, 4]
    assert b.mask[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ]
    assert b.mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert inp.num_logits == [0, 2] and inp.logits_indices.tolist() == [3, 4]


def test_block_table_is_cut_to_the_blocks_in_use():
    inp = build_model_input([RunSeq([1], 3, [4, 5, 6, 7], 1)], 4, "cpu")
    assert inp.attn_meta.block_tables.tolist() == [[4]]
    assert inp.attn_meta.decode.token_indices is None
    assert inp.logits_indices.numel() == 0 and inp.num_logits == [0]


def test_many_seqs_vectorized_layout():
    seqs = [RunSeq([i] * (1 + i % 3), 5 * i, list(range(100)), i % 2) for i in range(20)]
    inp = build_model_input(seqs, 16, "cpu")
    expect_pos = [p for s in seqs for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
    assert inp.positions.tolist() == expect_pos
    assert inp.attn_meta.slot_mapping.tolist() == expect_pos  # table is the identity
    expect_rows, offset = [], 0
    for s in seqs:
        n = len(s.token_ids)
        expect_rows += list(range(offset + s.logits_from, offset + n))
        offset += n
    assert inp.logits_indices.tolist() == expect_rows
    dec, runs = inp.attn_meta.decode, inp.attn_meta.runs
    assert sorted(dec.token_indices.tolist() + runs.token_indices.tolist()) == list(range(offset))
    assert inp.input_ids.dtype == torch.int64 and inp.positions.dtype == torch.int64


@pytest.mark.parametrize(
    "seqs,match",
    [
        ([], "at least one sequence"),
        ([RunSeq([], 0, [0], 0)], "needs >= 1 token"),
        ([RunSeq([1], -1, [0], 0)], "start_pos >= 0"),
        ([RunSeq([1, 2], 0, [0], 3)], r"logits_from=3 not in \[0, 2\]"),
        ([RunSeq([1, 2], 3, [0], 0)], "5 tokens need 2 blocks of 4, block_table has 1"),
    ],
)
def test_bad_input(seqs, match):
    with pytest.raises(ValueError, match=match):
        build_model_input(seqs, 4, "cpu")


def test_without_buckets_the_flat_fields_are_the_same():
    seqs = [
        RunSeq([42], 9, [3, 5, 6], 0),
        RunSeq([1, 2, 3], 0, [2], 2),
        RunSeq([7, 8], 4, [1, 4], 0),
    ]
    full = build_model_input(seqs, 4, "cpu")
    flat = build_model_input(seqs, 4, "cpu", buckets=False, non_blocking=True)
    assert full.attn_meta.decode is not None and full.attn_meta.runs is not None
    assert flat.attn_meta.decode is None and flat.attn_meta.runs is None
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        assert torch.equal(getattr(full.attn_meta, name), getattr(flat.attn_meta, name))
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(full, name), getattr(flat, name))
    assert full.num_logits == flat.num_logits


def test_only_the_torch_backend_reads_the_buckets():
    from tandem.kernels.registry import BACKENDS, _import_backend

    uses = {name: _import_backend(name).uses_buckets for name in BACKENDS}
    assert uses == {"torch": True, "triton": False, "flash_attn": False, "npu": False}
