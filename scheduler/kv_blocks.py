"""The KV block pool: reference counts, prefix caching of full blocks, LRU eviction.

A block holds `block_size` consecutive token positions of one sequence. A FULL block
whose KV is computed can be registered in the prefix cache under a chained hash,

    hash_i = hash_fn(hash_{i-1}, tuple(tokens of block i)),   hash_{-1} = ROOT_HASH,

so a hash names the whole prefix up to the block's end. Lookups walk a prompt's chain
from its first block and stop at the first miss; every hit is checked against the
stored (parent hash, tokens), so an unequal block never matches on a hash collision.

A block is in use while its reference count is > 0 (several requests can share a
cached prefix). A freed block with cached content stays reusable until it is evicted:
free blocks without content are handed out first, then cached ones least recently
freed first (a request's blocks are freed tail first, so a chain loses its end first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROOT_HASH = 0  # the parent hash of a sequence's first block
HashFn = Callable[[int, tuple[int, ...]], int]  # (parent hash, block tokens) -> hash


def default_block_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
    """Python's tuple hash: deterministic for ints, so equal prefixes agree across requests."""
    return hash((parent_hash, tokens))


@dataclass(slots=True)
class BlockPoolStats:
    """A snapshot of the pool, for metrics."""

    num_blocks: int
    num_free_blocks: int  # unreferenced: empty or cached-but-evictable
    num_cached_blocks: int  # blocks registered in the prefix cache (in use or not)
    usage: float  # fraction of blocks referenced by requests, [0, 1]
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache, all time
    prefix_hit_tokens: int  # of those, tokens served from cached blocks
    num_evictions: int  # cached blocks whose content was dropped for reuse


class BlockPool:
    """Allocates KV block ids and caches full blocks by chained hash. Not thread-safe."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        hash_fn: HashFn = default_block_hash,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self._ref = [0] * num_blocks
        self.reset()

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def extend_hashes(self, token_ids: Sequence[int], hashes: list[int]) -> None:
        """Extend `hashes` (a prefix of the chain) to cover every full block of token_ids."""
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[i - 1] if i else ROOT_HASH
            hashes.append(self.hash_fn(parent, tuple(token_ids[i * bs : (i + 1) * bs])))

    def find_cached(self, token_ids: Sequence[int], hashes: Sequence[int]) -> list[int]:
        """The longest chain of cached blocks matching token_ids' leading full blocks.

        `hashes` is the chain of token_ids' full blocks (see extend_hashes); pass a prefix
        of it to cap the match. Takes no references (see `touch`)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found: list[int] = []
        for i, h in enumerate(hashes):
            block = self._by_hash.get(h)
            key = (hashes[i - 1] if i else ROOT_HASH, tuple(token_ids[i * bs : (i + 1) * bs]))
            if block is None or self._key[block] != key:
                break
            found.append(block)
        return found

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self._query_tokens += num_query_tokens
        self._hit_tokens += num_hit_tokens

    def num_free_among(self, block_ids: Sequence[int]) -> int:
        """How many of block_ids are unreferenced (taking them would use up free blocks)."""
        return sum(1 for b in block_ids if self._ref[b] == 0)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each (cached) block, e.g. on a prefix hit."""
        for b in block_ids:
            if self._ref[b] == 0:
                if b not in self._evictable:
                    raise ValueError(f"block {b} is free and holds no cached content")
                del self._evictable[b]
            self._ref[b] += 1

    def allocate(self, num: int) -> list[int]:
        """`num` blocks with reference count 1; empty blocks first, then LRU evictions."""
        if num > self.num_free_blocks:
            raise ValueError(f"asked for {num} blocks, only {self.num_free_blocks} are free")
        out = []
        for _ in range(num):
            if self._empty:
                b = self._empty.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._evict(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def _evict(self, block: int) -> None:
        h = self._hash[block]
        if h is not None and self._by_hash.get(h) == block:
            del self._by_hash[h]
        self._hash[block] = None
        self._key[block] = None
        self._evictions += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; freed tail first, so LRU evicts tails first."""
        for b in reversed(block_ids):
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} freed more often than allocated")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    self._empty.append(b)
                else:
                    self._evictable[b] = None

    def cache_block(
        self, block_id: int, block_hash: int, parent_hash: int, tokens: tuple[int, ...]
    ) -> None:
        """Register a full, computed block. The first block registered for a hash keeps
        it (an equal block computed concurrently, or a colliding one, stays uncached)."""
        if not self.enable_prefix_caching or self._hash[block_id] is not None:
            return
        if len(tokens) != self.block_size:
            raise ValueError(f"only full blocks are cached: got {len(tokens)} tokens")
        if self._ref[block_id] <= 0:
            raise ValueError(f"block {block_id} is not in use")
        if block_hash in self._by_hash:
            return
        self._by_hash[block_hash] = block_id
        self._hash[block_id] = block_hash
        self._key[block_id] = (parent_hash, tokens)

    def reset(self) -> None:
        """Back to the state of a new pool (also how a new pool starts): every block
        empty, nothing cached, counters at 0. Every block must be free."""
        if any(self._ref):
            raise ValueError("cannot reset the block pool while blocks are in use")
        n = self.num_blocks
        self._empty: deque[int] = deque(range(n))  # free, no cached content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, cached; LRU first
        self._by_hash: dict[int, int] = {}  # chained hash -> block id
        self._hash: list[int | None] = [None] * n  # each cached block's hash
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * n
        # each cached block's (parent hash, tokens), checked on every hit
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_cached_blocks=len(self._by_hash),
            usage=self.usage,
            prefix_query_tokens=self._query_tokens,
            prefix_hit_tokens=self._hit_tokens,
            num_evictions=self._evictions,
        )
