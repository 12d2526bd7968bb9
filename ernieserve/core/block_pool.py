"""The pool of KV cache blocks: reference counts and a free queue.

Freed blocks go to the tail of the free queue and are taken from the head, so the queue is in
least-recently-freed order. That is the LRU order prefix caching needs: a cached block stays
reusable until it reaches the head and is handed out again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set by prefix caching when the block is full


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, in the order blocks were freed (OrderedDict: O(1) removal from the middle)
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)

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
            block.ref_count = 1
            block.block_hash = None
            out.append(block)
        return out

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; blocks that reach zero return to the free queue.

        Callers pass a request's blocks in reverse so that its tail blocks (least likely to be
        shared as a prefix) are reused first.
        """
        for block in blocks:
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self._free[block.block_id] = block
