"""The OpenAI-compatible HTTP server: FastAPI + uvicorn in front of an engine core process.

    python -m ernieserve.entrypoints.openai.api_server --model PATH [FastDeploy flags]
    ernieserve serve [PATH] [flags]

Startup order: parse and check flags, build the engine config (flag errors exit 2 before
anything starts), bind the HTTP port(s) (a busy port fails fast), start the engine core and
wait for it (a startup failure exits 1 with the engine's message), then serve. SIGTERM or
Ctrl-C: stop accepting connections, let in-flight requests finish within
--timeout-graceful-shutdown, stop the engine, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ernieserve import __version__
from ernieserve.config import ConfigError, EngineArgs
from ernieserve.engine.async_client import AsyncLLM, EngineStartupError
from ernieserve.engine.core_proc import EngineAddresses
from ernieserve.entrypoints.openai.cli_args import check_args, load_chat_template, make_arg_parser
from ernieserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                                                    OpenAIError)
from ernieserve.entrypoints.openai.serving_base import ServingContext
from ernieserve.entrypoints.openai.serving_chat import OpenAIServingChat
from ernieserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from ernieserve.metrics.prometheus import CONTENT_TYPE, ServerMetrics
from ernieserve.reasoning import get_reasoning_parser
from ernieserve.reasoning.parser import ReasoningParser

logger = logging.getLogger("ernieserve.api_server")

_LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(slots=True)
class ServerState:
    engine: AsyncLLM
    ctx: ServingContext
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    metrics: ServerMetrics
    api_keys: list[str]
    max_concurrency: int
    metrics_on_main_app: bool
    active_requests: int = 0


# ---- middleware (pure ASGI: it must not get between a stream and its client's disconnect) ----
class ApiKeyMiddleware:
    """401 for /v1/* without a valid `Authorization: Bearer KEY` when keys are set."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1") and not self._ok(scope):
            err = OpenAIError(401, "Invalid or missing API key. Send `Authorization: Bearer <key>`.",
                              "invalid_request_error", None, "invalid_api_key")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ok(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # compare with every key, always, so the time taken says nothing about the keys
        matches = [secrets.compare_digest(token, k) for k in self.keys]
        return scheme.lower() == b"bearer" and any(matches)


class ConcurrencyMiddleware:
    """429 beyond --max-concurrency generation requests in flight (a stream counts until it ends)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in _LIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.active_requests >= state.max_concurrency:
            err = OpenAIError(429, f"Too many requests: this server serves at most {state.max_concurrency} at "
                              "once (--max-concurrency). Retry later.", "rate_limit_error", None,
                              "rate_limit_exceeded")
            await err.response()(scope, receive, send)
            return
        state.active_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.active_requests -= 1


# ---- the app ---------------------------------------------------------------------------------
def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ernieserve", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = state
    _add_error_handlers(app)
    _add_generation_routes(app, state)
    _add_info_routes(app, state)
    if state.metrics_on_main_app:
        add_metrics_route(app, state.metrics)
    # added last = outermost: authentication is checked before the concurrency limit counts a request
    app.add_middleware(ConcurrencyMiddleware, state=state)
    app.add_middleware(ApiKeyMiddleware, keys=state.api_keys)
    return app


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        job = await state.chat.start(body)
        if body.stream:
            return _stream_response(state, state.chat.stream(job), [job.request_id])
        return await _full_response(state, raw, state.chat.full_response(job), [job.request_id])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        job = state.completion.start(body)
        if body.stream:
            return _stream_response(state, state.completion.stream(job), job.engine_request_ids)
        return await _full_response(state, raw, state.completion.full_response(job), job.engine_request_ids)


def _stream_response(state: ServerState, chunks: Any, request_ids: list[str]) -> StreamingResponse:
    # The background task runs when the stream ends for any reason, including a client that went
    # away: aborting then frees the request's KV blocks at once (a no-op if it finished).
    return StreamingResponse(chunks, media_type="text/event-stream",
                             background=BackgroundTask(_abort_all, state.engine, request_ids))


def _abort_all(engine: AsyncLLM, request_ids: list[str]) -> None:
    for rid in request_ids:
        engine.abort(rid)


async def _full_response(state: ServerState, raw: Request, work: Awaitable[Any], request_ids: list[str]) -> Response:
    """Answer when the result is ready; if the client disconnects first, abort the request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            _abort_all(state.engine, request_ids)
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return JSONResponse(task.result().model_dump())


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> Response:
        ctx = state.ctx
        cards = [ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.max_model_len)
                 for name in ctx.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def health() -> Response:
        engine = state.engine
        if engine.is_alive:
            return Response(status_code=200)
        reason = engine.dead_reason or "the engine is not running"
        return OpenAIError(503, f"Engine is not healthy: {reason}", "server_error", None, "engine_dead").response()

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})


def add_metrics_route(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        # OpenAI answers 400 where FastAPI would say 422
        return validation_to_openai(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return OpenAIError(e.status_code, str(e.detail), kind).response()


def validation_to_openai(errors: Any) -> OpenAIError:
    first = list(errors)[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message, param = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), None
    elif first.get("type") == "missing" and not loc:
        message = "The request body is missing."
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return OpenAIError(400, message, "invalid_request_error", param)


# ---- running ---------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # run_server installs the handlers (for both servers) and, unlike uvicorn, does not
        # re-raise SIGTERM after a graceful shutdown: that is a clean stop and exits 0.
        yield


def _bind(host: str, port: int, flag: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}).") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn(app: FastAPI, args: argparse.Namespace, port: int) -> _Server:
    config = uvicorn.Config(app, host=args.host, port=port, log_level="info", lifespan="off",
                            access_log=not args.disable_log_requests,
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    return _Server(config)


def _install_signal_handlers(main: _Server, grace_s: int) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if main.should_exit:
            if sig == signal.SIGINT:
                main.force_exit = True
            return
        logger.info("%s: no new connections; in-flight requests get up to %d s to finish", sig.name, grace_s)
        main.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def run_server(args: argparse.Namespace) -> int:
    engine_config = EngineArgs.from_cli_args(args).create_engine_config()
    chat_template = load_chat_template(args.chat_template)
    separate_metrics = args.metrics_port is not None and args.metrics_port != args.port
    sockets = [_bind(args.host, args.port, "--port")]
    if separate_metrics:
        sockets.append(_bind(args.host, args.metrics_port, "--metrics-port"))
    metrics = ServerMetrics()
    engine = AsyncLLM(engine_config, metrics=metrics, log_requests=not args.disable_log_requests,
                      addresses=EngineAddresses.create(args.engine_worker_queue_port, args.cache_queue_port))
    reasoning_parser = _reasoning_parser(args.reasoning_parser, engine.tokenizer)
    try:
        await engine.start()
        model = engine_config.model
        ctx = ServingContext(engine, [model.served_model_name], model.model, model.max_model_len, chat_template,
                             reasoning_parser)
        state = ServerState(engine, ctx, OpenAIServingChat(ctx), OpenAIServingCompletion(ctx), metrics,
                            args.api_key, args.max_concurrency, not separate_metrics)
        await _serve(state, args, sockets)
    finally:
        await engine.shutdown()
        for sock in sockets:
            sock.close()
    return 0


def _reasoning_parser(name: str | None, tokenizer: Any) -> ReasoningParser | None:
    if name is None:
        return None
    try:
        return get_reasoning_parser(name, tokenizer)
    except ValueError as e:  # unknown name, or a tokenizer without the parser's markers
        raise ConfigError(str(e)) from None


async def _serve(state: ServerState, args: argparse.Namespace, sockets: list[socket.socket]) -> None:
    main = _uvicorn(build_app(state), args, args.port)
    _install_signal_handlers(main, args.timeout_graceful_shutdown)
    metrics_server = None
    metrics_task = None
    if len(sockets) > 1:
        metrics_app = FastAPI(docs_url=None, redoc_url=None)
        add_metrics_route(metrics_app, state.metrics)
        metrics_server = _uvicorn(metrics_app, args, args.metrics_port)
        metrics_task = asyncio.create_task(metrics_server.serve(sockets=[sockets[1]]))
    logger.info("serving %s at http://%s:%d (OpenAI API under /v1)", state.ctx.served_model_names[0], args.host,
                args.port)
    try:
        await main.serve(sockets=[sockets[0]])
    finally:
        if metrics_server is not None and metrics_task is not None:
            metrics_server.should_exit = True
            await asyncio.gather(metrics_task, return_exceptions=True)


def run_from_args(args: argparse.Namespace) -> int:
    """Check flags, then serve until SIGTERM. ConfigError propagates (the caller prints it).
    On a node other than node 0 (--node-rank K > 0), run that node's tensor-parallel workers
    instead: node 0 serves."""
    check_args(args)
    if args.node_rank or args.nnodes or args.ips:
        config = EngineArgs.from_cli_args(args).create_engine_config()
        if config.parallel.node_rank > 0:
            from ernieserve.worker.worker_proc import run_node_workers

            return run_node_workers(config)
    try:
        return asyncio.run(run_server(args))
    except EngineStartupError as e:
        print(f"ernieserve: error: the engine failed to start: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ernieserve.entrypoints.openai.api_server",
                                     description="OpenAI-compatible API server (FastDeploy's flag names).")
    return make_arg_parser(parser)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
