"""The parallelism flags -> a checked `ParallelConfig`: where each rank runs, and whether the model
divides evenly over them. Every refusal names its flag and says "not supported" with the reason.

Layout: one model replica has `--tensor-parallel-size` ranks spread evenly over `--nnodes` nodes;
node 0 runs rank 0 (beside the scheduler) and the API server. `--data-parallel-size` replicas run
on node 0 only, replica r on devices [r * tp, (r + 1) * tp).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import torch

from ernieserve.config import ConfigError, ParallelConfig

if TYPE_CHECKING:
    from ernieserve.config import EngineArgs

DEFAULT_MASTER_PORT = 29500  # torch.distributed's conventional port, for multi-node runs


def parallel_config_from_args(args: "EngineArgs", device: torch.device, hf_config: Any) -> ParallelConfig:
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    if tp < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got {tp}.")
    if dp < 1:
        raise ConfigError(f"--data-parallel-size must be at least 1, got {dp}.")
    master_addr, master_port = _init_method(args)
    nnodes, node_rank, master_addr = _nodes(args, master_addr)
    if nnodes > 1 and dp > 1:
        raise ConfigError(f"--data-parallel-size {dp} is not supported with --nnodes {nnodes}: data-parallel "
                          "replicas run on one node (each replica may still span nodes with -tp).")
    if tp % nnodes:
        raise ConfigError(f"--tensor-parallel-size {tp} is not supported over --nnodes {nnodes}: every node runs "
                          "the same number of ranks.")
    if nnodes > 1 and master_port is None:
        master_port = DEFAULT_MASTER_PORT
    config = ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=args.enable_expert_parallel,
                            data_parallel_size=dp, nnodes=nnodes, node_rank=node_rank,
                            master_addr=master_addr or "127.0.0.1", master_port=master_port)
    check_model_divides(config, hf_config)
    check_devices(config, device)
    return config


def _init_method(args: "EngineArgs") -> tuple[str | None, int | None]:
    addr, port = args.master_addr, args.master_port
    method = args.distributed_init_method
    if method is not None:
        host, sep, port_text = method.removeprefix("tcp://").rpartition(":")
        if not method.startswith("tcp://") or not sep or not host or not port_text.isdigit():
            raise ConfigError(f"--distributed-init-method {method} is not supported: use tcp://HOST:PORT.")
        if (addr is not None and addr != host) or (port is not None and port != int(port_text)):
            raise ConfigError(f"--distributed-init-method {method} contradicts --master-addr / --master-port.")
        addr, port = host, int(port_text)
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--master-port must be a TCP port (1-65535), got {port}.")
    return addr, port


def _nodes(args: "EngineArgs", master_addr: str | None) -> tuple[int, int, str | None]:
    """(nnodes, node_rank, master_addr) from --ips or --nnodes / --node-rank / --master-addr."""
    nnodes, node_rank = args.nnodes, args.node_rank
    if args.ips:
        ips = [ip.strip() for ip in args.ips.split(",") if ip.strip()]
        if not ips:
            raise ConfigError(f"--ips {args.ips!r} lists no address.")
        if nnodes is not None and nnodes != len(ips):
            raise ConfigError(f"--nnodes {nnodes} contradicts --ips, which lists {len(ips)} nodes.")
        nnodes = len(ips)
        if master_addr is not None and master_addr != ips[0]:
            raise ConfigError(f"--master-addr {master_addr} contradicts --ips, whose first node is {ips[0]}.")
        master_addr = ips[0]
        if node_rank is None and nnodes > 1:
            node_rank = _this_node_in(ips)
    nnodes = 1 if nnodes is None else nnodes
    node_rank = 0 if node_rank is None else node_rank
    if nnodes < 1:
        raise ConfigError(f"--nnodes must be at least 1, got {nnodes}.")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes} (0..{nnodes - 1}).")
    if nnodes > 1 and master_addr is None:
        raise ConfigError(f"--nnodes {nnodes} needs --master-addr (node 0's address, reachable from every node) "
                          "or --ips.")
    return nnodes, node_rank, master_addr


def _this_node_in(ips: list[str]) -> int:
    mine = _local_addresses()
    hits = [i for i, ip in enumerate(ips) if ip in mine]
    if len(hits) == 1:
        return hits[0]
    where = "none of them is this host's" if not hits else f"this host matches {len(hits)} of them"
    raise ConfigError(f"--ips lists {len(ips)} nodes and {where}; pass --node-rank to say which node this is.")


def _local_addresses() -> set[str]:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    try:
        names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return names


# ---- the model must divide evenly ---------------------------------------------------------------

def _first(value: Any) -> int:
    """ERNIE VL configs give some MoE sizes per modality as lists."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def check_model_divides(config: ParallelConfig, hf_config: Any) -> None:
    tp = config.tensor_parallel_size
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    num_experts = _first(getattr(text, "moe_num_experts", None) or getattr(text, "num_experts", None) or 0)
    flag = f"--tensor-parallel-size {tp}"
    if config.enable_expert_parallel and num_experts <= 0:
        raise ConfigError("--enable-expert-parallel is not supported for this model: it has no routed experts.")
    if tp == 1:
        return
    if heads % tp:
        raise ConfigError(f"{flag} is not supported for this model: its {heads} attention heads do not split "
                          f"evenly over {tp} ranks.")
    if kv_heads >= tp and kv_heads % tp or kv_heads < tp and tp % kv_heads:
        raise ConfigError(f"{flag} is not supported for this model: its {kv_heads} key/value heads neither split "
                          f"evenly over {tp} ranks nor replicate evenly onto them.")
    inter = int(getattr(text, "intermediate_size", 0) or 0)
    if inter % tp:
        raise ConfigError(f"{flag} is not supported for this model: its MLP intermediate size {inter} does not "
                          f"split evenly over {tp} ranks.")
    if num_experts > 0:
        moe_inter = _first(getattr(text, "moe_intermediate_size", 0) or 0)
        if config.enable_expert_parallel and num_experts % tp:
            raise ConfigError(f"--enable-expert-parallel is not supported with {flag}: the model's {num_experts} "
                              f"experts do not split evenly over {tp} ranks.")
        if moe_inter % tp:  # shared experts split this way even with expert parallelism
            raise ConfigError(f"{flag} is not supported for this model: its expert intermediate size {moe_inter} "
                              f"does not split evenly over {tp} ranks.")


