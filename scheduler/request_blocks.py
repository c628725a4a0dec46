"""A request's KV blocks against the pool: prefix-cache hits at admission, blocks
given back after rejected drafts, blocks handed out ahead of a run, full blocks offered
to the prefix cache.

The scheduler decides when; these keep a request's `block_ids`, `block_hashes` and
`num_registered_blocks` consistent with the pool.
"""

from __future__ import annotations

from tandem.engine.plan import KVCacheInfo
from tandem.scheduler.kv_blocks import ROOT_HASH, BlockPool
from tandem.scheduler.request import Request


def prefix_hits(pool: BlockPool, req: Request, record: bool = True) -> list[int]:
    """Cached blocks for req's leading full blocks, never covering its last token (its
    logits are needed). None for prompt_logprobs requests (they need every prompt
    position's logits). Records the query in the pool's statistics (unless `record` is
    False: a look, not an admission); takes no references."""
    if not pool.enable_prefix_caching or req.sampling.prompt_logprobs is not None:
        return []
    pool.extend_hashes(req.token_ids, req.block_hashes)
    max_blocks = (len(req.token_ids) - 1) // pool.block_size
    hits = pool.find_cached(req.token_ids, req.block_hashes[:max_blocks])
    if record:
        pool.record_prefix_query(len(req.token_ids), len(hits) * pool.block_size)
    return hits


def trim_blocks(pool: BlockPool, req: Request, lookahead_slots: int = 0) -> None:
    """Take back the blocks that only rejected drafts used: a running request keeps the
    blocks of its computed tokens and of the next `lookahead_slots` positions, if it
    holds them (workers cut their tables alike; see KVCacheInfo.lookahead_slots)."""
    keep = pool.blocks_for(req.num_computed_tokens + lookahead_slots)
    if len(req.block_ids) > keep:
        pool.free(req.block_ids[keep:])
        del req.block_ids[keep:]


def reserve_ahead(
    pool: BlockPool, req: Request, end: int, kv: KVCacheInfo, max_len: int
) -> list[int]:
    """Blocks for the positions just past req's sampling run ending at `end`, where the
    engine computes ahead (KVCacheInfo.lookahead_slots); appended to req.block_ids and
    returned. Only unreferenced blocks (an evictable prefix-cache block may go), so
    never at another run's expense this step; the run's next step needs the block
    anyway (trim_blocks keeps it). None for a run that ends the request by length."""
    last = end + 1 - req.num_prompt_tokens >= req.sampling.max_tokens or end + 1 >= max_len
    extra = pool.blocks_for(end + kv.lookahead_slots) - len(req.block_ids)
    if last or extra <= 0 or extra > pool.num_free_blocks:
        return []
    blocks = pool.allocate(extra)
    req.block_ids.extend(blocks)
    return blocks


def register_full_blocks(pool: BlockPool, req: Request) -> None:
    """Offer each newly computed full block to the prefix cache."""
    bs = pool.block_size
    num_full = req.num_computed_tokens // bs
    if not pool.enable_prefix_caching or num_full <= req.num_registered_blocks:
        return
    pool.extend_hashes(req.token_ids, req.block_hashes)
    for i in range(req.num_registered_blocks, num_full):
        parent = req.block_hashes[i - 1] if i else ROOT_HASH
        tokens = tuple(req.token_ids[i * bs : (i + 1) * bs])
        pool.cache_block(req.block_ids[i], req.block_hashes[i], parent, tokens)
    req.num_registered_blocks = num_full
