"""Model runner decisions that need no forward pass."""

from __future__ import annotations

import pytest
import torch

from ernieserve.config import EngineArgs


@pytest.mark.parametrize("flag, preset, wanted", [
    (None, "tiny-ernie-4.5", True), (None, "tiny-ernie-4.5-moe", True),
    ('{"cudagraph_mixed_steps": false}', "tiny-ernie-4.5-moe", False),
    ('{"cudagraph_mixed_steps": false}', "tiny-ernie-4.5", False)])
def test_mixed_step_graphs_default_to_text_models(checkpoint_factory, flag, preset, wanted):
    """On by default for dense and MoE text models (both GPU-verified); false turns them off."""
    from types import SimpleNamespace

    from ernieserve.worker.model_runner import ModelRunner

    args = EngineArgs(model=str(checkpoint_factory(preset)), graph_optimization_config=flag)
    model = args.create_engine_config().model  # on this CPU machine; the device part as on a GPU:
    device = args._device_config(torch.device("cuda"))
    assert model.is_moe == ("moe" in preset)
    runner = SimpleNamespace(config=SimpleNamespace(model=model, device=device), supports_multimodal=False,
                             backend=SimpleNamespace(supports_cuda_graph=lambda: True))
    assert ModelRunner._mixed_graphs_wanted(runner) == wanted


@pytest.mark.parametrize("quantization", [None, "wint8"])
def test_decode_reads_only_the_experts_a_token_picks(checkpoint_factory, quantization):
    """tiny-ernie-4.5-moe: 8 routed experts, top-2, 2 shared folded in as slots 8 and 9: a decode
    step reads every weight once but the experts, of which it reads 4 of the 10 stacked."""
    from ernieserve import LLM
    from ernieserve.layers.moe.layer import FusedMoE

    llm = LLM(model=str(checkpoint_factory("tiny-ernie-4.5-moe")), quantization=quantization)
    model = llm.llm_engine.core.runner.model
    expected, layers = llm.model_param_bytes(), 0
    for m in model.modules():
        if isinstance(m, FusedMoE):
            assert m.shared_slots == 2 and m.num_local_experts == 10  # the shared experts are folded in
            nbytes = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            expected -= nbytes - nbytes * (2 + 2) // (8 + 2)
            layers += 1
    assert layers and llm.decode_weight_bytes() == expected < llm.model_param_bytes()
