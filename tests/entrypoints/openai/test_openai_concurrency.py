"""Many streams at once give the same, independent outputs as the offline API; a client that
disappears mid-stream leaves nothing behind in the engine."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import pytest

from ernieserve import LLM, SamplingParams
from server_utils import OFFLINE_KWARGS, REPO, metrics, wait_for

pytestmark = pytest.mark.slow

_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jovial ernie".split()
NUM_REQUESTS = 64
MAX_TOKENS = 12


def prompts() -> list[str]:
    # distinct prompts of varied length, so batches mix prefill and decode
    return [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(3 + i % 11)) + f" {i}"
            for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def offline(tiny_ernie):
    return LLM(model=str(tiny_ernie), **OFFLINE_KWARGS)


async def _stream_completion(client, model: str, prompt: str) -> tuple[str, list[int], str]:
    text, ids, finish = "", [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             stream=True, extra_body={"return_token_ids": True})
    async for chunk in stream:
        for c in chunk.choices:
            text += c.text
            ids += c.model_dump().get("completion_token_ids") or []
            finish = c.finish_reason or finish
    return text, ids, finish


async def _stream_chat(client, model: str, prompt: str) -> str:
    text = ""
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
    async for chunk in stream:
        text += "".join(c.delta.content or "" for c in chunk.choices)
    return text


def test_64_concurrent_streams_match_offline(server, model, offline):
    ps = prompts()
    half = NUM_REQUESTS // 2

    async def run():
        async with server.async_client(timeout=300) as client:
            completions = [_stream_completion(client, model, p) for p in ps[:half]]
            chats = [_stream_chat(client, model, p) for p in ps[half:]]
            return await asyncio.gather(*completions, *chats)

    results = asyncio.run(run())
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    expected_completions = offline.generate(ps[:half], params, use_tqdm=False)
    expected_chats = offline.chat([[{"role": "user", "content": p}] for p in ps[half:]], params, use_tqdm=False)
    for i, (got, want) in enumerate(zip(results[:half], expected_completions)):
        text, ids, finish = got
        assert ids == want.outputs[0].token_ids, f"completion {i}"
        assert text == want.outputs[0].text and finish == want.outputs[0].finish_reason
    for i, (got, want) in enumerate(zip(results[half:], expected_chats)):
        assert got == want.outputs[0].text, f"chat {half + i}"
    m = metrics(server.url("/metrics"))
    assert m["ernieserve:num_requests_running"] == 0 and m["ernieserve:num_requests_waiting"] == 0
    assert m["ernieserve:free_gpu_block_num"] == m["ernieserve:max_gpu_block_num"]


_CLIENT = textwrap.dedent("""
    import sys, openai
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
    stream = client.completions.create(model=sys.argv[2], prompt="the quick brown fox", max_tokens=480,
                                       temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        if i == 3:
            print("streaming", flush=True)
""")


def test_client_killed_mid_stream_frees_blocks(server, model):
    before = metrics(server.url("/metrics"))
    proc = subprocess.Popen([sys.executable, "-c", _CLIENT, server.url("/v1"), model], stdout=subprocess.PIPE,
                            cwd=REPO, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert metrics(server.url("/metrics"))["ernieserve:num_requests_running"] == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def idle() -> bool:
        m = metrics(server.url("/metrics"))
        return (m["ernieserve:num_requests_running"] == 0
                and m["ernieserve:free_gpu_block_num"] == m["ernieserve:max_gpu_block_num"])

    assert wait_for(idle, timeout=10), metrics(server.url("/metrics"))
    after = metrics(server.url("/metrics"))
    generated = after["ernieserve:generation_tokens_total"] - before["ernieserve:generation_tokens_total"]
    assert generated < 480, "the request ran to the end instead of being aborted"
    assert after["ernieserve:request_success_total"] == before["ernieserve:request_success_total"]
    # and the server still answers
    r = server.client().completions.create(model=model, prompt="a lazy dog", max_tokens=3, temperature=0.0)
    assert r.choices[0].text is not None
