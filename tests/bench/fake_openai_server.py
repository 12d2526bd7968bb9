"""A small OpenAI-compatible streaming server for the bench tests (aiohttp.web, in a thread).

Request number n (in arrival order) gets ``fault_for(n)``: most stream ``max_tokens`` chunks of
one token each, some fail in each of the ways a real server or network can.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aiohttp import web


class Fault(Enum):
    NONE = "none"
    HTTP_500 = "500"
    HTTP_400 = "400"
    ERROR_EVENT = "error event"
    NO_DONE = "no [DONE]"
    ABORT = "connection cut"


def fault_for(n: int) -> Fault:
    return {3: Fault.HTTP_500, 7: Fault.HTTP_400, 11: Fault.ERROR_EVENT, 15: Fault.NO_DONE,
            19: Fault.ABORT}.get(n % 20, Fault.NONE)


@dataclass
class FakeServer:
    tokenizer: Any
    chunk_delay_s: float = 0.002
    send_usage: bool = True
    model_root: str | None = None  # reported as /v1/models' "root", like a checkpoint path
    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    prompt_lens: dict[str, int] = field(default_factory=dict)  # prompt text -> server's count
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> "FakeServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._runner is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": "fake-ernie", "object": "model", "root": self.model_root}
        return web.json_response({"object": "list", "data": [entry]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._stream(request, body, body["prompt"], chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._stream(request, body, body["messages"][-1]["content"], chat=True)

    async def _stream(self, request: web.Request, body: dict[str, Any], prompt: str,
                      chat: bool) -> web.StreamResponse:
        fault = fault_for(len(self.bodies))
        self.bodies.append(body)
        if fault is Fault.HTTP_500:
            return web.Response(status=500, text="internal error: out of blocks")
        if fault is Fault.HTTP_400:
            return web.json_response({"error": {"message": "max_tokens too large"}}, status=400)
        prompt_len = len(self.tokenizer.encode(prompt, add_special_tokens=False))
        self.prompt_lens[prompt] = prompt_len
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # a role-only first chunk, as OpenAI sends: no content, must not set TTFT
            await _send(resp, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        n_tokens = body["max_tokens"]
        for i in range(n_tokens):
            await asyncio.sleep(self.chunk_delay_s)
            if i == 2 and fault is Fault.ERROR_EVENT:
                await _send(resp, {"error": {"message": "engine died", "code": 500}})
                return resp
            if i == 2 and fault is Fault.ABORT:
                assert request.transport is not None
                request.transport.close()
                return resp
            choice = ({"index": 0, "delta": {"content": f" t{i}"}} if chat
                      else {"index": 0, "text": f" t{i}"})
            await _send(resp, {"choices": [choice]})
        if fault is Fault.NO_DONE:
            return resp
        if self.send_usage:
            await _send(resp, {"choices": [], "usage": {"prompt_tokens": prompt_len,
                                                        "completion_tokens": n_tokens}})
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _send(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(f"data: {json.dumps(data)}\n\n".encode())
