"""Engine configuration: one `EngineArgs` (flag names from FastDeploy and vLLM) that builds one
frozen config dataclass per subsystem.

Bad values raise `ConfigError` whose message names the flag, so the CLI can print it as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ernieserve.multimodal.options import (DEFAULT_LIMIT_MM_PER_PROMPT, MMProcessorOptions, parse_limit_mm_per_prompt,
                                           parse_mm_processor_kwargs)

if TYPE_CHECKING:
    from ernieserve.layers.quantization import QuantConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value the engine cannot run with; the message names the flag."""


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


class _FlagGroup:
    """An argparse group that leaves out some flags and, on request, every default."""

    def __init__(self, group: Any, skip: tuple[str, ...], only_when_given: bool) -> None:
        self.group, self.skip, self.only_when_given = group, skip, only_when_given

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action | None:
        if any(f in self.skip for f in flags):
            return None
        if self.only_when_given:
            kwargs["default"] = argparse.SUPPRESS
        return self.group.add_argument(*flags, **kwargs)


@dataclass(frozen=True, slots=True)
class MultiModalConfig:
    """Image/video inputs (front end only): --limit-mm-per-prompt, --mm-processor-kwargs,
    --allowed-local-media-path, --allowed-media-domains. Text-only models carry the defaults and
    never read them."""

    limit_per_prompt: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LIMIT_MM_PER_PROMPT))
    processor_options: MMProcessorOptions = MMProcessorOptions()
    allowed_local_media_path: str | None = None  # resolved folder; None: no file:// URLs
    allowed_media_domains: tuple[str, ...] | None = None  # http(s) hosts media may come from; None: any


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str  # local checkpoint folder
    tokenizer: str
    served_model_name: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    load_format: str  # auto | safetensors | dummy
    seed: int
    generation_config: dict
    quant_config: "QuantConfig | None" = None  # --quantization: dense linear layers quantized while loading
    multimodal: MultiModalConfig = dataclasses.field(default_factory=MultiModalConfig)

    @property
    def is_multimodal(self) -> bool:
        """The model takes images/videos (its config has a vision tower)."""
        return getattr(self.hf_config, "vision_config", None) is not None

    @property
    def is_moe(self) -> bool:
        """The text model routes tokens to experts (ERNIE's moe_num_experts, Qwen3-MoE's num_experts)."""
        cfg = self.text_config()
        experts = getattr(cfg, "moe_num_experts", None) or getattr(cfg, "num_experts", None) or 0
        return (max(experts) if isinstance(experts, (list, tuple)) else experts) > 0

    @property
    def architecture(self) -> str:
        return (getattr(self.hf_config, "architectures", None) or ["<none>"])[0]

    def text_config(self) -> Any:
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    @property
    def num_layers(self) -> int:
        return self.text_config().num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        cfg = self.text_config()
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config()
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.text_config().vocab_size


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    num_gpu_blocks_override: int | None
    kv_cache_ratio: float
    cpu_kv_cache_space_gb: float
    swap_space_gb: float
    enable_prefix_caching: bool


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How one model replica spreads over devices and hosts (distributed/placement.py builds it).

    Ranks 0..tp-1 form one tensor-parallel group; node k runs ranks [k * per_node, (k+1) * per_node).
    Rank 0 lives in the engine core process, beside the scheduler. Data-parallel replicas are
    separate engine cores on one node, replica r on devices [r * tp, (r+1) * tp).
    """

    tensor_parallel_size: int
    enable_expert_parallel: bool = False  # MoE experts split whole across the TP ranks
    data_parallel_size: int = 1
    data_parallel_rank: int = 0  # which replica this engine core is; the front end sets it per process
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # node 0's address: the rendezvous store and rank 0's step channel
    master_port: int | None = None  # None: rank 0 picks a free port (one node only)

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def node_ranks(self, node_rank: int | None = None) -> range:
        """The tensor-parallel ranks that run on a node (default: this one)."""
        node = self.node_rank if node_rank is None else node_rank
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def device_index(self, rank: int) -> int:
        """Local device of a rank on its node: replicas take consecutive blocks of devices."""
        return self.data_parallel_rank * self.ranks_per_node + rank % self.ranks_per_node


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device: torch.device
    enforce_eager: bool  # no CUDA graphs
    cudagraph_capture_sizes: tuple[int, ...] | None = None  # None: derived from max_num_seqs
    # also capture mixed prefill+decode steps (worker/mixed_graph.py); None: on for dense text models
    cudagraph_mixed_steps: bool | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    block_size: int = 64
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_ratio: float = 1.0
    cpu_kv_cache_space: float = 4.0
    swap_space: float = 0.0
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    ips: str | None = None  # FastDeploy: comma-separated node addresses, node 0 first
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    distributed_init_method: str | None = None  # tcp://HOST:PORT, another spelling of master addr/port
    quantization: str | None = None
    quantization_config: str | None = None  # JSON options of --quantization (group_size, gemm_backend)
    enforce_eager: bool = False
    use_cudagraph: bool | None = None  # FastDeploy's switch; None = on where CUDA graphs work
    graph_optimization_config: str | None = None  # FastDeploy's JSON: use_cudagraph, cudagraph_capture_sizes
    # multimodal front end (JSON strings on the command line, dicts from the offline API)
    limit_mm_per_prompt: str | dict | None = None  # {"image": N, "video": M}
    mm_processor_kwargs: str | dict | None = None  # FastDeploy's keys: image_max_pixels, video_fps, ...
    allowed_local_media_path: str | None = None  # file:// image/video URLs are served from under this folder
    allowed_media_domains: list[str] | None = None  # http(s) image/video URLs only from these hosts

    # ---- command line -------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                     only_when_given: bool = False, title: str = "engine") -> argparse.ArgumentParser:
        """The engine flags. skip: flags the caller's parser owns (the benchmarks' --model and
        --seed); only_when_given: no defaults, so the namespace holds only the flags given (the
        benchmarks hand exactly those to LLM(...), which applies the engine's defaults)."""
        d = EngineArgs()
        g = _FlagGroup(parser.add_argument_group(title), skip, only_when_given)
        g.add_argument("--model", type=str, default=None,
                       help="Local Hugging Face checkpoint folder (default: the built-in dummy ERNIE-4.5-0.3B).")
        g.add_argument("--tokenizer", type=str, default=None, help="Tokenizer folder (default: the model folder).")
        g.add_argument("--served-model-name", type=str, default=None,
                       help="Model name the API answers to (default: the --model value).")
        g.add_argument("--dtype", type=str, default=d.dtype, choices=["auto", "bfloat16", "float16", "float32"],
                       help="auto: the checkpoint's dtype on GPU, float32 on CPU.")
        g.add_argument("--device", type=str, default=d.device, choices=["auto", "cpu", "cuda"],
                       help="Where the model runs; auto picks CUDA when present.")
        g.add_argument("--load-format", type=str, default=d.load_format, choices=["auto", "safetensors", "dummy"],
                       help="dummy: random weights from config.json alone, made on the device (vLLM's name).")
        g.add_argument("--seed", type=int, default=d.seed, help="Seed for dummy weights and unseeded sampling.")
        g.add_argument("--max-model-len", type=int, default=None,
                       help="Longest context (prompt + output) in tokens (default: max_position_embeddings).")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                       help="Most sequences running at once; also sets the CUDA graph capture sizes.")
        g.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="Token budget of one step (prefill chunks + decodes); default max(2048, max_num_seqs).")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="Split long prompts over steps that also run decodes (on by default).")
        g.add_argument("--block-size", type=int, default=d.block_size, help="Tokens per KV cache block.")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="Fraction of GPU memory for weights, activations and the KV cache.")
        g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                       help="Use exactly this many KV blocks instead of sizing from memory.")
        g.add_argument("--kv-cache-ratio", type=float, default=d.kv_cache_ratio,
                       help="New prompts are admitted only while this fraction of KV blocks is in use; "
                            "the rest is kept for running requests to grow (FastDeploy).")
        g.add_argument("--cpu-kv-cache-space", type=float, default=d.cpu_kv_cache_space,
                       help="GiB of host memory for the KV cache when running on CPU.")
        g.add_argument("--swap-space", type=float, default=d.swap_space,
                       help="GiB of CPU memory for the prefix cache's second tier: evicted cached blocks are kept "
                            "there and copied back on a hit instead of recomputed (needs prefix caching).")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="Reuse the KV blocks of shared prompt prefixes (on by default, as in FastDeploy 2.2).")
        add_parallel_cli_args(parser, d, skip, only_when_given)
        g.add_argument("--quantization", type=str, default=None,
                       help="Quantize the bf16 checkpoint while loading: wint8, wint4 (weight-only int8/int4), "
                            "block_wise_fp8 or fp8 (Hopper); FastDeploy's JSON form "
                            "'{\"quantization\": \"wint4\", \"group_size\": 128}' works too.")
        g.add_argument("--quantization-config", type=str, default=None,
                       help='JSON options of --quantization: {"group_size": 128} (wint8/wint4; default per '
                            'output channel), {"gemm_backend": "auto|triton|torch|reference"}.')
        g.add_argument("--enforce-eager", action="store_true", help="Never use CUDA graphs (vLLM's name).")
        g.add_argument("--use-cudagraph", action=argparse.BooleanOptionalAction, default=None,
                       help="CUDA graphs for decode steps (FastDeploy's name; on by default on GPU).")
        g.add_argument("--graph-optimization-config", type=str, default=None,
                       help='JSON, e.g. \'{"use_cudagraph": true, "cudagraph_capture_sizes": [1, 2, 4, 8]}\'; '
                            '"cudagraph_mixed_steps" also captures mixed prefill+decode steps per token count '
                            '(default: on for text models; false runs them eagerly).')
        g.add_argument("--limit-mm-per-prompt", type=str, default=None,
                       help='Most images/videos in one prompt, JSON: \'{"image": 10, "video": 3}\' (default: '
                            'FastDeploy\'s 1 image and 1 video; more in one request is a 400).')
        g.add_argument("--mm-processor-kwargs", type=str, default=None,
                       help="JSON options of the image/video processor (FastDeploy's keys): image_min_pixels, "
                            "image_max_pixels, video_min_pixels, video_max_pixels, video_fps, video_min_frames, "
                            "video_max_frames, video_target_frames, video_frames_sample (leading|middle); "
                            "min_pixels, max_pixels, fps, min_frames, max_frames, target_frames as aliases.")
        g.add_argument("--allowed-local-media-path", type=str, default=None,
                       help="Folder whose files requests may name as file:// image/video URLs (default: none; "
                            "paths are resolved, so links cannot reach outside it).")
        g.add_argument("--allowed-media-domains", type=str, nargs="+", default=None, metavar="HOST",
                       help="Host names http(s) image/video URLs may name, redirects included (vLLM's flag; "
                            "exact names, e.g. images.example.com; default: any host).")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    # ---- building the config ------------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        self._check_unsupported()
        device = resolve_device(self.device)
        model_dir = self._model_dir()
        hf_config = load_hf_config(model_dir)
        dtype = resolve_dtype(self.dtype, hf_config, device)
        quant_config = self._quant_config(device, dtype)
        max_model_len = self._max_model_len(hf_config)
        batched = self.max_num_batched_tokens or (max(2048, self.max_num_seqs) if self.enable_chunked_prefill
                                                  else max_model_len)
        if not self.enable_chunked_prefill and batched < max_model_len:
            raise ConfigError(f"--max-num-batched-tokens ({batched}) must be at least --max-model-len "
                              f"({max_model_len}) when chunked prefill is disabled.")
        _check_positive(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched, block_size=self.block_size)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if not 0.0 < self.kv_cache_ratio <= 1.0:
            raise ConfigError(f"--kv-cache-ratio must be in (0, 1], got {self.kv_cache_ratio}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be at least 1.")
        model = ModelConfig(
            model=str(model_dir), tokenizer=self.tokenizer or str(model_dir),
            served_model_name=self.served_model_name or (self.model or "ernie-4.5-0.3b-dummy"),
            hf_config=hf_config, dtype=dtype, max_model_len=max_model_len,
            load_format=self.load_format, seed=self.seed, generation_config=load_generation_config(model_dir),
            quant_config=quant_config, multimodal=self._multimodal_config())
        return EngineConfig(
            model=model,
            cache=CacheConfig(self.block_size, self.gpu_memory_utilization, self.num_gpu_blocks_override,
                              self.kv_cache_ratio, self.cpu_kv_cache_space, self.swap_space,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(self.max_num_seqs, batched, max_model_len, self.enable_chunked_prefill),
            parallel=build_parallel_config(self, device, hf_config),
            device=self._device_config(device),
        )

    def _device_config(self, device: torch.device) -> DeviceConfig:
        graph_cfg: dict = {}
        if self.graph_optimization_config:
            try:
                graph_cfg = json.loads(self.graph_optimization_config)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--graph-optimization-config is not valid JSON ({e}).") from e
            unknown = set(graph_cfg) - {"use_cudagraph", "cudagraph_capture_sizes", "graph_opt_level",
                                        "cudagraph_mixed_steps"}
            if unknown:
                raise ConfigError(f"--graph-optimization-config: unsupported keys {sorted(unknown)}; "
                                  "supported: use_cudagraph, cudagraph_capture_sizes, cudagraph_mixed_steps.")
        use = graph_cfg.get("use_cudagraph", self.use_cudagraph)
        sizes = graph_cfg.get("cudagraph_capture_sizes")
        if sizes is not None:
            if not isinstance(sizes, list) or not sizes or any(not isinstance(x, int) or x < 1 for x in sizes):
                raise ConfigError("--graph-optimization-config: cudagraph_capture_sizes must be a list of "
                                  "positive integers.")
            sizes = tuple(sorted(set(x for x in sizes if x <= self.max_num_seqs))) or (1,)
        mixed = graph_cfg.get("cudagraph_mixed_steps")
        if mixed is not None and not isinstance(mixed, bool):
            raise ConfigError("--graph-optimization-config: cudagraph_mixed_steps must be true or false.")
        eager = self.enforce_eager or use is False or device.type != "cuda"
        return DeviceConfig(device, eager, sizes, False if eager else mixed)

    def _multimodal_config(self) -> MultiModalConfig:
        try:
            limits = parse_limit_mm_per_prompt(self.limit_mm_per_prompt)
            options = parse_mm_processor_kwargs(self.mm_processor_kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        folder = None
        if self.allowed_local_media_path:
            path = Path(self.allowed_local_media_path).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path}: no such folder.")
            folder = str(path.resolve())
        domains = None
        if self.allowed_media_domains is not None:
            domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_media_domains)
            if not domains or any(not d or "/" in d or ":" in d for d in domains):
                raise ConfigError(f"--allowed-media-domains {' '.join(self.allowed_media_domains)}: give host names "
                                  "only (e.g. images.example.com), no scheme, port or path.")
        return MultiModalConfig(limits, options, folder, domains)

    def _check_unsupported(self) -> None:
        if not 0.0 <= self.swap_space < float("inf"):
            raise ConfigError(f"--swap-space must be a number of GiB >= 0, got {self.swap_space}.")

    def _quant_config(self, device: torch.device, dtype: torch.dtype) -> "QuantConfig | None":
        from ernieserve.layers.quantization import UnsupportedQuantization, parse_quantization

        try:
            config = parse_quantization(self.quantization, self.quantization_config)
            if config is not None:
                config.check_device(device, dtype)
        except UnsupportedQuantization as e:
            flag = f"--quantization {self.quantization}" if self.quantization else "--quantization-config"
            raise ConfigError(f"{flag}: {e}.") from e
        return config

    def _model_dir(self) -> Path:
        if self.model is None:
            from ernieserve.checkpoint.dummy import ensure_default_model

            return ensure_default_model()
        path = Path(self.model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--model {self.model}: no such local folder. ernieserve loads Hugging Face "
                              "checkpoints from a local folder (config.json, *.safetensors, tokenizer files); "
                              "`ernieserve make-dummy` writes one.")
        return path

    def _max_model_len(self, hf_config: Any) -> int:
        text = getattr(hf_config, "text_config", None) or hf_config
        limit = getattr(text, "max_position_embeddings", None) or 4096
        if self.max_model_len is None:
            return int(limit)
        if self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be at least 1, got {self.max_model_len}.")
        if self.max_model_len > limit:
            raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's "
                              f"max_position_embeddings ({limit}).")
        return self.max_model_len


