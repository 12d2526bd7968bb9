"""Structure of the shared decoder: things parity tests cannot see."""

from __future__ import annotations

from ernieserve.attention.torch_ref import TorchRefBackend
from ernieserve.config import EngineArgs
from ernieserve.models.loader import build_model


def test_one_rotary_table_per_model(tiny_ernie):
    """The cos/sin table spans max_position_embeddings (67 MB for ERNIE's 131k positions): one per
    model, not one per layer."""
    cfg = EngineArgs(model=str(tiny_ernie), device="cpu", num_gpu_blocks_override=8).create_engine_config()
    model = build_model(cfg.model, TorchRefBackend(), cfg.device.device)
    tables = {id(layer.self_attn.rotary.cos) for layer in model.model.layers}
    assert len(model.model.layers) > 1 and len(tables) == 1
    buffers = {id(b): b for b in model.buffers()}
    table_bytes = sum(b.numel() * b.element_size() for b in buffers.values())
    rot = model.model.layers[0].self_attn.rotary
    assert table_bytes <= 2 * (rot.cos.numel() * rot.cos.element_size()) + 1024
