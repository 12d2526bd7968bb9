"""Mixture-of-experts layers: the router, the stacked experts (`FusedMoE`) and the fused kernels."""

from ernieserve.layers.moe.layer import FusedMoE, MoEBlock, load_moe_weights
from ernieserve.layers.moe.router import RouterConfig, TopKRouter, select_experts

__all__ = ["FusedMoE", "MoEBlock", "RouterConfig", "TopKRouter", "load_moe_weights", "select_experts"]
