"""The pool of KV cache blocks: reference counts, a free queue, and the prefix-cache index.

Freed blocks go to the tail of the free queue and are taken from the head, so the queue is in
least-recently-freed order. A freed block keeps its hash and contents: it stays findable by prefix
lookups until it reaches the head and is handed out again (LRU eviction). An evicted cached block
is first offered to `on_evict` (the host tier of the prefix cache takes a copy of it there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and cached
    token_ids: tuple[int, ...] = ()  # the tokens it holds, to re-check a hash hit


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = False,
                 on_evict: Callable[[KVBlock], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, in the order blocks were freed (OrderedDict: O(1) removal from the middle)
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}  # block hash -> block holding those tokens
        # called with a cached block about to lose its contents, when the device keeps no other copy
        self.on_evict = on_evict

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        indexed = self._cached.get(block.block_hash)
        if indexed is block:
            del self._cached[block.block_hash]
        # a duplicate (the same tokens computed twice) is offered only once the indexed copy is gone
        if self.on_evict is not None and (indexed is block or indexed is None):
            self.on_evict(block)
        block.block_hash = None
        block.token_ids = ()

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; blocks that reach zero return to the free queue.

        Callers pass a request's blocks in reverse so that its tail blocks (least likely to be
        shared as a prefix) are evicted first.
        """
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free[block.block_id] = block
                    self._free.move_to_end(block.block_id, last=False)  # uncached: reuse first
                else:
                    self._free[block.block_id] = block

    # ---- prefix cache -------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids:  # a hash collision is a miss
            return None
        return block

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def cache_block(self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...]) -> None:
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = ()
        self._cached.clear()
