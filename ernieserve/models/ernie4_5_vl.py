"""ERNIE 4.5 VL (28B-A3B, 424B-A47B), as HF transformers' `Ernie4_5_VLMoeForConditionalGeneration`.

Text tower: ERNIE's decoder (interleaved rotary, `use_bias` on attention and MLPs) with 3-D
rotary positions (`layers/mrope.py`) and, in its sparse layers (``mlp_layer_types``), a
modality-isolated MoE: text tokens go to the text router and experts, vision tokens (image/video
placeholders and their start/end tokens, HF's ``moe_mm_token_type_ids``) to the vision router and
experts (narrower: ``moe_intermediate_size[1]``); the shared experts see every token. Generated
tokens are text: HF drops ``moe_mm_token_type_ids`` after the first generation step, and we skip
the vision experts in decode-only steps, which also keeps those steps free of host syncs and
data-dependent shapes (CUDA graphs). Vision tower and resampler: `ernie4_5_vl_vision.py`.

The engine-facing interface (see the class docstring): `get_mrope_positions`,
`embed_multimodal`, `embed_input_ids`, `forward(input_ids, positions [3, T], meta, inputs_embeds)`.

Checkpoints load in both layouts: the original hub one (what Baidu ships and HF's save writes:
``model.vision_model.*``, ``mlp.gate.weight`` [H, E] and ``mlp.gate.weight_1`` for the vision
router, ``moe_statics.e_score_correction_bias`` [2, E], experts 0..E-1 text and E..2E-1 vision,
``spatial_linear.0/2/3``) and HF's in-memory one (``language_model``, ``vision_tower``,
``text_moe`` / ``vision_moe`` with stacked experts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ernieserve.attention.base import AttentionBackend, AttentionMetadata
from ernieserve.distributed.parallel_state import SINGLE, TPGroup
from ernieserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ernieserve.layers.moe import FusedMoE, MoEBlock, RouterConfig, TopKRouter, load_moe_weights
from ernieserve.layers.mrope import ErnieMRotaryEmbedding
from ernieserve.layers.norm import RMSNorm
from ernieserve.models.decoder import DecoderForCausalLM, DecoderLayer, DecoderMLP, DecoderSpec, rope_settings
from ernieserve.models.ernie4_5_vl_vision import Grid, Resampler, VisionTransformer
from ernieserve.multimodal.inputs import MultiModalItem, VisionTokenIds


def _pair(value: Any) -> tuple[int, int]:
    """(text, vision) from a per-modality list or one value for both."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


# ---- prompt layout: placeholder tokens and 3-D positions -------------------------------------

@dataclass(frozen=True, slots=True)
class VisionTokenLayout(VisionTokenIds):
    """The placeholder and bracket ids, plus how many patches merge into one placeholder."""

    spatial_merge: int
    temporal_merge: int

    @classmethod
    def from_config(cls, cfg: Any) -> "VisionTokenLayout":
        ids = VisionTokenIds.from_hf_config(cfg)
        v = cfg.vision_config
        return cls(*(getattr(ids, f.name) for f in fields(VisionTokenIds)), v.spatial_merge_size, v.temporal_merge_size)

    def moe_vision_ids(self) -> list[int]:
        """Token ids the MoE routes to the vision experts (HF's `create_moe_mm_token_type_ids`)."""
        return [self.image, self.image_start, self.image_end, self.video, self.video_start, self.video_end]

    def placeholder(self, modality: str) -> int:
        return self.image if modality == "image" else self.video

    def temporal_merge_of(self, modality: str) -> int:
        return 1 if modality == "image" else self.temporal_merge

    def check_item(self, index: int, item: MultiModalItem, patch_features: int | None = None) -> Grid:
        """The item's (t, h, w) grid after checking it against its placeholder run length."""
        where = f"items[{index}]"
        if item.modality not in ("image", "video"):
            raise ValueError(f"{where}.modality must be 'image' or 'video', got {item.modality!r}")
        if len(item.grid_thw) != 3 or min(item.grid_thw) <= 0:
            raise ValueError(f"{where}.grid_thw must be three positive ints [t, h, w], got {item.grid_thw}")
        t, h, w = (int(v) for v in item.grid_thw)
        m = self.spatial_merge
        if h % m or w % m:
            raise ValueError(f"{where}.grid_thw {item.grid_thw}: h and w must be multiples of the spatial merge "
                             f"size {m}")
        if item.modality == "image" and t != 1:
            raise ValueError(f"{where}.grid_thw {item.grid_thw}: an image has t == 1")
        if item.modality == "video" and t % self.temporal_merge:
            raise ValueError(f"{where}.grid_thw {item.grid_thw}: a video's t must be a multiple of the temporal "
                             f"merge size {self.temporal_merge}")
        expected = t * h * w // (m * m * self.temporal_merge_of(item.modality))
        if item.length != expected:
            raise ValueError(f"{where}.length is {item.length}, but grid_thw {item.grid_thw} gives {expected} "
                             "placeholder tokens")
        if patch_features is not None and list(item.shape) != [t * h * w, patch_features]:
            raise ValueError(f"{where}: pixel rows have shape {item.shape}, expected [{t * h * w}, {patch_features}]")
        return t, h, w


