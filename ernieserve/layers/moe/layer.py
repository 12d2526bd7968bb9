"""`FusedMoE`: the routed experts of one layer as two stacked weights, and `MoEBlock`, which adds
the router and optional shared experts.

Weights: ``w13 [E, 2 * I_local, H]`` (gate rows, then up rows) and ``w2 [E, H, I_local]``, where
``I_local = moe_intermediate_size / tp_size``: tensor parallelism splits every expert's
intermediate dimension, and the layer all-reduces its output. With expert parallelism
(``--enable-expert-parallel``) a rank instead holds ``E / tp_size`` whole experts (``I_local = I``)
and computes only the assignments routed to them. Checkpoints store one tensor per
expert and projection (HF ``...mlp.experts.{e}.gate_proj.weight``); `weight_loader` copies each into
its slot as it streams past, so the model never holds an expert twice. Checkpoints already in
HF's stacked in-memory layout (``...mlp.experts.gate_up_proj`` / ``down_proj``) load too.

Storage, loading and compute of the experts belong to the layer's `method`
(layers/quantization/moe.py): bf16 `w13` / `w2`, or experts quantized as they stream in under
--quantization. Either runs the Triton path on CUDA, the torch reference (a loop over experts) elsewhere.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from ernieserve.distributed.parallel_state import SINGLE, TPGroup, scoped_expert_parallel
from ernieserve.layers.linear import RowParallelLinear
from ernieserve.layers.moe import fused_moe as fm
from ernieserve.layers.moe.router import TopKRouter

# HF per-expert names: "<prefix>.experts.<e>.<gate_proj|up_proj|down_proj>.weight"
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
# HF stacked names: "<prefix>.experts.gate_up_proj" [E, 2I, H] and "<prefix>.experts.down_proj" [E, H, I]
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
# HF shared-expert MLP names: "<prefix>.shared_experts.gate_proj.weight" [S * I, H], ... down_proj [H, S * I]
_SHARED = re.compile(r"^(?P<prefix>.*)\.shared_experts\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class FusedMoE(nn.Module):
    """expert_parallel: each rank holds num_experts / tp_size whole experts (a contiguous range)
    instead of a slice of every expert; tokens routed elsewhere contribute zero here, and the
    all-reduce that follows sums the ranks' parts either way."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, tp: TPGroup = SINGLE, expert_parallel: bool | None = None,
                 shared_slots: int = 0) -> None:
        super().__init__()
        if expert_parallel is None:  # the loader's expert_parallel_scope decides
            expert_parallel = scoped_expert_parallel()
        self.expert_parallel = expert_parallel and tp.size > 1
        # Shared experts folded in as always-chosen experts (see MoEBlock): slots after the routed
        # ones, ids num_experts.. . Not with expert parallelism, where every rank runs them whole;
        # decided by the flag, not the group size, so a one-rank model drawn for --load-format dummy
        # has the same layout as the ranks' (distributed/sharded_loading.py).
        self.shared_slots = 0 if expert_parallel else shared_slots
        if self.expert_parallel and num_experts % tp.size:
            raise ValueError(f"the number of experts ({num_experts}) is not divisible by the tensor-parallel "
                             f"size ({tp.size}) for expert parallelism.")
        if not self.expert_parallel and intermediate_size % tp.size:
            raise ValueError(f"moe_intermediate_size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({tp.size}).")
        self.num_experts = num_experts  # all ranks' experts; router ids are in [0, num_experts)
        self.top_k = top_k
        self.tp = tp
        # expert parallel: experts [expert_start, expert_start + num_local_experts), whole;
        # tensor parallel: every expert, intermediate rows [shard_rank * inter, (shard_rank + 1) * inter)
        self.num_local_experts = num_experts // tp.size if self.expert_parallel else num_experts + self.shared_slots
        self.expert_start = tp.rank * self.num_local_experts if self.expert_parallel else 0
        self.shard_rank = 0 if self.expert_parallel else tp.rank
        self.inter = intermediate_size if self.expert_parallel else intermediate_size // tp.size  # this rank's
        self.reduce_results = True  # MoEBlock turns this off to reduce once with its shared experts
        # How the experts are stored, loaded and run: bf16 `w13` / `w2`, or quantized ones when built
        # inside the loader's quantization scope (layers/quantization/moe.py; imported here because
        # it imports this package's kernels).
        from ernieserve.layers.quantization.moe import scoped_moe_method

        self.method = scoped_moe_method()
        self.method.create_weights(self, self.num_local_experts, hidden_size, self.inter, dtype)
        # slots filled per parameter, so a checkpoint missing an expert is reported, not run
        self._filled: dict[str, set[tuple[int, str]]] = {"w13": set(), "w2": set()}

    # ---- loading --------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id: (expert, "gate" | "up" | "down") for a per-expert tensor, None for a stacked one."""
        if shard_id is None:
            self._load_stacked(param, loaded)
            return
        expert, proj = shard_id  # type: ignore[misc]
        if not 0 <= expert < self.num_experts + self.shared_slots:
            raise ValueError(f"expert {expert} is out of range (num_experts={self.num_experts}"
                             + (f", {self.shared_slots} shared)" if self.shared_slots else ")"))
        local = expert - self.expert_start
        if not 0 <= local < self.num_local_experts:
            return  # another rank's expert (expert parallelism)
        n, r = self.inter, self.shard_rank
        if proj == "down":  # [H, I]: split the input features
            self.method.load_expert(self, local, proj, loaded.narrow(1, r * n, n))
            self._filled["w2"].add((local, proj))
        else:  # [I, H]: split the output features; the method puts gate rows first
            self.method.load_expert(self, local, proj, loaded.narrow(0, r * n, n))
            self._filled["w13"].add((local, proj))

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """[E, 2I, H] gate_up_proj or [E, H, I] down_proj, expert by expert through the per-expert
        path (which keeps this rank's experts and rows, and lets a quantized method take each)."""
        if loaded.dim() != 3:
            raise ValueError(f"a stacked expert tensor has 3 dimensions, got shape {tuple(loaded.shape)}")
        is_down = param is self.w2
        for e in range(loaded.shape[0]):  # global expert ids
            if is_down:
                self.weight_loader(param, loaded[e], (e, "down"))
            else:
                full = loaded.shape[1] // 2
                self.weight_loader(param, loaded[e, :full], (e, "gate"))
                self.weight_loader(param, loaded[e, full:], (e, "up"))

    def fully_loaded(self, param_name: str) -> bool:
        per_expert = 2 if param_name == "w13" else 1
        return len(self._filled[param_name]) == per_expert * self.num_local_experts

    # ---- compute --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                sum_slots: bool = True, alignment: fm.Alignment | None = None) -> torch.Tensor:
        """x [T, H], topk_weights/ids [T, top_k] -> [T, H], the weighted sum of the routed experts.

        sum_slots=False (one rank only): may return the weighted outputs per slot [T, top_k, H]
        instead, for a consumer that adds them up itself (MoEBlock.return_slot_partials).
        alignment: moe_align's outputs for topk_ids at `align_block_m(x)`'s block_m, made by the
        router (MoEBlock); only where that answered a block_m."""
        if self.expert_parallel:
            assert alignment is None, "an alignment of the router's ids, not of this rank's local ones"
            topk_weights, topk_ids = self._local_routing(topk_weights, topk_ids)
        # Triton on CUDA, torch reference elsewhere
        kw = {} if alignment is None else {"alignment": alignment}
        out = self.method.apply(self, x, topk_weights, topk_ids, sum_slots=sum_slots or self.tp.size > 1, **kw)
        return self.tp.all_reduce(out) if self.reduce_results else out

    def align_block_m(self, x: torch.Tensor) -> int | None:
        """The block_m for which the router should also align the ids (fused_moe.triton_route_align)
        of these tokens, or None: then the experts align them in a launch of their own. Only for
        decode-sized batches on the Triton path (CUDA), up to fused_moe.route_align_max_tokens()
        (off by default), without expert parallelism (whose local ids the router does not know)."""
        num_tokens = x.shape[0]
        if not num_tokens <= fm.route_align_max_tokens() or not fm.route_align_supported(num_tokens, self.num_slots):
            return None
        return self._triton_block_m(x)

    def static_alignment(self, x: torch.Tensor, topk_ids: torch.Tensor) -> fm.Alignment | None:
        """One GEMM block per assignment (fused_moe.per_assignment_alignment) for batches of up to
        fused_moe.static_align_max_tokens() tokens on the Triton path: no align launch. None where
        it does not apply (then the experts align the ids themselves)."""
        if not 0 < x.shape[0] <= fm.static_align_max_tokens():
            return None
        block_m = self._triton_block_m(x)
        if block_m is None:
            return None
        return fm.per_assignment_alignment(topk_ids, self.num_local_experts, block_m)

    @property
    def num_slots(self) -> int:
        """Ids per token: the routed top-k and the folded shared experts."""
        return self.top_k + self.shared_slots

    def _triton_block_m(self, x: torch.Tensor) -> int | None:
        """The grouped GEMMs' block_m for x's tokens where they run the Triton kernels that take a
        precomputed alignment (CUDA, no expert parallelism); else None."""
        if not x.is_cuda or not fm.HAS_TRITON or self.expert_parallel:
            return None
        return self.method.align_block_m(self, x.shape[0], self.num_slots)

    def _local_routing(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router ids -> this rank's expert slots. Assignments to other ranks' experts get the
        spare id `num_local_experts`, which both expert paths skip, and weight 0. Device ops
        only (no sync), so decode steps stay capturable."""
        local = topk_ids - self.expert_start  # [T, top_k]
        mine = (local >= 0) & (local < self.num_local_experts)
        return torch.where(mine, topk_weights, 0.0), torch.where(mine, local, self.num_local_experts)


class MoEBlock(nn.Module):
    """router -> routed experts (+ shared experts): the MLP of a sparse decoder layer.

    Submodule names follow HF (`gate`, `experts`, `shared_experts`), so checkpoint names map
    one to one.

    Shared experts folded in (`experts.shared_slots` S > 0, set when the model is built): the
    shared MLP of S * I intermediate units runs as S more experts of I units that every token
    takes with weight 1. A gated MLP is a sum over its intermediate units, so this is the same
    function; the shared checkpoint tensors load into expert slots E..E+S-1 (load_moe_weights),
    quantized like the routed experts, and the router appends their ids. One pair of grouped GEMMs
    then runs both parts, instead of three more GEMMs, the activation and an add per layer (the
    launches cost more than the math at decode). Rounding changes only in where the shared part's
    partial sums are added.

    `return_slot_partials` (set by a model whose next step after the MLP is the residual add and
    RMSNorm, models/decoder.py): on one rank without a separate shared-expert module, forward may
    return the routed experts' weighted outputs per slot, [tokens, slots, hidden], and the norm
    adds them up as it loads them (kernels/fused_norm.py). That is the reduction launch of every
    MoE layer saved (4.4 us of a 21B-A3B decode layer on an H100), with the same rounding.
    """

    def __init__(self, gate: TopKRouter, experts: FusedMoE, shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        if experts.shared_slots and shared_experts is not None:
            raise ValueError("shared experts are either folded into the experts or a module, not both")
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.num_folded_shared = experts.shared_slots
        self.return_slot_partials = False
        # Both parts end in a tensor-parallel sum: add the partial sums first, reduce once.
        down = getattr(shared_experts, "down_proj", None)
        self.reduce_once = experts.tp.size > 1 and isinstance(down, RowParallelLinear)
        if self.reduce_once:
            experts.reduce_results = False
            down.reduce_results = False  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]."""
        # [num_tokens, top_k (+ folded shared experts)] each
        static = 0 < x.shape[0] <= fm.static_align_max_tokens()
        block_m = None if static else self.experts.align_block_m(x)
        if block_m is not None:  # decode: the router's launch also aligns the ids for the experts' GEMMs
            topk_weights, topk_ids, alignment = self.gate.route_and_align(x, self.num_folded_shared, block_m)
        else:
            topk_weights, topk_ids = self.gate(x, self.num_folded_shared)
            # one token: a GEMM block per assignment, no alignment to compute
            alignment = self.experts.static_alignment(x, topk_ids) if static else None
        # FusedMoE sums anyway on more than one rank (the all-reduce needs the sum)
        partials_ok = self.return_slot_partials and self.shared_experts is None
        out = self.experts(x, topk_weights, topk_ids, sum_slots=not partials_ok, alignment=alignment)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.reduce_once:
            out = self.experts.tp.all_reduce(out)
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
        shared = _SHARED.match(name)
        folded_into = modules.get(f"{shared['prefix']}.experts") if shared is not None else None
        if isinstance(folded_into, FusedMoE) and folded_into.shared_slots:
            load_folded_shared(folded_into, shared["proj"].removesuffix("_proj"), tensor, hf_name)
            param_name = f"{shared['prefix']}.experts.{'w2' if shared['proj'] == 'down_proj' else 'w13'}"
            if folded_into.fully_loaded(param_name.rsplit(".", 1)[1]):
                loaded.add(param_name)
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


def load_folded_shared(experts: FusedMoE, proj: str, tensor: torch.Tensor, hf_name: str = "shared expert") -> None:
    """The shared MLP's gate/up [S * I, H] or down [H, S * I] tensor, as experts E..E+S-1 of I
    units each: chunk s of the intermediate units (rows of gate and up, columns of down)."""
    slots, dim = experts.shared_slots, (1 if proj == "down" else 0)
    if tensor.dim() != 2 or tensor.shape[dim] % slots:
        raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}; its intermediate "
                         f"dimension must hold {slots} shared experts")
    param = experts.w2 if proj == "down" else experts.w13
    for s, chunk in enumerate(tensor.chunk(slots, dim=dim)):
        try:
            experts.weight_loader(param, chunk, (experts.num_experts + s, proj))
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {hf_name!r}: {e}") from e


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
