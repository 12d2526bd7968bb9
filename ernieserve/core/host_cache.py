"""The host tier of the prefix cache (`--swap-space`): which host block holds which cached KV block.

Pure bookkeeping like block_pool.py; the host tensors and the copies live in worker/swap.py.

A host block holds the whole KV of one full device block (every layer) under the same block hash
and token ids. Blocks come to the host when the device evicts a cached block, and go back (are
copied to a fresh device block) when a prefix lookup misses on the device but hits here. The tier
is inclusive: a block copied back stays here too, so evicting it from the device again costs no
copy. Host blocks are reused least recently used first.

A host block read by a swap-in decided in this step is pinned until the step's copy list is taken
(`release_readers`): a swap-out decided later in the same step must not overwrite it, since the
worker performs all of a step's swap-outs before its swap-ins. Across steps the worker's copies
run in order, so unpinned blocks are free to reuse.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(slots=True)
class HostBlock:
    block_id: int
    block_hash: int | None = None  # None: empty
    token_ids: tuple[int, ...] = ()  # the tokens it holds, to re-check a hash hit
    pinned: bool = False  # read by a swap-in of the step being scheduled


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the host tier needs at least one block")
        self.num_blocks = num_blocks
        self.blocks = [HostBlock(i) for i in range(num_blocks)]
        self._empty: deque[int] = deque(range(num_blocks))  # ascending ids: early swap-outs get runs
        # cached, unpinned blocks, least recently used first (OrderedDict: O(1) removal and touch)
        self._lru: OrderedDict[int, HostBlock] = OrderedDict()
        self._cached: dict[int, HostBlock] = {}  # block hash -> host block
        self._pinned: list[HostBlock] = []

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> HostBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids:  # a hash collision is a miss
            return None
        return block

    def store(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """Make room for an evicted device block; returns the host block to copy it into, or None
        when no copy is needed (already here) or possible (every block pinned)."""
        have = self._cached.get(block_hash)
        if have is not None:  # the same tokens (inclusive tier), or a collision: keep the older
            if have.token_ids == token_ids and not have.pinned:
                self._lru.move_to_end(have.block_id)
            return None
        block = self._take()
        if block is None:
            return None
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block
        self._lru[block.block_id] = block
        return block.block_id

    def _take(self) -> HostBlock | None:
        if self._empty:
            return self.blocks[self._empty.popleft()]
        if not self._lru:
            return None
        _, block = self._lru.popitem(last=False)
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        return block

    def pin(self, block: HostBlock) -> None:
        """A swap-in of this step reads the block: keep it until the step's copies are issued."""
        if not block.pinned:
            block.pinned = True
            del self._lru[block.block_id]
            self._pinned.append(block)

    def release_readers(self) -> None:
        """The step's copy list is out: pinned blocks become most recently used."""
        for block in self._pinned:
            block.pinned = False
            self._lru[block.block_id] = block
        self._pinned.clear()

    def reset(self) -> None:
        assert not self._pinned, "reset in the middle of a step"
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = ()
        self._cached.clear()
        self._lru.clear()
        self._empty = deque(range(self.num_blocks))
