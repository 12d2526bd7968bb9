"""Sizing and allocating the paged KV cache tensors: on the device, and the host tier (--swap-space).

The device cache is one tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`
(K at index 0, V at 1); each layer gets its contiguous `(k_cache, v_cache)` views, the layout the
attention backends expect. One tensor lets the swapper move a block of every layer with a single
gather or scatter kernel. The host tier is block-major, `[num_host_blocks, num_layers, 2,
block_size, num_kv_heads, head_dim]`, so that one host block is one contiguous chunk: one DMA.
"""

from __future__ import annotations

import logging
import os

import torch

from ernieserve.attention.base import KVCache
from ernieserve.config import EngineConfig

logger = logging.getLogger(__name__)

# device memory of the swapper's staging buffer (blocks of every layer, gathered for one DMA)
SWAP_STAGING_BYTES = 64 * 2**20


def kv_heads_per_rank(config: EngineConfig) -> int:
    """KV heads one tensor-parallel rank caches: its share, or 1 (replicated) when there are fewer
    KV heads than ranks (layers/linear.py QKVParallelLinear)."""
    return max(1, config.model.num_kv_heads // config.parallel.tensor_parallel_size)


def bytes_per_block(config: EngineConfig) -> int:
    m = config.model
    elem = torch.tensor([], dtype=m.dtype).element_size()
    # K and V, every layer, this rank's heads
    return 2 * m.num_layers * config.cache.block_size * kv_heads_per_rank(config) * m.head_dim * elem


def num_blocks_for_budget(config: EngineConfig, budget_bytes: int) -> int:
    return max(0, budget_bytes // bytes_per_block(config))


def cpu_kv_budget(config: EngineConfig) -> int:
    """--cpu-kv-cache-space GiB, but no more than every sequence at full length needs (small
    models and short contexts then start at once instead of zeroing gigabytes)."""
    blocks_per_seq = -(-config.scheduler.max_model_len // config.cache.block_size)
    needed = bytes_per_block(config) * blocks_per_seq * config.scheduler.max_num_seqs
    return min(int(config.cache.cpu_kv_cache_space_gb * 2**30), needed)


def gpu_kv_budget(config: EngineConfig, device: torch.device, peak_bytes: int, graph_pool_bytes: int = 0) -> int:
    """Bytes left for the KV cache: total * utilization minus what the profiled step peaked at
    (and the swapper's staging buffer, when there is a host tier).

    The cache is one tensor, so it must also fit in memory the driver still has free: blocks the
    caching allocator holds but cannot return (loading can leave them split around live weights)
    serve activations later, never the cache, and CUDA graphs draw their pools (graph_pool_bytes)
    from fresh memory too."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    staging = swap_staging_blocks(config, num_host_blocks(config)) * bytes_per_block(config)
    budget = int(total * config.cache.gpu_memory_utilization) - peak_bytes - max(0, used_by_others) - staging
    obtainable = free - graph_pool_bytes - staging - _FREE_MARGIN
    if obtainable < budget:
        stuck = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        logger.info("KV cache limited to the free device memory (%.2f GiB instead of %.2f GiB): the allocator "
                    "holds %.2f GiB in fragments it cannot return", obtainable / 2**30, budget / 2**30, stuck / 2**30)
    return min(budget, obtainable)


# what gpu_kv_budget leaves of the driver's free memory besides the graph pools: the decode
# graphs' own small pool, cuBLAS workspaces, NCCL buffers
_FREE_MARGIN = 1 << 30


def allocate_kv_cache(config: EngineConfig, num_blocks: int, device: torch.device) -> torch.Tensor:
    """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], zeroed."""
    m = config.model
    shape = (m.num_layers, 2, num_blocks, config.cache.block_size, kv_heads_per_rank(config), m.head_dim)
    return torch.zeros(shape, dtype=m.dtype, device=device)


def layer_views(cache: torch.Tensor) -> list[KVCache]:
    """Each layer's (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    return [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]


def allocate_kv_caches(config: EngineConfig, num_blocks: int, device: torch.device) -> list[KVCache]:
    return layer_views(allocate_kv_cache(config, num_blocks, device))


# ---- host tier ----------------------------------------------------------------------------------
def num_host_blocks(config: EngineConfig) -> int:
    """Blocks of the host tier: --swap-space GiB worth; none without prefix caching (nothing to keep)."""
    cache = config.cache
    if cache.swap_space_gb <= 0 or not cache.enable_prefix_caching:
        return 0
    return int(cache.swap_space_gb * 2**30) // bytes_per_block(config)


def swap_staging_blocks(config: EngineConfig, num_host: int) -> int:
    """Blocks the swapper gathers per DMA round: SWAP_STAGING_BYTES worth, at least one."""
    if num_host == 0:
        return 0
    return max(1, min(num_host, SWAP_STAGING_BYTES // bytes_per_block(config)))


def check_host_memory(num_bytes: int) -> None:
    """Refuse a tier larger than this machine's memory (pinned pages cannot be swapped out)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if num_bytes > 0.9 * total:
        raise RuntimeError(f"--swap-space asks for {num_bytes / 2**30:.1f} GiB of host memory; this machine "
                           f"has {total / 2**30:.1f} GiB. Lower --swap-space.")
    if num_bytes > 0.5 * total:
        logger.warning("--swap-space takes %.1f GiB of this machine's %.1f GiB", num_bytes / 2**30, total / 2**30)


def allocate_host_cache(config: EngineConfig, num_blocks: int, pin: bool) -> torch.Tensor:
    """[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] on the host, uninitialized
    (a host block is read only after a swap-out filled it). Pinned where CUDA copies from it."""
    m = config.model
    shape = (num_blocks, m.num_layers, 2, config.cache.block_size, kv_heads_per_rank(config), m.head_dim)
    check_host_memory(num_blocks * bytes_per_block(config))
    return torch.empty(shape, dtype=m.dtype, pin_memory=pin)
