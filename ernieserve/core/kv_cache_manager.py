"""Which KV blocks each request holds, and prefix-cache lookups. Pure bookkeeping: the tensors
live in the worker.

Prefix caching keys each full block by a hash chain: hash(parent block's hash, the block's token
ids, extra keys such as a per-request cache salt). A request's leading full blocks that are found
(and whose tokens re-check equal) are shared instead of recomputed.

With a host tier (`--swap-space`), a cached device block that is evicted is copied to the host
instead of dropped (a swap-out), and a leading block that misses on the device but hits on the
host is copied back into a fresh device block (a swap-in) instead of recomputed. The copies of a
step are collected here while it is scheduled and handed to the worker with it (`take_swaps`);
the worker does all swap-outs, then all swap-ins, before the step's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernieserve.core.block_pool import BlockPool, KVBlock
from ernieserve.core.host_cache import HostBlock, HostBlockPool
from ernieserve.core.request import Request

# (source block id, destination block id) pairs: (device, host) for swap-outs, (host, device) for swap-ins
BlockCopies = list[tuple[int, int]]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: int | None, token_ids: tuple[int, ...], extra: object = None) -> int:
    return hash((parent, token_ids, extra))


@dataclass(slots=True)
class CachedPrefix:
    """A new request's leading full blocks found in the cache, in order: device blocks to share,
    host blocks to copy back into fresh device blocks."""

    blocks: list[KVBlock | HostBlock] = field(default_factory=list)
    num_host: int = 0

    def __len__(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.host = HostBlockPool(num_host_blocks) if enable_caching and num_host_blocks > 0 else None
        self.pool = BlockPool(num_blocks, enable_caching, on_evict=self._spill if self.host else None)
        self._swap_out: BlockCopies = []  # copies decided while scheduling this step
        self._swap_in: BlockCopies = []
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # hashes of the request's full blocks so far
        self.req_num_cached: dict[str, int] = {}  # how many leading blocks are registered already
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found (on the device or the host)
        self.host_hits = 0  # prompt tokens found on the host
        self.query_requests = 0  # requests looked up
        self.hit_requests = 0  # requests that found at least one block
        self.num_swapped_out = 0  # blocks copied to the host, in all
        self.num_swapped_in = 0  # blocks copied back to the device, in all

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
            hashes.append(hash_block(hashes[-1] if hashes else None, self._block_tokens(req, i),
                                     self._extra_keys(req, i)))
        return hashes

    def _extra_keys(self, req: Request, i: int) -> object:
        """What besides the token ids decides block i's KV: the cache salt and, for multimodal
        prompts, the content hashes of the images/videos whose placeholders fall in the block (their
        placeholder ids are the same for every image)."""
        if not req.mm_items:
            return req.cache_salt
        lo, hi = i * self.block_size, (i + 1) * self.block_size
        mm = tuple(item.hash for item in req.mm_items if item.offset < hi and item.end > lo)
        return (req.cache_salt, mm) if mm else req.cache_salt

    def find_cached_prefix(self, req: Request) -> CachedPrefix:
        """Leading blocks of a new request already in the cache, each on the device or else on the
        host. At least one token is always left to compute (its logits are needed), so a
        full-prompt hit gives back its last block."""
        found = CachedPrefix()
        if not self.enable_caching or req.request_id in self.req_blocks:
            return found
        if req.sampling_params.prompt_logprobs is not None:
            return found  # every prompt position must be computed to report its logprobs
        num_full = (req.num_tokens - 1) // self.block_size
        for i, h in enumerate(self._hashes(req, num_full)):
            tokens = self._block_tokens(req, i)
            block: KVBlock | HostBlock | None = self.pool.lookup(h, tokens)
            if block is None and self.host is not None:
                block = self.host.lookup(h, tokens)
                if block is not None:
                    found.num_host += 1
            if block is None:
                break
            found.blocks.append(block)
        return found

    def blocks_needed(self, req: Request, num_new_tokens: int, hits: CachedPrefix | None = None) -> int:
        """Fresh device blocks for num_new_tokens more tokens: past the blocks the request holds and
        its prefix hits, plus one per host hit (the destination of its copy)."""
        num_hits, num_host = (len(hits), hits.num_host) if hits else (0, 0)
        have = len(self.req_blocks.get(req.request_id, ())) + num_hits
        return max(0, cdiv(req.num_computed_tokens + num_new_tokens, self.block_size) - have) + num_host

    def allocate_slots(self, req: Request, num_new_tokens: int, hits: CachedPrefix | None = None) -> list[int] | None:
        """Make room for num_new_tokens more tokens after req.num_computed_tokens (which already
        counts the hits); returns the ids of all blocks added (hits first), or None if the pool
        cannot supply them, in which case nothing changes."""
        if not hits:  # the common decode case: room left in the last block
            have = self.req_blocks.get(req.request_id)
            if have is not None and req.num_computed_tokens + num_new_tokens <= len(have) * self.block_size:
                return []
        hits = hits or CachedPrefix()
        need = self.blocks_needed(req, num_new_tokens, hits)
        device_hits = [b for b in hits.blocks if isinstance(b, KVBlock)]
        free_hits = sum(1 for b in device_hits if b.ref_count == 0)  # touching these takes them off the free queue
        if need + free_hits > self.pool.num_free_blocks:
            return None
        self.pool.touch(device_hits)
        if hits.num_host:
            assert self.host is not None
            for b in hits.blocks:
                if isinstance(b, HostBlock):
                    self.host.pin(b)  # the evictions below must not reuse it for a swap-out
        new = self.pool.allocate(need)  # may evict cached blocks, which swap out
        blocks = self._place_hits(hits, new)
        self.req_blocks.setdefault(req.request_id, []).extend(blocks)
        return [b.block_id for b in blocks]

    def _place_hits(self, hits: CachedPrefix, new: list[KVBlock]) -> list[KVBlock]:
        """The request's blocks in order: device hits as found, each host hit copied into the next
        fresh block (indexed on the device at once, so later requests of this step share it), then
        the rest of the fresh blocks."""
        fresh = iter(new)
        out: list[KVBlock] = []
        for b in hits.blocks:
            if isinstance(b, HostBlock):
                dst = next(fresh)
                assert b.block_hash is not None
                self._swap_in.append((b.block_id, dst.block_id))
                self.pool.cache_block(dst, b.block_hash, b.token_ids)
                out.append(dst)
            else:
                out.append(b)
        out.extend(fresh)
        return out

    def _spill(self, block: KVBlock) -> None:
        """An evicted cached device block: keep a copy on the host (if the tier has room)."""
        assert self.host is not None and block.block_hash is not None
        host_id = self.host.store(block.block_hash, block.token_ids)
        if host_id is not None:
            self._swap_out.append((block.block_id, host_id))

    def take_swaps(self) -> tuple[BlockCopies, BlockCopies]:
        """The step's copies, (swap_out, swap_in), in the order they were decided; the worker does
        every swap-out before any swap-in (a block evicted and reused as a swap-in destination in
        one step must be read before it is overwritten)."""
        if not self._swap_out and not self._swap_in:
            return [], []
        out, into = self._swap_out, self._swap_in
        self._swap_out, self._swap_in = [], []
        assert self.host is not None
        self.host.release_readers()
        self.num_swapped_out += len(out)
        self.num_swapped_in += len(into)
        return out, into

    def record_lookup(self, req: Request, hits: CachedPrefix) -> None:
        self.queries += req.num_tokens
        self.query_requests += 1
        self.hit_requests += bool(len(hits))
        self.hits += len(hits) * self.block_size
        self.host_hits += hits.num_host * self.block_size

    @property
    def num_host_blocks(self) -> int:
        return self.host.num_blocks if self.host else 0

    @property
    def num_host_cached_blocks(self) -> int:
        return self.host.num_cached_blocks if self.host else 0

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
