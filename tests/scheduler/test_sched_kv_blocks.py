"""BlockPool: reference counts, chained-hash prefix cache, LRU eviction, collisions."""

from __future__ import annotations

import pytest

from tandem.scheduler.kv_blocks import ROOT_HASH, BlockPool


def cache_chain(pool: BlockPool, blocks: list[int], tokens: list[int]) -> list[int]:
    """Register blocks as holding tokens (full blocks); returns their chain hashes."""
    hashes: list[int] = []
    pool.extend_hashes(tokens, hashes)
    bs = pool.block_size
    for i, b in enumerate(blocks):
        parent = hashes[i - 1] if i else ROOT_HASH
        pool.cache_block(b, hashes[i], parent, tuple(tokens[i * bs : (i + 1) * bs]))
    return hashes


def lookup(pool: BlockPool, tokens: list[int]) -> list[int]:
    hashes: list[int] = []
    pool.extend_hashes(tokens, hashes)
    return pool.find_cached(tokens, hashes)


def test_allocate_free_refcounts_and_usage():
    pool = BlockPool(4, 2, enable_prefix_caching=True)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free_blocks == 1 and pool.usage == 0.75
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(a[:1])


def test_shared_block_stays_until_last_reference():
    pool = BlockPool(4, 2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    blocks = pool.allocate(2)
    cache_chain(pool, blocks, tokens)
    hit = lookup(pool, tokens)
    assert hit == blocks
    pool.touch(hit)  # a second request shares them
    pool.free(blocks)
    assert pool.num_free_blocks == 2  # still referenced once
    pool.free(hit)
    assert pool.num_free_blocks == 4
    assert lookup(pool, tokens) == blocks  # freed but cached: still a hit
    assert pool.stats().num_evictions == 0


def test_lru_evicts_least_recently_freed_and_chain_tails_first():
    pool = BlockPool(6, 2, enable_prefix_caching=True)
    x_tokens, y_tokens = [1, 1, 2, 2, 3, 3], [7, 7, 8, 8]
    x = pool.allocate(3)
    y = pool.allocate(2)
    cache_chain(pool, x, x_tokens)
    cache_chain(pool, y, y_tokens)
    pool.free(x)  # x freed first: evicted first, its tail (x[2]) before its head
    pool.free(y)
    assert pool.allocate(1) not in x + y  # the never-cached block goes first
    assert lookup(pool, x_tokens) == x
    pool.allocate(1)
    assert lookup(pool, x_tokens) == x[:2]
    pool.allocate(2)
    assert lookup(pool, x_tokens) == [] and lookup(pool, y_tokens) == y
    pool.allocate(1)
    assert lookup(pool, y_tokens) == y[:1]
    assert pool.stats().num_evictions == 4
    assert pool.num_free_blocks == 1


def test_touch_takes_a_cached_block_off_the_eviction_list():
    pool = BlockPool(2, 2, enable_prefix_caching=True)
    a = pool.allocate(1)
    cache_chain(pool, a, [4, 5])
    pool.free(a)
    pool.touch(lookup(pool, [4, 5]))
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) != a  # the referenced cached block is not evicted
    with pytest.raises(ValueError, match="only 0 are free"):
        pool.allocate(1)


def test_colliding_hashes_never_give_a_false_hit():
    pool = BlockPool(8, 2, enable_prefix_caching=True, hash_fn=lambda parent, tokens: 42)
    a = pool.allocate(2)
    cache_chain(pool, a, [1, 2, 3, 4])  # block a[1] collides with a[0]: stays uncached
    assert lookup(pool, [9, 9, 3, 4]) == []  # same hash, other tokens
    assert lookup(pool, [1, 2, 1, 2]) == a[:1]  # block 2: hash 42 -> a[0], wrong parent
    assert lookup(pool, [1, 2, 3, 4]) == a[:1]
    assert pool.stats().num_cached_blocks == 1


def test_equal_tokens_under_another_parent_do_not_match():
    pool = BlockPool(8, 2, enable_prefix_caching=True)
    a = pool.allocate(2)
    cache_chain(pool, a, [1, 2, 3, 4])
    assert lookup(pool, [5, 6, 3, 4]) == []


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    a = pool.allocate(2)
    cache_chain(pool, a, [1, 2, 3, 4])
    assert lookup(pool, [1, 2, 3, 4]) == []
    pool.free(a)
    assert pool.stats().num_cached_blocks == 0