def add_parallel_cli_args(parser: argparse.ArgumentParser, d: "EngineArgs", skip: tuple[str, ...] = (),
                          only_when_given: bool = False) -> None:
    g = _FlagGroup(parser.add_argument_group("parallelism"), skip, only_when_given)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                   help="Devices per model replica: attention heads, MLPs and the vocabulary split over them "
                        "(one process each; NCCL on GPUs, gloo on CPU).")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: each tensor-parallel rank holds num_experts / tp whole experts instead of a "
                        "slice of every expert.")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=d.data_parallel_size,
                   help="Model replicas (engine cores) behind one API server, each with --tensor-parallel-size "
                        "devices; requests go to the replica with the fewest unfinished ones.")
    g.add_argument("--ips", type=str, default=None,
                   help="Multi-node: comma-separated addresses of every node, node 0 (the API server) first "
                        "(FastDeploy); sets --nnodes and --master-addr.")
    g.add_argument("--nnodes", type=int, default=None, help="Multi-node: number of nodes sharing the tensor-parallel "
                   "ranks evenly (default 1).")
    g.add_argument("--node-rank", type=int, default=None,
                   help="Multi-node: this node's index; node 0 serves, nodes 1.. only run their workers "
                        "(default 0, or this host's position in --ips).")
    g.add_argument("--master-addr", type=str, default=None,
                   help="Multi-node: node 0's address, reachable from every node (rendezvous).")
    g.add_argument("--master-port", type=int, default=None,
                   help="Multi-node: node 0's rendezvous port (default 29500; one node: a free port).")
    g.add_argument("--distributed-init-method", type=str, default=None,
                   help="tcp://HOST:PORT, the same as --master-addr HOST --master-port PORT.")


def build_parallel_config(args: "EngineArgs", device: torch.device, hf_config: Any) -> ParallelConfig:
    from ernieserve.distributed.placement import parallel_config_from_args

    return parallel_config_from_args(args, device, hf_config)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available on this machine.")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}.")
    return torch.device(device)


def resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}.")
        return _DTYPES[dtype]
    if device.type == "cpu":
        # bf16 matmuls are slow on most CPUs and the CPU path is mostly a test oracle: use fp32.
        return torch.float32
    text = getattr(hf_config, "text_config", None) or hf_config
    declared = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "bfloat16"
    if isinstance(declared, torch.dtype):
        return declared if declared != torch.float32 else torch.bfloat16
    return _DTYPES.get(str(declared).replace("torch.", ""), torch.bfloat16)


def load_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing. A model folder needs a Hugging Face config.json.")
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from e
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: transformers cannot read this config ({e}).") from e


def load_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from e


def env_flag(name: str, default: str = "") -> str:
    """Environment variables FastDeploy users expect (e.g. FD_SAMPLING_CLASS)."""
    return os.environ.get(name, default)
