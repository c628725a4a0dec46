"""The draft's k - 1 one-token steps reuse one model input, advanced in place.

A draft step after the first feeds each active sequence its previous draft at the
next position. When the sequences are the same as in the previous step and none
crosses into a new KV block, everything but a few per-token values is unchanged:

    positions, slot_mapping, seq_lens  + 1
    input_ids                          = the drafts just sampled (still on the device)
    decode mask row b                  True up to the new position of sequence b
                                       (torch backend only: others have no buckets)

so the step costs a handful of small tensor ops instead of `build_model_input` (numpy
work, host-to-device copies) and needs no host sync between draft steps.

Example, block_size 4: a decode at position 9 (blocks [3, 5, 6]) has slot 6*4+1 = 25
and kv_len 12; the next draft step is at position 10, slot 26, mask keys 0..10. The
step after that, at position 11, still fits; position 12 would need block 4 of the
table, which this input does not hold, so `can_advance` is False and the caller
builds a fresh input.
"""

from __future__ import annotations

import dataclasses

import torch

from tandem.engine.model_input import ModelInput


def can_advance(inp: ModelInput, next_positions: list[int], block_size: int) -> bool:
    """Whether `advance` applies: inp is a step of one token per sequence (all with
    logits), and each next position (one per sequence, in order) lies in a block that
    its sequence already had in inp (not the first slot of a new block)."""
    meta = inp.attn_meta
    if meta.runs is not None or meta.max_query_len != 1:
        return False
    if meta.decode is not None and meta.decode.token_indices is not None:
        return False
    if len(next_positions) != meta.num_tokens or len(inp.num_logits) != meta.num_tokens:
        return False
    return all(p % block_size != 0 for p in next_positions)


def advance(inp: ModelInput, input_ids: torch.Tensor) -> ModelInput:
    """The input of the next one-token step of the same sequences: input_ids (S,) int64
    fed one position further on. Only valid where `can_advance` said so."""
    meta, bucket = inp.attn_meta, inp.attn_meta.decode
    positions = inp.positions + 1
    if bucket is not None:  # the torch backend's gathered-KV mask, one key further
        keys = torch.arange(bucket.kv_len, device=positions.device)
        mask = (keys[None, :] <= positions[:, None]).view(bucket.mask.shape)  # (S, 1, 1, Lb)
        bucket = dataclasses.replace(bucket, mask=mask, kv_rows=None)
    new_meta = dataclasses.replace(
        meta,
        seq_lens=meta.seq_lens + 1,
        slot_mapping=meta.slot_mapping + 1,
        max_seq_len=meta.max_seq_len + 1,
        decode=bucket,
        kv_write_rows=None,
        workspace=None,
        backend_data=None,
    )
    return dataclasses.replace(
        inp, input_ids=input_ids.to(inp.input_ids.dtype), positions=positions, attn_meta=new_meta
    )
