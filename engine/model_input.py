"""Build one step's flattened model inputs, once, from plain per-sequence lists.

Example, block_size 4: RunSeq([42], 9, [3, 5, 6], 0) (a decode at position 9) and
RunSeq([1, 2, 3], 0, [2], 2) (a prompt, logits for its last token only) give
    input_ids = [42, 1, 2, 3], positions = [9, 0, 1, 2],
    logits_indices = [0, 3], logits_query_start = [0, 1, 2]
Everything attention needs (slots, block gathers, masks) is computed here as tensors,
so no layer recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tandem.engine.transfer import upload
from tandem.kernels.types import AttnBucket, AttnMetadata


@dataclass(slots=True)
class RunSeq:
    """One sequence's run of query tokens this step."""

    token_ids: list[int]  # tokens to compute (a chunk, a decode token, a verify window)
    start_pos: int  # position of token_ids[0] = tokens already in the KV cache
    block_table: list[int]  # the sequence's KV block ids, at least enough for the run
    logits_from: int  # logits wanted for token_ids[logits_from:]; len(token_ids) = none


@dataclass(slots=True)
class ModelInput:
    """A step's flattened batch: T tokens over S sequences, L logits rows."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    attn_meta: AttnMetadata
    logits_indices: torch.Tensor  # (L,) int64 rows of T whose logits are wanted, seq order
    logits_query_start: list[int]  # (S+1,) seq s owns logits rows [start[s], start[s+1])
    num_logits: list[int]  # (S,) logits rows per sequence


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + c) for s, c in zip(starts, counts)), vectorized."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets + np.repeat(starts, counts)


def _uploader(
    device: torch.device | str, non_blocking: bool
) -> Callable[[np.ndarray], torch.Tensor]:
    """A function putting numpy arrays on `device` (see engine.transfer.upload)."""
    dev = torch.device(device)
    return lambda a: upload(torch.from_numpy(np.ascontiguousarray(a)), dev, non_blocking)


def _validate(seqs: list[RunSeq], block_size: int) -> None:
    if not seqs:
        raise ValueError("a step needs at least one sequence")
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        if n == 0 or s.start_pos < 0:
            raise ValueError(
                f"seq {i}: needs >= 1 token and start_pos >= 0 (got {n}, {s.start_pos})"
            )
        if not 0 <= s.logits_from <= n:
            raise ValueError(f"seq {i}: logits_from={s.logits_from} not in [0, {n}]")
        needed = -(-(s.start_pos + n) // block_size)
        if len(s.block_table) < needed:
            raise ValueError(
                f"seq {i}: {s.start_pos + n} tokens need {needed} blocks of {block_size}, "
                f"block_table has {len(s.block_table)}"
            )


def _bucket(sel, q_lens, q_start, seq_lens, tables, block_size, whole, put) -> AttnBucket:
    """The AttnBucket of sequences `sel` (indices into the step's sequences)."""
    q_lens, q_start, seq_lens = q_lens[sel], q_start[sel], seq_lens[sel]
    num_seqs, q_max = len(sel), int(q_lens.max())
    max_blocks = int(-(-seq_lens.max() // block_size))
    kv_len = max_blocks * block_size
    # query slot i of seq b stands for run token min(i, len-1): pads repeat the last real
    # query, so no mask row is empty (an all-masked row would make NaNs).
    slot = np.minimum(np.arange(q_max)[None, :], q_lens[:, None] - 1)  # (Sb, Qb)
    last_key = (seq_lens - q_lens)[:, None] + slot  # (Sb, Qb) last key each slot sees
    mask = np.arange(kv_len)[None, None, :] <= last_key[:, :, None]  # (Sb, Qb, Lb)
    padded = bool((q_lens != q_max).any())
    tokens = _ranges(q_start, q_lens)

    return AttnBucket(
        num_seqs=num_seqs,
        query_len=q_max,
        kv_len=kv_len,
        token_indices=None if whole else put(tokens),
        query_indices=put((q_start[:, None] + slot).reshape(-1)) if padded else None,
        output_indices=put(_ranges(np.arange(num_seqs) * q_max, q_lens)) if padded else None,
        block_indices=put(tables[sel, :max_blocks].reshape(-1).astype(np.int64)),
        mask=put(mask[:, None]),
    )


def _buckets(q_lens, q_start, seq_lens, tables, block_size, put) -> dict[str, AttnBucket]:
    """The torch backend's buckets: "decode" (single-token runs), "runs" (the rest)."""
    is_decode = q_lens == 1
    out = {}
    for name, sel in (("decode", np.flatnonzero(is_decode)), ("runs", np.flatnonzero(~is_decode))):
        if len(sel):
            whole = len(sel) == len(q_lens)
            out[name] = _bucket(sel, q_lens, q_start[:-1], seq_lens, tables, block_size, whole, put)
    return out


def _block_table_array(seqs: list[RunSeq], seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """(S, max_blocks) int32 tables cut to the blocks this step touches, padded with 0."""
    num_blocks = -(-seq_lens // block_size)
    tables = np.zeros((len(seqs), int(num_blocks.max())), dtype=np.int32)
    for i, (s, n) in enumerate(zip(seqs, num_blocks.tolist(), strict=True)):
        tables[i, :n] = s.block_table[:n]
    return tables


def build_model_input(
    seqs: list[RunSeq],
    block_size: int,
    device: torch.device | str,
    *,
    buckets: bool = True,
    non_blocking: bool = False,
) -> ModelInput:
    """Flatten `seqs` (in order) into one step's tensors on `device`.

    buckets: build the gathered-KV buckets (AttnMetadata.decode / .runs); only the torch
    backend reads them (AttentionBackend.uses_buckets), others skip their masks and
    copies. non_blocking: copy to a CUDA device without a stream sync (see _uploader).

    Raises ValueError for an empty step or run, a bad logits_from, or a block table
    too short for start_pos + len(token_ids) tokens.
    """
    _validate(seqs, block_size)
    q_lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
    starts = np.array([s.start_pos for s in seqs], dtype=np.int64)
    seq_lens = starts + q_lens
    q_start = np.concatenate(([0], np.cumsum(q_lens)))
    tables = _block_table_array(seqs, seq_lens, block_size)
    positions = _ranges(starts, q_lens)
    seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + (
        positions % block_size
    )
    put = _uploader(device, non_blocking)
    groups = _buckets(q_lens, q_start, seq_lens, tables, block_size, put) if buckets else {}
    num_logits = q_lens - np.array([s.logits_from for s in seqs], dtype=np.int64)
    logits_indices = _ranges(q_start[:-1] + q_lens - num_logits, num_logits)
    input_ids = np.fromiter(
        (t for s in seqs for t in s.token_ids), dtype=np.int64, count=int(q_start[-1])
    )

    meta = AttnMetadata(
        query_start_loc=put(q_start.astype(np.int32)),
        seq_lens=put(seq_lens.astype(np.int32)),
        block_tables=put(tables),
        slot_mapping=put(slots),
        max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()),
        num_tokens=int(q_start[-1]),
        decode=groups.get("decode"),
        runs=groups.get("runs"),
    )
    return ModelInput(
        input_ids=put(input_ids),
        positions=put(positions),
        attn_meta=meta,
        logits_indices=put(logits_indices),
        logits_query_start=[0, *np.cumsum(num_logits).tolist()],
        num_logits=num_logits.tolist(),
    )
