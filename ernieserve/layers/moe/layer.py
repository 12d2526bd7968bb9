"""`FusedMoE`: the routed experts of one layer as two stacked weights, and `MoEBlock`, which adds
the router and optional shared experts.

Weights: ``w13 [E, 2 * I_local, H]`` (gate rows, then up rows) and ``w2 [E, H, I_local]``, where
``I_local = moe_intermediate_size / tp_size``: tensor parallelism splits every expert's
intermediate dimension, and the layer all-reduces its output. Checkpoints store one tensor per
expert and projection (HF ``...mlp.experts.{e}.gate_proj.weight``); `weight_loader` copies each into
its slot as it streams past, so the model never holds an expert twice. Checkpoints already in
HF's stacked in-memory layout (``...mlp.experts.gate_up_proj`` / ``down_proj``) load too.

Dispatch: the Triton path on CUDA, the torch reference (a loop over experts) elsewhere.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from ernieserve.distributed.parallel_state import SINGLE, TPGroup
from ernieserve.layers.moe.fused_moe import fused_moe_ref
from ernieserve.layers.moe.router import TopKRouter

# HF per-expert names: "<prefix>.experts.<e>.<gate_proj|up_proj|down_proj>.weight"
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
# HF stacked names: "<prefix>.experts.gate_up_proj" [E, 2I, H] and "<prefix>.experts.down_proj" [E, H, I]
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        if intermediate_size % tp.size:
            raise ValueError(f"moe_intermediate_size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({tp.size}).")
        self.num_experts = num_experts
        self.top_k = top_k
        self.tp = tp
        self.inter = intermediate_size // tp.size  # this rank's share
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter, dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # slots filled per parameter, so a checkpoint missing an expert is reported, not run
        self._filled: dict[str, set[tuple[int, str]]] = {"w13": set(), "w2": set()}

    # ---- loading --------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id: (expert, "gate" | "up" | "down") for a per-expert tensor, None for a stacked one."""
        if shard_id is None:
            self._load_stacked(param, loaded)
            return
        expert, proj = shard_id  # type: ignore[misc]
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range (num_experts={self.num_experts})")
        n, r = self.inter, self.tp.rank
        if proj == "down":  # [H, I]: split the input features
            _copy(param.data[expert], loaded.narrow(1, r * n, n))
            self._filled["w2"].add((expert, proj))
        else:  # [I, H]: split the output features; gate rows first
            offset = 0 if proj == "gate" else n
            _copy(param.data[expert].narrow(0, offset, n), loaded.narrow(0, r * n, n))
            self._filled["w13"].add((expert, proj))

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n, r = self.inter, self.tp.rank
        if param is self.w2:
            _copy(param.data, loaded.narrow(2, r * n, n))
            self._filled["w2"] = {(e, "down") for e in range(self.num_experts)}
            return
        full = loaded.shape[1] // 2
        _copy(param.data[:, :n], loaded.narrow(1, r * n, n))
        _copy(param.data[:, n:], loaded.narrow(1, full + r * n, n))
        self._filled["w13"] = {(e, p) for e in range(self.num_experts) for p in ("gate", "up")}

    def fully_loaded(self, param_name: str) -> bool:
        per_expert = 2 if param_name == "w13" else 1
        return len(self._filled[param_name]) == per_expert * self.num_experts

    # ---- compute --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights/ids [T, top_k] -> [T, H], the weighted sum of the routed experts."""
        if x.is_cuda:
            from ernieserve.layers.moe.fused_moe import fused_moe_triton

            out = fused_moe_triton(x, self.w13, self.w2, topk_weights, topk_ids)
        else:
            out = fused_moe_ref(x, self.w13, self.w2, topk_weights, topk_ids)
        return self.tp.all_reduce(out)


class MoEBlock(nn.Module):
    """router -> routed experts (+ shared experts): the MLP of a sparse decoder layer.

    Submodule names follow HF (`gate`, `experts`, `shared_experts`), so checkpoint names map
    one to one.
    """

    def __init__(self, gate: TopKRouter, experts: FusedMoE, shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        topk_weights, topk_ids = self.gate(x)  # [num_tokens, top_k] each
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def load_moe_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                     loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Loads expert tensors and router score biases as they stream past; yields every other tensor.

    Expert parameter names are added to `loaded` once every expert's slot is filled.
    `model.map_weight_name` is applied first (it must be idempotent: the caller's loader applies it
    again to what this yields).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for hf_name, tensor in weights:
        name = model.map_weight_name(hf_name)  # type: ignore[operator]
        if name is None:
            continue
        target = _expert_target(name)
        if target is not None:
            param_name, shard_id = target
            param = params.get(param_name)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching expert weight in the model")
            try:
                param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {hf_name!r}: {e}") from e
            owner, attr = param_name.rsplit(".", 1)
            if modules[owner].fully_loaded(attr):  # type: ignore[operator]
                loaded.add(param_name)
            continue
        if name.endswith(".e_score_correction_bias"):
            router = modules.get(name.rsplit(".", 1)[0])
            if not isinstance(router, TopKRouter) or router.e_score_correction_bias is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no matching router in the model")
            router.load_score_bias(tensor)
            continue
        yield name, tensor


def _expert_target(name: str) -> tuple[str, object] | None:
    """Our parameter name and weight_loader shard id for an expert tensor's name, else None."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        proj = m["proj"].removesuffix("_proj")
        param = "w2" if proj == "down" else "w13"
        return f"{m['prefix']}.{param}", (int(m["expert"]), proj)
    m = _STACKED.match(name)
    if m is not None:
        return f"{m['prefix']}.{'w13' if m['proj'] == 'gate_up_proj' else 'w2'}", None
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)
