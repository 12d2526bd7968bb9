"""Image-prompt serving benchmark: starts our OpenAI server on a VL checkpoint, sends N chat requests
with one random image each (a distinct image per request, so the prefix cache cannot help) from
C concurrent streaming clients, and prints TTFT and throughput.

    python3 benchmarks/vl_serve_gpu.py CKPT --num-prompts 64 --concurrency 16 -- --load-format dummy --quantization wint8
Everything after ``--`` goes to ``ernieserve serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np


def image_url(rng: np.random.Generator, size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one(client, model: str, url: str, max_tokens: int) -> tuple[float, float, int, int]:
    start = time.perf_counter()
    ttft = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "Describe this image."}]}])
    async for chunk in stream:
        if ttft is None and chunk.choices and (chunk.choices[0].delta.content
                                               or getattr(chunk.choices[0].delta, "reasoning_content", None)):
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and ttft is not None
    return ttft, time.perf_counter() - start, usage.completion_tokens, usage.prompt_tokens


async def run(args: argparse.Namespace, base_url: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="x", timeout=600)
    model = (await client.models.list()).data[0].id
    rng = np.random.default_rng(0)
    urls = [image_url(rng, args.image_size) for _ in range(args.num_prompts + 2)]
    await one(client, model, urls[-1], 4)  # warm up: Triton compiles, the vision path's first run
    await one(client, model, urls[-2], 4)
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(url: str):
        async with sem:
            return await one(client, model, url, args.max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(u) for u in urls[:args.num_prompts]))
    duration = time.perf_counter() - start
    ttft = np.array([r[0] for r in results]) * 1000
    out_tokens = sum(r[2] for r in results)
    print(f"image prompts: {args.num_prompts} x {args.image_size}x{args.image_size} px, "
          f"{results[0][3]} prompt tokens each, {args.max_tokens} output tokens, concurrency {args.concurrency}")
    print(f"duration {duration:.2f} s, requests/s {args.num_prompts / duration:.2f}, "
          f"output tok/s {out_tokens / duration:.1f}, prompt tok/s {sum(r[3] for r in results) / duration:.1f}")
    print(f"TTFT ms mean {ttft.mean():.1f} p50 {np.percentile(ttft, 50):.1f} p99 {np.percentile(ttft, 99):.1f}")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8323)
    args = p.parse_args(argv)
    log = open(os.environ.get("OUT", "/tmp") + "/vl_server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "ernieserve", "serve", args.model, "--port", str(args.port),
                               "--host", "127.0.0.1", "--disable-log-requests", *extra], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"server exited: see {log.name}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        asyncio.run(run(args, base))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
