"""Which KV blocks each request holds, and prefix-cache lookups. Pure bookkeeping: the tensors
live in the worker.

Prefix caching keys each full block by a hash chain: hash(parent block's hash, the block's token
ids, extra keys such as a per-request cache salt). A request's leading full blocks that are found
(and whose tokens re-check equal) are shared instead of recomputed.
"""

from __future__ import annotations

from ernieserve.core.block_pool import BlockPool, KVBlock
from ernieserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: int | None, token_ids: tuple[int, ...], extra: object = None) -> int:
    return hash((parent, token_ids, extra))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # hashes of the request's full blocks so far
        self.req_num_cached: dict[str, int] = {}  # how many leading blocks are registered already
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _block_tokens(self, req: Request, i: int) -> tuple[int, ...]:
        return tuple(req.all_token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        """The hash chain of the request's first num_full_blocks blocks (extended incrementally)."""
        hashes = self.req_hashes.setdefault(req.request_id, [])
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, self._block_tokens(req, i), req.cache_salt))
        return hashes

    def find_cached_prefix(self, req: Request) -> list[KVBlock]:
        """Leading blocks of a new request already in the cache. At least one token is always left
        to compute (its logits are needed), so a full-prompt hit gives back its last block."""
        if not self.enable_caching or req.request_id in self.req_blocks:
            return []
        if req.sampling_params.prompt_logprobs is not None:
            return []  # every prompt position must be computed to report its logprobs
        num_full = (req.num_tokens - 1) // self.block_size
        found: list[KVBlock] = []
        for i, h in enumerate(self._hashes(req, num_full)):
            block = self.pool.lookup(h, self._block_tokens(req, i))
            if block is None:
                break
            found.append(block)
        return found

    def blocks_needed(self, req: Request, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        have = len(self.req_blocks.get(req.request_id, ())) + num_hit_blocks
        return max(0, cdiv(req.num_computed_tokens + num_new_tokens, self.block_size) - have)

    def allocate_slots(self, req: Request, num_new_tokens: int, hits: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for num_new_tokens more tokens after req.num_computed_tokens (which already
        counts the hits); returns the ids of all blocks added (hits first), or None if the pool
        cannot supply them, in which case nothing changes."""
        if not hits:  # the common decode case: room left in the last block
            have = self.req_blocks.get(req.request_id)
            if have is not None and req.num_computed_tokens + num_new_tokens <= len(have) * self.block_size:
                return []
        hits = hits or []
        need = self.blocks_needed(req, num_new_tokens, len(hits))
        free_hits = sum(1 for b in hits if b.ref_count == 0)  # touching these takes them off the free queue
        if need + free_hits > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        new = self.pool.allocate(need)
        self.req_blocks.setdefault(req.request_id, []).extend(hits + new)
        return [b.block_id for b in hits + new]

    def record_lookup(self, req: Request, num_hit_tokens: int) -> None:
        self.queries += req.num_tokens
        self.hits += num_hit_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(req.request_id, [])
        # only blocks whose tokens the host knows (tokens in flight are not in all_token_ids yet)
        num_full = min(min(req.num_computed_tokens, req.num_tokens) // self.block_size, len(blocks))
        done = self.req_num_cached.get(req.request_id, 0)
        if num_full <= done:  # most steps: no block filled up
            return
        hashes = self._hashes(req, num_full)
        for i in range(done, num_full):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], hashes[i], self._block_tokens(req, i))
        self.req_num_cached[req.request_id] = num_full

    def block_ids(self, req: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req.request_id, ())]

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.req_hashes.pop(req.request_id, None)
        self.req_num_cached.pop(req.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def num_blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks
