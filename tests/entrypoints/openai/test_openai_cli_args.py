"""The seeds' command lines (FastDeploy's and vLLM's ERNIE guides) with the module path changed
and the model replaced by a tiny checkpoint: every flag parses, and each line either builds a
working config or is refused with a "not supported" message (yet, or on this device) that names the flag.

Refused flags are stripped one refusal at a time until the line is accepted, so a line with
several unsupported features shows every refusal, and what remains must work.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from ernieserve.config import ConfigError, EngineArgs
from ernieserve.entrypoints.cli import build_parser as build_cli_parser
from ernieserve.entrypoints.openai.api_server import build_parser as build_api_server_parser
from ernieserve.entrypoints.openai.cli_args import api_keys, check_args, load_chat_template

FD = "python -m fastdeploy.entrypoints.openai.api_server"
FD_300B = f"{FD} --model baidu/ERNIE-4.5-300B-A47B-Paddle --tensor-parallel-size 8 --quantization wint4 " \
          "--max-model-len 32768 --max-num-seqs 128"
FD_03B = f"{FD} --model baidu/ERNIE-4.5-0.3B-Paddle --tensor-parallel-size 1 --quantization wint4 " \
         "--max-model-len 32768 --kv-cache-ratio 0.75 --max-num-seqs 128"
VL_424B = "vllm serve baidu/ERNIE-4.5-VL-424B-A47B-PT --trust-remote-code"
MTP = """--speculative-config '{"method": "mtp", "num_speculative_tokens": 1, "model": "/mtp"}'"""
# --quantization wint4 runs anywhere; fp8 needs Hopper and is refused elsewhere
FP8_REFUSED = [] if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) else ["--quantization"]
# tensor parallelism runs on CPU (gloo); on GPUs it needs one per rank. -tp 8 and 16 are refused
# anywhere: the tiny checkpoint's 4 attention heads do not split over them
TP4_REFUSED = [] if not torch.cuda.is_available() or torch.cuda.device_count() >= 4 else ["--tensor-parallel-size"]

# seed command line -> the flags refused, in the order the refusals come
SEEDS: dict[str, list[str]] = {
    f"{FD} --model baidu/ERNIE-4.5-VL-424B-A47B-Paddle --port 8180 --metrics-port 8181 "
    "--engine-worker-queue-port 8182 --tensor-parallel-size 8 --max-model-len 131072 --max-num-seqs 16 "
    """--limit-mm-per-prompt '{"image": 100, "video": 100}' --reasoning-parser ernie-45-vl """
    "--gpu-memory-utilization 0.85 --max-num-batched-tokens 384 --quantization wint4":
        ["--tensor-parallel-size"],
    FD_300B: ["--tensor-parallel-size"],
    f"{FD_300B} --enable-prefix-caching --swap-space 50": ["--tensor-parallel-size"],
    f"{FD_300B} --enable-chunked-prefill": ["--tensor-parallel-size"],
    f"{FD_300B} {MTP}": ["--speculative-config", "--tensor-parallel-size"],
    f"{FD_300B} --use-cudagraph": ["--tensor-parallel-size"],
    f"{FD} --model baidu/ERNIE-4.5-300B-A47B-Paddle --port 8180 --metrics-port 8181 --engine-worker-queue-port 8182 "
    "--cache-queue-port 8183 --tensor-parallel-size 4 --quantization wint4 --splitwise-role prefill":
        ["--splitwise-role", *TP4_REFUSED],
    f"{FD} --model baidu/ERNIE-4.5-300B-A47B-Paddle --port 8184 --metrics-port 8185 --engine-worker-queue-port 8186 "
    "--cache-queue-port 8187 --tensor-parallel-size 4 --quantization wint4 --innode-prefill-ports 8182 "
    "--splitwise-role decode": ["--splitwise-role", "--innode-prefill-ports", *TP4_REFUSED],
    FD_03B: [],
    f"{FD_03B} --enable-prefix-caching --swap-space 50": [],
    f"{FD_03B} --enable-chunked-prefill": [],
    f"{FD_03B} --use-cudagraph": [],
    "vllm serve baidu/ERNIE-4.5-VL-28B-A3B-PT --trust-remote-code": [],
    f"{VL_424B} --tensor-parallel-size 8": ["--tensor-parallel-size"],
    f"{VL_424B} --tensor-parallel-size 8 --quantization fp8 --cpu-offload-gb 50":
        ["--cpu-offload-gb", *FP8_REFUSED, "--tensor-parallel-size"],
    f"{VL_424B} --tensor-parallel-size 16": ["--tensor-parallel-size"],
    "vllm serve baidu/ERNIE-4.5-VL-28B-A3B-PT --tensor-parallel-size 4 --gpu-memory-utilization 0.9 "
    "--disable-log-requests --no-enable-prefix-caching --trust-remote-code": TP4_REFUSED,
}

# flags that take no value: stripping them removes one word, others two
_SWITCHES = {"--enable-prefix-caching", "--use-cudagraph", "--trust-remote-code", "--enable-chunked-prefill"}


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_ernie, tmp_path_factory):
    """The tiny checkpoint with the real models' 128K context, so the seeds' --max-model-len fits."""
    out = tmp_path_factory.mktemp("tiny-128k")
    for f in tiny_ernie.iterdir():
        (out / f.name).symlink_to(f)
    config = json.loads((tiny_ernie / "config.json").read_text())
    config["max_position_embeddings"] = 131072
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(config))
    return out


def to_ernieserve(seed: str, model: str) -> tuple[str, list[str]]:
    """(which parser, argv) with the module path changed and the model replaced."""
    words = shlex.split(seed)
    if words[:2] == ["vllm", "serve"]:
        return "cli", ["serve", model, *words[3:]]
    assert words[:3] == ["python", "-m", "fastdeploy.entrypoints.openai.api_server"]
    rest = words[3:]
    i = rest.index("--model")
    rest[i + 1] = model
    return "api_server", rest


def parse(kind: str, argv: list[str]):
    parser = build_cli_parser() if kind == "cli" else build_api_server_parser()
    return parser.parse_args(argv)


def validate(kind: str, argv: list[str]):
    args = parse(kind, argv)
    check_args(args)
    return EngineArgs.from_cli_args(args).create_engine_config()


def strip(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    width = 1 if flag in _SWITCHES else 2
    while flag == "--innode-prefill-ports" and i + width < len(argv) and not argv[i + width].startswith("--"):
        width += 1
    return argv[:i] + argv[i + width:]


@pytest.mark.parametrize("seed", list(SEEDS), ids=range(len(SEEDS)))
def test_seed_command_starts_or_is_refused(seed, long_context_checkpoint):
    kind, argv = to_ernieserve(seed, str(long_context_checkpoint))
    parse(kind, argv)  # every flag of every seed parses
    refused = []
    for _ in range(10):
        try:
            config = validate(kind, argv)
            break
        except ConfigError as e:
            message = str(e)
            assert "not supported" in message, message
            named = [w for w in argv if w.startswith("--") and message.find(w + " ") >= 0]
            flags = sorted(set(named), key=message.index)
            assert flags, f"the refusal names no flag of the line: {message}"
            refused += flags
            for flag in flags:
                argv = strip(argv, flag)
    else:
        pytest.fail("still refused after stripping")
    assert refused == SEEDS[seed]
    assert config.model.model == str(long_context_checkpoint)


def test_refusal_lists_every_planned_flag_at_once(tiny_ernie):
    args = parse("api_server", ["--model", str(tiny_ernie), "--tool-call-parser", "ernie-x1",
                                "--enable-auto-tool-choice"])
    with pytest.raises(ConfigError) as info:
        check_args(args)
    assert str(info.value) == (
        "--tool-call-parser ernie-x1 is not supported yet (support for tool calling is planned); "
        "--enable-auto-tool-choice is not supported yet (support for tool calling is planned). Remove these flags "
        "to serve without the feature.")


def test_harmless_values_of_planned_flags_are_accepted(tiny_ernie):
    args = parse("api_server", ["--model", str(tiny_ernie), "--splitwise-role", "mixed", "--cpu-offload-gb", "0",
                                "--data-parallel-size", "1", "--workers", "1"])
    check_args(args)


def test_defaults_are_fastdeploys():
    args = parse("api_server", [])
    assert (args.host, args.port, args.max_concurrency) == ("0.0.0.0", 8000, 512)
    assert args.metrics_port is None and args.model is None  # /metrics on the API port; built-in model
    assert args.max_num_seqs == 128


def test_positional_model_and_conflict(tiny_ernie):
    args = parse("cli", ["serve", str(tiny_ernie)])
    check_args(args)
    assert args.model == str(tiny_ernie)
    args = parse("cli", ["serve", str(tiny_ernie), "--model", "/elsewhere"])
    with pytest.raises(ConfigError, match="given twice"):
        check_args(args)


def test_api_keys_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("FD_API_KEY", " a, b ,,c")
    assert api_keys(["x", "a"]) == ["x", "a", "b", "c"]
    monkeypatch.delenv("FD_API_KEY")
    assert api_keys(None) == []


def test_chat_template_file_or_inline(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(f)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{%")
    with pytest.raises(ConfigError, match="no such file"):
        load_chat_template("/no/such/template.jinja")
