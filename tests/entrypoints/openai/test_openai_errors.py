"""Every failure answers with its exact status and OpenAI error body, and the server goes on.

The server here is started the way vLLM users start one (`ernieserve serve MODEL`) with the
seeds' flags that we support, plus API keys, a concurrency limit and a separate metrics port.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from server_utils import CLI_SERVE, RemoteServer, free_port, metrics, wait_for

pytestmark = pytest.mark.slow

KEYS = ("key-one", "key-two", "env-key-a", "env-key-b")
NAME = "ernie-test"


@pytest.fixture(scope="module")
def server(tiny_ernie, tmp_path_factory):
    queue = free_port()
    srv = RemoteServer([
        *CLI_SERVE, str(tiny_ernie), "--trust-remote-code", "--disable-log-requests", "--no-enable-prefix-caching",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9", "--kv-cache-ratio", "0.75",
        "--enable-chunked-prefill", "--max-num-batched-tokens", "384", "--max-num-seqs", "8",
        "--metrics-port", str(metrics_port := free_port()), "--engine-worker-queue-port", str(queue),
        "--served-model-name", NAME, "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-concurrency", "2",
        "--device", "cpu", "--max-model-len", "128", "--block-size", "16", "--num-gpu-blocks-override", "64",
    ], tmp_path_factory.mktemp("errors") / "server.log", api_key=KEYS[0], env={"FD_API_KEY": f"{KEYS[2]},{KEYS[3]}"})
    srv.metrics_port = metrics_port
    yield srv.wait_ready()
    assert srv.stop() == 0, srv.log()[-3000:]


def post(server, path: str, body, key: str | None = KEYS[0], **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url(path), content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(server.url(path), json=body, headers=headers, timeout=60, **kwargs)


def error(message: str, param: str | None = None, code: str | None = None,
          type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def assert_still_serves(server) -> None:
    r = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, temperature=0.0)
    assert r.choices[0].finish_reason in ("length", "stop")


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("path,body,status,expected", [
    (COMPLETIONS, {"model": NAME, "prompt": "hi", "top_p": 7},
     400, error("top_p must be in (0, 1], got 7.0.", "top_p")),
    (CHAT, {"model": NAME, "messages": MSG, "temperature": -1},
     400, error("temperature must be non-negative, got -1.0.", "temperature")),
    (CHAT, {"model": NAME, "messages": MSG, "n": 0}, 400, error("n must be at least 1, got 0.", "n")),
    (COMPLETIONS, {"model": NAME, "prompt": "hi", "max_tokens": "many"},
     400, error("max_tokens: Input should be a valid integer, unable to parse string as an integer", "max_tokens")),
    (COMPLETIONS, {"model": NAME, "prompt": "hi", "frobnicate": 1},
     400, error("Unrecognized request argument supplied: frobnicate", "frobnicate")),
    (CHAT, {"model": NAME}, 400, error("messages: Field required", "messages")),
    (CHAT, {"model": NAME, "messages": []},
     400, error("messages: List should have at least 1 item after validation, not 0", "messages")),
    (COMPLETIONS, b'{"model": "x", "prompt": ', 400, None),  # invalid JSON: message from the parser
    (CHAT, {"model": NAME, "messages": MSG, "top_logprobs": 2},
     400, error("top_logprobs requires logprobs to be true.", "top_logprobs")),
    (CHAT, {"model": NAME, "messages": MSG, "logprobs": True, "top_logprobs": 30},
     400, error("top_logprobs must be in [0, 20], got 30.", "top_logprobs")),
    (CHAT, {"model": NAME, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, error("tools (function calling) are not supported yet.", "tools")),
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, error(f"messages[0]: the model `{NAME}` takes no images (it has no vision encoder); send text only.",
                "messages.0.content")),
    (COMPLETIONS, {"model": NAME, "prompt": "hi", "logit_bias": {"5": 10}},
     400, error("logit_bias is not supported yet.", "logit_bias")),
    (COMPLETIONS, {"model": NAME, "prompt": "hi", "max_tokens": 127},
     400, error("This model's maximum context length is 128 tokens. However, you requested 129 tokens "
                "(2 in the prompt, 127 in the completion). Reduce the length of the prompt or max_tokens.",
                "max_tokens", "context_length_exceeded")),
    (COMPLETIONS, {"model": NAME, "prompt": [5] * 200, "max_tokens": 1},
     400, error("This model's maximum context length is 128 tokens, but the prompt has 200 tokens, which "
                "leaves no room for the completion. Reduce the length of the prompt.", "prompt",
                "context_length_exceeded")),
    (COMPLETIONS, {"model": NAME, "prompt": [5, 10 ** 9]},
     400, error("Token id out of range: prompt_token_ids must be in [0, 4096).")),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "hi"},
     404, error(f"The model `gpt-4` does not exist. This server serves: {NAME}.", "model", "model_not_found")),
    (CHAT, {"model": "nope", "messages": MSG},
     404, error(f"The model `nope` does not exist. This server serves: {NAME}.", "model", "model_not_found")),
])
def test_bad_request_then_still_serves(server, path, body, status, expected):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    got = r.json()
    if expected is None:
        assert got["error"]["type"] == "invalid_request_error"
        assert got["error"]["message"].startswith("The request body is not valid JSON")
    else:
        assert got == expected
    assert_still_serves(server)


def test_prompt_plus_max_tokens_over_limit_with_openai_client(server):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=NAME, messages=MSG, max_tokens=500)
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 128 tokens" in info.value.message
    assert_still_serves(server)


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_missing_or_wrong_api_key_is_401(server, key):
    r = post(server, CHAT, {"model": NAME, "messages": MSG, "max_tokens": 2}, key=key)
    assert r.status_code == 401
    assert r.json() == error("Invalid or missing API key. Send `Authorization: Bearer <key>`.", None,
                             "invalid_api_key")
    r = httpx.get(server.url("/v1/models"), headers={"Authorization": f"Bearer {key}"} if key else {})
    assert r.status_code == 401
    assert_still_serves(server)


@pytest.mark.parametrize("key", KEYS)
def test_every_key_from_flags_and_env_works(server, key):
    r = post(server, CHAT, {"model": NAME, "messages": MSG, "max_tokens": 2}, key=key)
    assert r.status_code == 200, r.text


def test_open_endpoints_need_no_key(server):
    for path in ("/health", "/ping", "/version"):
        assert httpx.get(server.url(path)).status_code == 200, path


def test_metrics_on_separate_port(server):
    assert httpx.get(server.url("/metrics")).status_code == 404
    m = metrics(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert m["ernieserve:max_gpu_block_num"] == 64


def test_over_max_concurrency_is_429(server):
    started = [threading.Event(), threading.Event()]
    done = []

    def stream(i: int) -> None:
        with httpx.stream("POST", server.url(COMPLETIONS), timeout=120,
                          headers={"Authorization": f"Bearer {KEYS[0]}"},
                          json={"model": NAME, "prompt": "hi", "max_tokens": 50, "stream": True,
                                "ignore_eos": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                started[i].set()
                if line == "data: [DONE]":
                    done.append(i)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        assert all(e.wait(60) for e in started)
        r = post(server, CHAT, {"model": NAME, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 429
        assert r.json() == error("Too many requests: this server serves at most 2 at once (--max-concurrency). "
                                 "Retry later.", None, "rate_limit_exceeded", "rate_limit_error")
    finally:
        for t in threads:
            t.join(120)
    assert sorted(done) == [0, 1]
    assert wait_for(lambda: post(server, CHAT, {"model": NAME, "messages": MSG, "max_tokens": 2}).status_code == 200)
    assert_still_serves(server)


def test_unknown_route_is_404_json(server):
    r = httpx.get(server.url("/v1/nothing-here"), headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert r.status_code == 404
    assert r.json() == error("Not Found", type="not_found_error")
