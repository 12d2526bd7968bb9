"""Image/video chat content and reasoning output, through the official `openai` client.

Three layers:
* the whole HTTP app (routes, error handlers, serving_chat, the real InputProcessor of the tiny
  VL checkpoint) in-process, with a scripted engine in place of the engine core: everything in
  front of the engine, runnable before the VL model exists;
* a real server on the text-only tiny ERNIE: image parts refused, reasoning output end to end;
* a real server (and the offline LLM) on the tiny VL checkpoint, end to end: they need the
  ERNIE-4.5-VL model class (ernieserve/models/ernie4_5_vl.py) and skip where it is missing.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "multimodal"))
from media_fixtures import data_url, image_bytes, media_server, video_bytes  # noqa: E402
from server_utils import API_SERVER, ENGINE_FLAGS, RemoteServer  # noqa: E402

from ernieserve.checkpoint.tokenizer_builder import CHAT_TEMPLATES, TokenizerFamily  # noqa: E402
from ernieserve.config import EngineArgs  # noqa: E402
from ernieserve.engine.protocol import EngineOutput, EngineRequest, FinishReason  # noqa: E402
from ernieserve.frontend.output_processor import OutputProcessor, child_request_id  # noqa: E402
from ernieserve.frontend.processor import InputProcessor  # noqa: E402
from ernieserve.reasoning import get_reasoning_parser  # noqa: E402

NAME = "tiny-vl"
LIMITS = '{"image": 2, "video": 1}'


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any], text: str = "Describe it.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


PNG = data_url(image_bytes(56, 40), "image/png")


# ---- in-process: the app in front of a scripted engine ------------------------------------------
class ScriptedEngine:
    """What the serving layer uses of AsyncLLM: the real input processor and detokenizer; the
    engine core replaced by a fixed list of output token ids."""

    def __init__(self, processor: InputProcessor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.script: list[int] = []
        self.requests: dict[str, tuple[EngineRequest, Any, Any, str | None]] = {}
        self.is_alive, self.dead_reason = True, None

    def add_request(self, request_id: str, prompt: Any, params: Any, kind: Any) -> None:
        text, req = self.processor.process(request_id, prompt, params)
        self.requests[request_id] = (req, params, kind, text)

    async def stream_outputs(self, request_id: str) -> AsyncIterator[Any]:
        req, params, kind, text = self.requests[request_id]
        outputs = OutputProcessor(self.tokenizer)
        cid = child_request_id(request_id, 0)
        outputs.add_request(request_id, text, req.prompt_token_ids, params, kind, [cid])
        for i, token in enumerate(self.script):
            last = i == len(self.script) - 1
            results, _ = outputs.process_outputs([EngineOutput(cid, [token], finish_reason=FinishReason.LENGTH
                                                               if last else None)])
            for result in results:
                yield result

    def abort(self, request_id: str) -> None:
        pass

    def last_request(self) -> EngineRequest:
        return list(self.requests.values())[-1][0]


@pytest.fixture(scope="module")
def vl_ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny-ernie-4.5-vl")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(image_bytes(64, 64, seed=3))
    (tmp_path_factory.getbasetemp() / "outside.png").write_bytes(image_bytes(8, 8))
    return folder


@pytest.fixture(scope="module")
def app_engine(vl_ckpt, media_dir):
    config = EngineArgs(model=str(vl_ckpt), device="cpu", max_model_len=2048, limit_mm_per_prompt=LIMITS,
                        allowed_local_media_path=str(media_dir)).create_engine_config()
    return ScriptedEngine(InputProcessor(config.model))


def app_client(engine: ScriptedEngine, reasoning: str | None = None) -> openai.OpenAI:
    from ernieserve.entrypoints.openai.api_server import ServerState, build_app
    from ernieserve.entrypoints.openai.serving_base import ServingContext
    from ernieserve.entrypoints.openai.serving_chat import OpenAIServingChat
    from ernieserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
    from ernieserve.metrics.prometheus import ServerMetrics

    parser = get_reasoning_parser(reasoning, engine.tokenizer) if reasoning else None
    ctx = ServingContext(engine, [NAME], "/tiny-vl", 2048, None, parser)  # type: ignore[arg-type]
    state = ServerState(engine, ctx, OpenAIServingChat(ctx), OpenAIServingCompletion(ctx),  # type: ignore[arg-type]
                        ServerMetrics(), [], 8, True)
    http = TestClient(build_app(state), base_url="http://testserver")
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def client(app_engine):
    app_engine.script = app_engine.tokenizer.encode(" a cat", add_special_tokens=False)
    return app_client(app_engine)


def test_image_request_counts_placeholders(client, app_engine):
    r = client.chat.completions.create(model=NAME, messages=user(image_part(PNG)), max_tokens=4)
    req = app_engine.last_request()
    (item,) = req.mm_items
    assert item.modality == "image" and item.grid_thw == [1, 4, 6] and item.length == 6
    assert r.usage.prompt_tokens == len(req.prompt_token_ids)  # placeholders included
    text_only = app_engine.tokenizer.apply_chat_template(user(text="Describe it."), tokenize=False,
                                                         add_generation_prompt=True)
    assert r.usage.prompt_tokens > len(app_engine.tokenizer.encode(text_only, add_special_tokens=False)) + 3
    assert r.choices[0].message.content == " a cat"


def test_images_and_video_in_prompt_order(client, app_engine, media_dir):
    video = {"type": "video_url", "video_url": {"url": data_url(video_bytes(6, 4), "video/mp4")}}
    messages = [{"role": "system", "content": "You see well."},
                {"role": "user", "content": [image_part(f"file://{media_dir}/cat.png"), video,
                                             {"type": "text", "text": "and"}, image_part(PNG)]}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    req = app_engine.last_request()
    assert [i.modality for i in req.mm_items] == ["image", "video", "image"]
    assert [i.offset for i in req.mm_items] == sorted(i.offset for i in req.mm_items)
    assert req.mm_items[1].grid_thw[0] == 4  # 6 frames at 4 fps, 2 fps sampling, at least 2 frames
    assert r.usage.prompt_tokens == len(req.prompt_token_ids)


def test_streamed_usage_counts_placeholders(client, app_engine):
    chunks = list(client.chat.completions.create(model=NAME, messages=user(image_part(PNG)), max_tokens=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == len(app_engine.last_request().prompt_token_ids)


def bad_request(client, messages, match: str) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert info.value.status_code == 400
    message = info.value.body["message"]
    assert match in message, message
    return info.value


def test_bad_media_is_a_400_and_serving_goes_on(client, media_dir, tmp_path):
    png = image_bytes(40, 40)
    routes = {"/huge.png": (200, {"Content-Length": str(1 << 40)}, b"", 0.0)}
    with media_server(routes) as base:
        cases = [
            (user(image_part(PNG), image_part(PNG), image_part(PNG)),
             "At most 2 image(s) per prompt are accepted (--limit-mm-per-prompt image=2); this prompt has 3."),
            (user(*[{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}] * 2),
             "At most 1 video(s) per prompt"),
            (user(image_part(data_url(png[:60], "image/png"))), "is broken or truncated"),
            (user(image_part(data_url(b"GIF89a-not-really", "image/gif"))), "not an image in a supported format"),
            (user(image_part(base + "/huge.png")), "the image size limit is"),
            (user(image_part(base + "/missing.png")), "HTTP 404"),
            (user(image_part(f"file://{media_dir}/../outside.png")), "outside --allowed-local-media-path"),
            (user({"type": "video_url", "video_url": {"url": data_url(b"\0" * 100, "video/mp4")}}),
             "cannot be decoded"),
            (user({"type": "input_audio", "input_audio": {}}), "unsupported content part"),
            ([{"role": "assistant", "content": [image_part(PNG)]}], "user and system messages only"),
        ]
        for messages, match in cases:
            err = bad_request(client, messages, match)
            assert err.body["param"] in ("messages", "messages.0.content")
    with media_server({}) as base:
        unreachable = base
    bad_request(client, user(image_part(unreachable + "/a.png")), "cannot fetch image URL")
    r = client.chat.completions.create(model=NAME, messages=user(image_part(PNG)), max_tokens=2)
    assert r.choices[0].message.content


def reasoning_script(tokenizer) -> tuple[list[int], str, str]:
    reasoning, content = "Six times seven", "\n\nIt is 42."
    end = tokenizer.convert_tokens_to_ids("</think>")
    ids = (tokenizer.encode(reasoning, add_special_tokens=False) + [end]
           + tokenizer.encode(content, add_special_tokens=False))
    return ids, reasoning, content


def test_reasoning_content(app_engine):
    client = app_client(app_engine, "ernie-45-vl")
    app_engine.script, reasoning, content = reasoning_script(app_engine.tokenizer)
    messages = [{"role": "user", "content": "What is 6 x 7?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30)  # thinks by default
    assert app_engine.last_request().prompt_token_ids[-1] == app_engine.tokenizer.convert_tokens_to_ids("<think>")
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, content)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    kinds = ["r" if getattr(d, "reasoning_content", None) else "c" for d in deltas
             if getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, reverse=True)  # reasoning deltas first, then content deltas

    off = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.choices[0].message.content == reasoning + content  # the </think> token is not text
    assert app_engine.tokenizer.decode(app_engine.last_request().prompt_token_ids[-6:]).endswith(
        "<think>\n\n</think>\n\n")


# ---- a real server on the text-only tiny ERNIE --------------------------------------------------
@pytest.mark.slow
def test_text_model_server_refuses_images_and_parses_reasoning(tiny_ernie, tmp_path):
    template = tmp_path / "vl_template.jinja"
    template.write_text(CHAT_TEMPLATES[TokenizerFamily.ERNIE_VL])  # text turns render as the text template
    server = RemoteServer([*API_SERVER, "--model", str(tiny_ernie), *ENGINE_FLAGS, "--served-model-name", NAME,
                           "--reasoning-parser", "ernie-45-vl", "--chat-template", str(template)],
                          tmp_path / "server.log").wait_ready()
    try:
        client = server.client()
        bad_request(client, user(image_part(PNG)), f"the model `{NAME}` takes no images")
        messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
        greedy = dict(model=NAME, messages=messages, max_tokens=12, temperature=0.0)
        r = client.chat.completions.create(**greedy, extra_body={"return_token_ids": True, "ignore_eos": True})
        message = r.choices[0].message
        from transformers import AutoTokenizer

        from ernieserve.sampling_params import SamplingParams

        tokenizer = AutoTokenizer.from_pretrained(str(tiny_ernie))
        parser = get_reasoning_parser("ernie-45-vl", tokenizer)
        ids = message.model_extra["completion_token_ids"]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        expected = parser.split(message.model_extra["prompt_token_ids"], ids, text, SamplingParams())
        assert expected[0] is not None  # thinking is on by default with this parser
        assert (message.reasoning_content, message.content or "") == expected
        chunks = list(client.chat.completions.create(**greedy, stream=True, extra_body={"ignore_eos": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == expected[0]
        assert "".join(d.content or "" for d in deltas) == expected[1]
        off = client.chat.completions.create(**greedy, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert getattr(off.choices[0].message, "reasoning_content", None) is None
        assert client.chat.completions.create(**greedy).choices[0].message  # still serving
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# ---- the real (tiny) VL model, end to end ------------------------------------------------------


@pytest.mark.slow
def test_vl_server_end_to_end(vl_ckpt, media_dir, tmp_path):
    server = RemoteServer([*API_SERVER, "--model", str(vl_ckpt), *ENGINE_FLAGS, "--served-model-name", NAME,
                           "--limit-mm-per-prompt", LIMITS, "--allowed-local-media-path", str(media_dir),
                           "--reasoning-parser", "ernie-45-vl"], tmp_path / "server.log").wait_ready()
    try:
        client = server.client()
        video = {"type": "video_url", "video_url": {"url": data_url(video_bytes(6, 4), "video/mp4")}}
        messages = user(image_part(PNG), video, image_part(f"file://{media_dir}/cat.png"))
        greedy = dict(model=NAME, messages=messages, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
        r = client.chat.completions.create(**greedy)
        assert r.usage.completion_tokens == 6
        config = EngineArgs(model=str(vl_ckpt), device="cpu", limit_mm_per_prompt=LIMITS,
                            allowed_local_media_path=str(media_dir)).create_engine_config()
        proc = InputProcessor(config.model)
        text = proc.apply_chat_template(messages[0:0] + [{"role": "user", "content": [
            {"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Describe it."}]}],
            enable_thinking=True)
        assert "Picture 2:" in text and "Video 1:" in text
        assert r.usage.prompt_tokens > len(proc.tokenizer.encode(text, add_special_tokens=False)) + 3
        chunks = list(client.chat.completions.create(**greedy, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = "".join((getattr(d, "reasoning_content", None) or "") + (d.content or "") for d in deltas)
        assert streamed == (r.choices[0].message.reasoning_content or "") + (r.choices[0].message.content or "")
        bad_request(client, user(image_part(data_url(b"broken", "image/png"))), "not an image")
        assert client.chat.completions.create(**greedy).usage.prompt_tokens == r.usage.prompt_tokens
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def vl_llm(vl_ckpt):
    from ernieserve.entrypoints.llm import LLM

    return LLM(model=str(vl_ckpt), device="cpu", max_model_len=1024, block_size=16, num_gpu_blocks_override=128,
               limit_mm_per_prompt={"image": 2, "video": 1})


def pil_image(seed: int):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image_bytes(56, 40, seed=seed))).convert("RGB")


@pytest.mark.slow
def test_vl_offline_chat_and_generate(vl_llm):
    from ernieserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    (chat,) = vl_llm.chat(user(image_part(PNG)), params, use_tqdm=False)
    text = vl_llm.get_tokenizer().apply_chat_template(user({"type": "image"}), tokenize=False,
                                                      add_generation_prompt=True)
    (gen,) = vl_llm.generate({"prompt": text, "multi_modal_data": {"image": [pil_image(0)]}}, params,
                             use_tqdm=False)
    assert chat.prompt_token_ids == gen.prompt_token_ids  # the same image and text -> the same prompt
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids and len(gen.outputs[0].token_ids) == 4


@pytest.mark.slow
def test_vl_output_depends_on_the_image(vl_llm):
    from ernieserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)
    text = vl_llm.get_tokenizer().apply_chat_template(user({"type": "image"}), tokenize=False,
                                                      add_generation_prompt=True)
    outs = [vl_llm.generate({"prompt": text, "multi_modal_data": {"image": [pil_image(seed)]}}, params,
                            use_tqdm=False)[0].outputs[0] for seed in (0, 1)]
    assert outs[0].cumulative_logprob != outs[1].cumulative_logprob  # the pixels reach the model
