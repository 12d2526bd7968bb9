"""AsyncLLM, the API server's client of the engine core process, used directly."""

from __future__ import annotations

import asyncio

import pytest

from ernieserve.config import EngineArgs
from ernieserve.engine.async_client import AsyncLLM, EngineDeadError, RequestRejected
from ernieserve.frontend.output_processor import OutputKind
from ernieserve.metrics.prometheus import ServerMetrics
from ernieserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # starts an engine core process


async def _collect(llm: AsyncLLM, rid: str, prompt, params: SamplingParams) -> list:
    return [out async for out in llm.generate(prompt, params, rid)]


def test_async_llm_end_to_end(tiny_ernie):
    # 4 blocks of 16 tokens: a 100-token prompt fits max_model_len (128) but not the KV cache, so
    # only the engine's own guard can refuse it
    config = EngineArgs(model=str(tiny_ernie), device="cpu", max_model_len=128, block_size=16,
                        num_gpu_blocks_override=4).create_engine_config()

    async def run() -> None:
        metrics = ServerMetrics()
        llm = AsyncLLM(config, metrics=metrics, log_requests=False)
        ready = await llm.start()
        try:
            assert ready.num_gpu_blocks == 4 and llm.is_alive
            await _checks(llm, metrics)
        finally:
            await llm.shutdown()
        assert not llm.is_alive
        with pytest.raises(EngineDeadError):
            llm.add_request("late", "hi", SamplingParams(max_tokens=2))

    asyncio.run(run())


async def _checks(llm: AsyncLLM, metrics: ServerMetrics) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # n=2 greedy, streamed as deltas: both samples get all their tokens, and they agree
    outs = await _collect(llm, "n2", "the quick brown", SamplingParams(n=2, temperature=0.0, max_tokens=6,
                                                                       ignore_eos=True))
    texts = ["".join(o.outputs[i].text for o in outs) for i in range(2)]
    ids = [sum((o.outputs[i].token_ids for o in outs), []) for i in range(2)]
    assert texts[0] == texts[1] and len(ids[0]) == len(ids[1]) == 6
    assert outs[-1].finished and all(c.finish_reason == "length" for c in outs[-1].outputs)

    # the engine's refusal reaches the caller as RequestRejected; nothing else is disturbed
    other = asyncio.create_task(_collect(llm, "ok", "a lazy dog", greedy))
    with pytest.raises(RequestRejected, match="more than the KV cache can hold"):
        await _collect(llm, "too-big", {"prompt_token_ids": [5] * 100}, greedy)
    assert sum(len(o.outputs[0].token_ids) for o in await other) == 6

    # bad input is refused before anything is queued
    with pytest.raises(ValueError, match="maximum context length"):
        llm.add_request("long", {"prompt_token_ids": [5] * 200}, greedy)

    # leaving a stream early aborts the request and frees its blocks
    llm.add_request("left", "seven wizards", SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True),
                    OutputKind.DELTA)
    async for _ in llm.stream_outputs("left"):
        break
    for _ in range(100):
        await asyncio.sleep(0.05)
        if llm.latest_stats.num_running_reqs == 0 and llm.latest_stats.num_free_blocks == 4:
            break
    assert llm.latest_stats.num_running_reqs == 0 and llm.latest_stats.num_free_blocks == 4

    # what the processor derives (bad_words -> token ids) reaches the engine, for every sample
    sent = []
    original_send = llm._send
    llm._send = lambda tag, msg, *replica: (sent.append(msg), original_send(tag, msg, *replica))
    try:
        await _collect(llm, "bad", "the quick", SamplingParams(n=2, max_tokens=2, bad_words=["quick"]))
    finally:
        llm._send = original_send
    adds = [m for m in sent if hasattr(m, "sampling_params")]
    assert len(adds) == 2 and all(m.sampling_params.bad_words_token_ids for m in adds)

    text = metrics.render().decode()
    # n2, ok, too-big (refused by the engine, not the front end), left and bad; "long" never got in
    assert "ernieserve:requests_number_total 5.0" in text
    assert "ernieserve:request_success_total 3.0" in text