def mrope_positions(prompt_token_ids: list[int], items: list[MultiModalItem],
                    layout: VisionTokenLayout) -> tuple[np.ndarray, int]:
    """[3, P] int64 (t, h, w) positions of a prompt and the delta of its generated tokens.

    HF's `get_rope_index` for one sequence: text tokens (start/end tokens included) count up by
    one in all three rows; an item's placeholder run starting at position s gets
    ``(s + t', s + h', s + w')`` over its merged grid (t' per merged frame pair for videos), and
    the next token starts at ``s + max(h, w) / merge``. Generated token at index p has position
    ``p + delta`` in every row.
    """
    ids = np.asarray(prompt_token_ids, dtype=np.int64)
    num = ids.shape[0]
    order = sorted(range(len(items)), key=lambda i: items[i].offset)
    covered = np.zeros(num, dtype=bool)
    prev: MultiModalItem | None = None
    for i in order:
        item = items[i]
        layout.check_item(i, item)
        if item.offset < 0 or item.end > num:
            raise ValueError(f"items[{i}] spans [{item.offset}, {item.end}), outside the prompt of {num} tokens")
        if prev is not None and item.offset < prev.end:
            raise ValueError(f"items[{i}] overlaps another item's placeholder run")
        if prev is not None and item.offset == prev.end and item.modality == prev.modality:
            # HF groups runs by token type: two touching runs would be read as one item
            raise ValueError(f"items[{i}] touches the previous {item.modality}'s run; separate them with their "
                             "start/end tokens")
        if not (ids[item.offset:item.end] == layout.placeholder(item.modality)).all():
            raise ValueError(f"items[{i}]: prompt_token_ids[{item.offset}:{item.end}] are not all "
                             f"{item.modality} placeholder tokens")
        covered[item.offset:item.end] = True
        prev = item
    stray = ((ids == layout.image) | (ids == layout.video)) & ~covered
    if stray.any():
        raise ValueError(f"prompt_token_ids[{int(np.argmax(stray))}] is an image/video placeholder outside every "
                         "item's run")

    positions = np.empty((3, num), dtype=np.int64)
    cursor, start = 0, 0  # next position; next prompt index to place
    m = layout.spatial_merge
    for i in order:
        item = items[i]
        gap = item.offset - start
        positions[:, start:item.offset] = cursor + np.arange(gap)
        cursor += gap
        t, h, w = (int(v) for v in item.grid_thw)
        tt, hh, ww = np.meshgrid(np.arange(t // layout.temporal_merge_of(item.modality)), np.arange(h // m),
                                 np.arange(w // m), indexing="ij")
        positions[:, item.offset:item.end] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cursor
        cursor += max(h, w) // m
        start = item.end
    positions[:, start:] = cursor + np.arange(num - start)
    delta = int(positions.max()) + 1 - num if num else 0
    return positions, delta


# ---- text tower ------------------------------------------------------------------------------

@dataclass(slots=True)
class ModalitySplit:
    """Rows of this step's tokens by MoE modality (device index tensors, sizes known on the host)."""

    text_rows: torch.Tensor  # [num_text] int64
    vision_rows: torch.Tensor  # [num_vision] int64
    num_text: int
    num_vision: int


class VLMoEBlock(nn.Module):
    """Text experts for text rows, vision experts for vision rows, shared experts for all.

    Submodule names follow HF's in-memory layout (`text_moe`, `vision_moe`, `shared_experts`).
    """

    def __init__(self, cfg: Any, use_bias: bool, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        num_experts, _ = _pair(cfg.moe_num_experts)
        top_k, _ = _pair(cfg.moe_k)
        text_inter, vision_inter = _pair(cfg.moe_intermediate_size)
        router = RouterConfig(num_experts=num_experts, top_k=top_k, renormalize=True,
                              norm_min=float(getattr(cfg, "moe_norm_min", 1e-12)), logits_fp32=True,
                              has_score_bias=True)
        self.text_moe = MoEBlock(TopKRouter(cfg.hidden_size, router, dtype),
                                 FusedMoE(num_experts, top_k, cfg.hidden_size, text_inter, dtype, tp))
        self.vision_moe = MoEBlock(TopKRouter(cfg.hidden_size, router, dtype),
                                   FusedMoE(num_experts, top_k, cfg.hidden_size, vision_inter, dtype, tp))
        num_shared = int(getattr(cfg, "moe_num_shared_experts", 0) or 0)
        self.shared_experts = (DecoderMLP(cfg.hidden_size, text_inter * num_shared, use_bias, dtype, tp)
                               if num_shared else None)

    def forward(self, x: torch.Tensor, split: ModalitySplit | None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; split None: every row is text."""
        if split is None:
            out = self.text_moe(x)
        else:
            out = torch.empty_like(x)
            if split.num_text:
                out.index_copy_(0, split.text_rows, self.text_moe(x.index_select(0, split.text_rows)))
            out.index_copy_(0, split.vision_rows, self.vision_moe(x.index_select(0, split.vision_rows)))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class VLDecoderLayer(DecoderLayer):
    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, split: ModalitySplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.attend(positions, x, residual, meta)
        x = self.mlp(x, split) if isinstance(self.mlp, VLMoEBlock) else self.mlp(x)
        return x, residual


class VLTextModel(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, backend: AttentionBackend, dtype: torch.dtype,
                 tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        params = getattr(cfg, "rope_parameters", None) or {}
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"text_config.rope_parameters.rope_type must be 'default' for ERNIE 4.5 VL, "
                             f"got {params.get('rope_type')!r}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        theta, _ = rope_settings(cfg)
        rotary = ErnieMRotaryEmbedding(head_dim, cfg.max_position_embeddings, theta,
                                       list(params.get("mrope_section", [22, 22, 20])))
        n = cfg.num_hidden_layers
        kinds = list(getattr(cfg, "mlp_layer_types", None) or ["dense"] + ["sparse"] * (n - 1))
        if len(kinds) != n or not set(kinds) <= {"dense", "sparse"}:
            raise ValueError(f"text_config.mlp_layer_types must list 'dense'/'sparse' for each of the {n} layers")
        self.layers = nn.ModuleList(
            VLDecoderLayer(cfg, spec, backend, dtype, tp, rotary,
                           VLMoEBlock(cfg, spec.mlp_bias, dtype, tp) if kind == "sparse" else None)
            for kind in kinds)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                split: ModalitySplit | None) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta, split)
        x, _ = self.norm(x, residual)
        return x


# ---- the model -------------------------------------------------------------------------------

# original hub layout -> ours; pure renames (applied twice to some names, so idempotent)
_PREFIXES = [("model.language_model.", "model."), ("model.vision_model.", "vision_model."),
             ("model.vision_tower.", "vision_model."), ("model.resampler_model.", "resampler_model.")]
_RESAMPLER_MLP = re.compile(r"\.(spatial_linear|temporal_linear)\.(0|2|3)\.")
_RESAMPLER_NAMES = {"0": "fc1", "2": "fc2", "3": "ln"}
_MIXED_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


class Ernie4_5_VLMoeForConditionalGeneration(DecoderForCausalLM):
    """The engine's interface:

    * ``get_mrope_positions(prompt_token_ids, items) -> (positions [3, P] int64 ndarray, delta)``
    * ``embed_multimodal(items) -> [item.length, hidden]`` tensors, one per item
    * ``embed_input_ids(input_ids [T]) -> [T, hidden]``
    * ``forward(input_ids [T], positions [3, T], meta, inputs_embeds [T, hidden] | None) -> [T, hidden]``
    """

    supports_multimodal = True
    uses_mrope = True
    takes_full_config = True  # the loader passes the whole config (text + vision), not text_config()

    def __init__(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup | None = None) -> None:
        text = cfg.text_config
        use_bias = bool(getattr(text, "use_bias", False))
        self.spec = DecoderSpec(rope_interleaved=True, qkv_bias=use_bias, o_bias=use_bias, mlp_bias=use_bias,
                                qk_norm=False)
        tp = tp or SINGLE
        super().__init__(text, backend, dtype, tp)
        self.config = cfg
        # HF ties by the top-level flag
        tie = bool(getattr(cfg, "tie_word_embeddings", self.tie_word_embeddings))
        if tie != self.tie_word_embeddings:
            self.tie_word_embeddings = tie
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, dtype, tp)
            if tie:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.layout = VisionTokenLayout.from_config(cfg)
        self.num_experts = _pair(text.moe_num_experts)[0]
        self.register_buffer("moe_vision_ids", torch.tensor(self.layout.moe_vision_ids(), dtype=torch.int64),
                             persistent=False)
        self.vision_model = VisionTransformer(cfg.vision_config, dtype)
        self.resampler_model = Resampler(cfg, dtype)

    def build_model(self, cfg: Any, backend: AttentionBackend, dtype: torch.dtype, tp: TPGroup) -> nn.Module:
        return VLTextModel(cfg, self.spec, backend, dtype, tp)

    # ---- multimodal inputs ------------------------------------------------------------------
    def get_mrope_positions(self, prompt_token_ids: list[int], items: list[MultiModalItem]) -> tuple[np.ndarray, int]:
        return mrope_positions(prompt_token_ids, items, self.layout)

    @torch.no_grad()
    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """One vision-tower + resampler pass over all items; [item.length, hidden] per item."""
        if not items:
            return []
        grids = [self.layout.check_item(i, it, self.vision_model.patch_features) for i, it in enumerate(items)]
        device = self.model.embed_tokens.weight.device
        pixels = torch.cat([it.pixels() for it in items]).to(device)  # [num_patches, C * patch^2]
        rows = self.resampler_model(self.vision_model(pixels, grids), grids)  # [sum(lengths), hidden]
        return list(rows.to(self.model.embed_tokens.weight.dtype).split([it.length for it in items]))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (also with inputs_embeds: they pick each row's experts); positions [3, T]
        (a [T] vector is taken as text positions) -> hidden [T, hidden]."""
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(3, -1)
        # Decode-only steps hold generated tokens only, which HF routes as text: no vision rows,
        # and no host sync or data-dependent shape (CUDA graphs).
        split = None if meta.is_decode_only else self._modality_split(input_ids)
        return self.model(x, positions, meta, split)

    def _modality_split(self, input_ids: torch.Tensor) -> ModalitySplit | None:
        is_vision = torch.isin(input_ids, self.moe_vision_ids)  # [T]
        num_vision = int(is_vision.sum())  # the one host sync of a prefill/mixed step
        if num_vision == 0:
            return None
        order = torch.argsort(is_vision.to(torch.uint8), stable=True)  # text rows first, in order
        num_text = input_ids.shape[0] - num_vision
        return ModalitySplit(order[:num_text], order[num_text:], num_text, num_vision)

    # ---- loading ------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        if "mtp" in name:  # multi-token-prediction heads; HF ignores them too
            return None
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        name = _RESAMPLER_MLP.sub(lambda m: f".{m[1]}.{_RESAMPLER_NAMES[m[2]]}.", name)
        name = name.replace(".gate.moe_statics.", ".gate.")
        expert = _MIXED_EXPERT.search(name)
        if expert is not None:  # original layout: experts 0..E-1 text, E..2E-1 vision
            e = int(expert[1])
            part, e = ("text_moe", e) if e < self.num_experts else ("vision_moe", e - self.num_experts)
            name = f"{name[:expert.start()]}.mlp.{part}.experts.{e}.{name[expert.end():]}"
        return super().map_weight_name(name)

    def _convert_original(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Original-layout routers and selection biases -> HF's in-memory names and shapes."""
        for name, tensor in weights:
            if name.endswith(".mlp.gate.weight") or name.endswith(".mlp.gate.weight_1"):
                # [hidden, num_experts] on disk; weight_1 is the vision router
                part = "vision_moe" if name.endswith("_1") else "text_moe"
                yield f"{name.rsplit('.mlp.gate.', 1)[0]}.mlp.{part}.gate.weight", tensor.t()
            elif name.endswith(".mlp.moe_statics.e_score_correction_bias"):
                if tensor.dim() != 2 or tensor.shape[0] != 2:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                     f"[2, {self.num_experts}] (text row, vision row)")
                prefix = name.rsplit(".mlp.moe_statics.", 1)[0]
                yield f"{prefix}.mlp.text_moe.gate.e_score_correction_bias", tensor[0]
                yield f"{prefix}.mlp.vision_moe.gate.e_score_correction_bias", tensor[1]
            else:
                yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        loaded |= super().load_weights(load_moe_weights(self, self._convert_original(weights), loaded))
        return loaded


class Ernie4_5_VL_MoeForConditionalGeneration(Ernie4_5_VLMoeForConditionalGeneration):
    """The older spelling of the architecture name (HF keeps it as an alias)."""
