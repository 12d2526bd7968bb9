"""Which KV blocks each request holds. Pure bookkeeping: the tensors live in the worker."""

from __future__ import annotations

from ernieserve.core.block_pool import BlockPool, KVBlock
from ernieserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        have = len(self.req_blocks.get(req.request_id, ()))
        return max(0, cdiv(req.num_computed_tokens + num_new_tokens, self.block_size) - have)

    def allocate_slots(self, req: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for num_new_tokens more tokens; returns the new block ids, or None if the pool
        cannot supply them (then nothing is allocated)."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > self.pool.num_free_blocks:
            return None
        new = self.pool.allocate(need)
        self.req_blocks.setdefault(req.request_id, []).extend(new)
        return [b.block_id for b in new]

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, ())]

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.pool.free(list(reversed(blocks)))

    def num_blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks
