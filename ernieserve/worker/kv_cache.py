"""Sizing and allocating the paged KV cache tensors on the device."""

from __future__ import annotations

import logging

import torch

from ernieserve.attention.base import KVCache
from ernieserve.config import EngineConfig

logger = logging.getLogger(__name__)


def bytes_per_block(config: EngineConfig) -> int:
    m = config.model
    elem = torch.tensor([], dtype=m.dtype).element_size()
    # K and V, every layer
    return 2 * m.num_layers * config.cache.block_size * m.num_kv_heads * m.head_dim * elem


def num_blocks_for_budget(config: EngineConfig, budget_bytes: int) -> int:
    return max(0, budget_bytes // bytes_per_block(config))


def cpu_kv_budget(config: EngineConfig) -> int:
    """--cpu-kv-cache-space GiB, but no more than every sequence at full length needs (small
    models and short contexts then start at once instead of zeroing gigabytes)."""
    blocks_per_seq = -(-config.scheduler.max_model_len // config.cache.block_size)
    needed = bytes_per_block(config) * blocks_per_seq * config.scheduler.max_num_seqs
    return min(int(config.cache.cpu_kv_cache_space_gb * 2**30), needed)


def gpu_kv_budget(config: EngineConfig, device: torch.device, peak_bytes: int) -> int:
    """Bytes left for the KV cache: total * utilization minus what the profiled step peaked at."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    return int(total * config.cache.gpu_memory_utilization) - peak_bytes - max(0, used_by_others)


def allocate_kv_caches(config: EngineConfig, num_blocks: int, device: torch.device) -> list[KVCache]:
    m = config.model
    shape = (num_blocks, config.cache.block_size, m.num_kv_heads, m.head_dim)
    return [(torch.zeros(shape, dtype=m.dtype, device=device), torch.zeros(shape, dtype=m.dtype, device=device))
            for _ in range(m.num_layers)]
