"""Bad input gets a clear error, and the engine keeps serving everything else."""

from __future__ import annotations

import json
import shutil

import pytest

from ernieserve import LLM, SamplingParams
from ernieserve.config import ConfigError, EngineArgs
from ernieserve.models.loader import CheckpointError
from ernieserve.models.registry import UnsupportedArchitecture


@pytest.fixture(scope="module")
def llm(tiny_ernie):
    return LLM(model=str(tiny_ernie), device="cpu", max_model_len=64, block_size=16, num_gpu_blocks_override=32)


GOOD = {"prompt_token_ids": [5, 6, 7]}


def still_serves(llm):
    out = llm.generate([GOOD], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("prompt,params,message", [
    ({"prompt_token_ids": list(range(5, 70))}, SamplingParams(max_tokens=1), "maximum context length is 64"),
    ({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10), "you requested 70 tokens"),
    ("", SamplingParams(max_tokens=4), "prompt is empty"),
    ({"prompt_token_ids": []}, SamplingParams(max_tokens=4), "prompt is empty"),
    ({"prompt_token_ids": [5, 10**9]}, SamplingParams(max_tokens=4), "out of range"),
    ({"prompt_token_ids": ["a"]}, SamplingParams(max_tokens=4), "list of integers"),
])
def test_bad_prompts_rejected_and_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([GOOD, prompt], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests(), "a rejected batch must leave nothing queued"
    still_serves(llm)


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2.0), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(logprobs=50), "logprobs"), (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_values_name_the_parameter(llm, kwargs, param):
    with pytest.raises(ValueError, match=rf"^{param} "):
        SamplingParams(**kwargs)
    still_serves(llm)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_ernie, tmp_path):
    path = copy_checkpoint(tiny_ernie, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MadeUpForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="MadeUpForCausalLM.*supported: .*Ernie4_5ForCausalLM"):
        LLM(model=str(path), device="cpu", num_gpu_blocks_override=8)


def test_missing_shard_names_the_file(tiny_ernie, tmp_path):
    path = copy_checkpoint(tiny_ernie, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        LLM(model=str(path), device="cpu", num_gpu_blocks_override=8)


def test_corrupt_shard_names_the_file(tiny_ernie, tmp_path):
    path = copy_checkpoint(tiny_ernie, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=shard.name):
        LLM(model=str(path), device="cpu", num_gpu_blocks_override=8)


def test_missing_or_corrupt_config(tiny_ernie, tmp_path):
    path = copy_checkpoint(tiny_ernie, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        EngineArgs(model=str(path), device="cpu").create_engine_config()
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: missing"):
        EngineArgs(model=str(path), device="cpu").create_engine_config()


def test_missing_tokenizer_names_the_folder(tiny_ernie, tmp_path):
    path = copy_checkpoint(tiny_ernie, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        LLM(model=str(path), device="cpu", num_gpu_blocks_override=8)


def test_missing_model_folder_and_bad_flags():
    with pytest.raises(ConfigError, match="--model /nope: no such local folder"):
        EngineArgs(model="/nope").create_engine_config()


@pytest.mark.parametrize("kwargs,flag", [
    (dict(max_model_len=10**9), "--max-model-len"), (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"), (dict(tensor_parallel_size=3), "--tensor-parallel-size"),
    (dict(quantization="wint2"), "--quantization"), (dict(block_size=0), "--block-size"),
])
def test_bad_engine_flags_name_the_flag(tiny_ernie, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        EngineArgs(model=str(tiny_ernie), device="cpu", **kwargs).create_engine_config()