def check_devices(config: ParallelConfig, device: torch.device) -> None:
    """Each node needs a GPU per local rank (times the replicas); CPU ranks share the CPU."""
    if device.type != "cuda":
        return
    need = config.ranks_per_node * config.data_parallel_size
    have = torch.cuda.device_count()
    if need > have:
        flags = f"--tensor-parallel-size {config.tensor_parallel_size}"
        if config.data_parallel_size > 1:
            flags += f" with --data-parallel-size {config.data_parallel_size}"
        if config.nnodes > 1:
            flags += f" over --nnodes {config.nnodes}"
        raise ConfigError(f"{flags} is not supported on this machine: it needs {need} GPUs on this node and "
                          f"{have} {'is' if have == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES).")


def describe_layout(config: ParallelConfig) -> str:
    """One log line: the TP / EP / DP / node layout."""
    parts = [f"tensor parallel {config.tensor_parallel_size}"]
    if config.enable_expert_parallel:
        parts.append(f"expert parallel (each rank holds 1/{config.tensor_parallel_size} of the experts, whole)")
    if config.data_parallel_size > 1:
        parts.append(f"data-parallel replica {config.data_parallel_rank} of {config.data_parallel_size}")
    if config.nnodes > 1:
        parts.append(f"{config.nnodes} nodes, this is node {config.node_rank} with ranks "
                     f"{config.node_ranks().start}-{config.node_ranks().stop - 1}, master {config.master_addr}:"
                     f"{config.master_port}")
    return ", ".join(parts)
