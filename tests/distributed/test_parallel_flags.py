"""The parallelism flags: what each builds, and refusals that name the flag."""

from __future__ import annotations

import pytest
import torch

from ernieserve.config import ConfigError, EngineArgs, ParallelConfig
from ernieserve.distributed import placement
from ernieserve.entrypoints.openai.api_server import build_parser
from ernieserve.entrypoints.openai.cli_args import check_args


def _config(model, **kwargs):
    return EngineArgs(model=str(model), device="cpu", **kwargs).create_engine_config()


def test_layouts(tiny_ernie, checkpoint_factory):
    par = _config(tiny_ernie, tensor_parallel_size=2).parallel
    assert (par.tensor_parallel_size, par.nnodes, par.node_rank, par.master_port) == (2, 1, 0, None)
    # two nodes, one rank each; the port defaults to torch's
    par = _config(tiny_ernie, tensor_parallel_size=4, nnodes=2, node_rank=1, master_addr="10.0.0.1").parallel
    assert list(par.node_ranks()) == [2, 3] and par.master_port == placement.DEFAULT_MASTER_PORT
    assert [par.device_index(r) for r in par.node_ranks()] == [0, 1]
    # FastDeploy's --ips: node 0 first, this node named explicitly (both are this host here)
    par = _config(tiny_ernie, tensor_parallel_size=2, ips="127.0.0.1,127.0.0.1", node_rank=1).parallel
    assert (par.nnodes, par.master_addr, par.node_rank) == (2, "127.0.0.1", 1)
    par = _config(tiny_ernie, tensor_parallel_size=2, distributed_init_method="tcp://10.1.2.3:4567", nnodes=2).parallel
    assert (par.master_addr, par.master_port) == ("10.1.2.3", 4567)
    # replicas take consecutive blocks of devices
    rep1 = ParallelConfig(tensor_parallel_size=2, data_parallel_size=2, data_parallel_rank=1)
    assert [rep1.device_index(r) for r in range(2)] == [2, 3]
    moe = _config(checkpoint_factory("tiny-ernie-4.5-moe"), tensor_parallel_size=2, enable_expert_parallel=True)
    assert moe.parallel.enable_expert_parallel
    # KV heads fewer than ranks are replicated: the cache holds one per rank
    from ernieserve.worker.kv_cache import kv_heads_per_rank

    assert kv_heads_per_rank(_config(tiny_ernie, tensor_parallel_size=4)) == 1  # 2 KV heads, 4 ranks
    assert kv_heads_per_rank(_config(tiny_ernie, tensor_parallel_size=2)) == 1
    assert kv_heads_per_rank(_config(tiny_ernie)) == 2


@pytest.mark.parametrize("kwargs,flag", [
    (dict(tensor_parallel_size=0), "--tensor-parallel-size"),
    (dict(tensor_parallel_size=3), "--tensor-parallel-size 3 is not supported for this model: its 4 attention heads"),
    (dict(tensor_parallel_size=8), "--tensor-parallel-size 8 is not supported"),
    (dict(enable_expert_parallel=True), "--enable-expert-parallel is not supported for this model: it has no routed"),
    (dict(data_parallel_size=0), "--data-parallel-size"),
    (dict(tensor_parallel_size=2, nnodes=2), "--nnodes 2 needs --master-addr"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, master_addr="h"), "--node-rank 2 is out of range"),
    (dict(tensor_parallel_size=4, nnodes=3, master_addr="h"),
     "--tensor-parallel-size 4 is not supported over --nnodes 3"),
    (dict(tensor_parallel_size=2, nnodes=2, master_addr="h", data_parallel_size=2),
     "--data-parallel-size 2 is not supported with --nnodes 2"),
    (dict(ips="127.0.0.1,127.0.0.1", tensor_parallel_size=2), "pass --node-rank"),
    (dict(ips="a,b", nnodes=3), "--nnodes 3 contradicts --ips"),
    (dict(distributed_init_method="env://"), "--distributed-init-method env:// is not supported"),
    (dict(master_port=70000), "--master-port"),
])
def test_bad_parallel_flags_name_the_flag(tiny_ernie, kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")):
        _config(tiny_ernie, **kwargs)


def test_experts_must_divide_for_expert_parallel(checkpoint_factory):
    # 8 experts over 4 ranks is fine; the check itself, with a config whose experts do not divide
    moe = checkpoint_factory("tiny-ernie-4.5-moe")
    _config(moe, tensor_parallel_size=4, enable_expert_parallel=True)
    hf = _config(moe).model.hf_config
    hf.moe_num_experts = 6
    with pytest.raises(ConfigError, match="--enable-expert-parallel is not supported with --tensor-parallel-size 4: "
                                          "the model's 6 experts"):
        placement.check_model_divides(ParallelConfig(4, enable_expert_parallel=True), hf)


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placement.check_devices(ParallelConfig(2), torch.device("cuda"))
    with pytest.raises(ConfigError, match="--tensor-parallel-size 4 is not supported on this machine: it needs 4 GPUs "
                                          "on this node and 2 are visible"):
        placement.check_devices(ParallelConfig(4), torch.device("cuda"))
    with pytest.raises(ConfigError, match="--tensor-parallel-size 2 with --data-parallel-size 2 .* needs 4 GPUs"):
        placement.check_devices(ParallelConfig(2, data_parallel_size=2), torch.device("cuda"))
    # two nodes: each needs only its own ranks' GPUs
    placement.check_devices(ParallelConfig(4, nnodes=2, master_addr="h", master_port=1), torch.device("cuda"))


def test_server_flags(tiny_ernie):
    args = build_parser().parse_args(["--model", str(tiny_ernie), "-tp", "2", "--enable-expert-parallel",
                                      "-dp", "2", "--ips", "10.0.0.1,10.0.0.2", "--node-rank", "1",
                                      "--master-port", "1234"])
    check_args(args)  # no longer "planned": the engine decides
    engine = EngineArgs.from_cli_args(args)
    assert (engine.tensor_parallel_size, engine.enable_expert_parallel, engine.data_parallel_size) == (2, True, 2)
    assert (engine.ips, engine.node_rank, engine.master_port) == ("10.0.0.1,10.0.0.2", 1, 1234)


def test_offline_engine_refuses_data_parallelism(tiny_ernie):
    from ernieserve import LLM

    with pytest.raises(ConfigError, match="--data-parallel-size > 1"):
        LLM(model=str(tiny_ernie), device="cpu", data_parallel_size=2)
