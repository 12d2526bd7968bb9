"""The OpenAI-compatible API, driven with the official `openai` client against a real server."""

from __future__ import annotations

import httpx
import pytest

from server_utils import metrics

GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
CHAT = [{"role": "user", "content": "Tell me about the quick brown fox."}]

pytestmark = pytest.mark.slow  # the module's server takes a few seconds to start


def test_models_health_ping_version(server, model):
    models = httpx.get(server.url("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [model]
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/ping")).status_code == 200
    assert httpx.post(server.url("/ping")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]


def test_chat_non_streaming_usage(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_non_stream(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, **GREEDY)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_stream_equals_non_stream(client, model):
    kwargs = dict(model=model, prompt="the quick brown fox", max_tokens=10, **GREEDY)
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_completion_default_max_tokens_is_16(client, model):
    r = client.completions.create(model=model, prompt="jovial ernie", **GREEDY)
    assert r.usage.completion_tokens == 16


def test_chat_without_max_tokens_runs_to_the_context_limit(client, model):
    # OpenAI's chat default: no cap but the context (a long prompt keeps the test short)
    r = client.chat.completions.create(model=model, messages=CHAT, temperature=0.0,
                                       extra_body={"ignore_eos": True, "prompt_token_ids": [5] * 490})
    assert r.usage.prompt_tokens == 490 and r.usage.completion_tokens == 512 - 490
    assert r.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=20, max_completion_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3


def test_n2_non_stream_and_stream(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=7,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, n=2, temperature=1.0,
                                                seed=7, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finished, "one finish chunk per choice"
                finished.add(c.index)
    assert finished == {0, 1}
    # seeded sampling: the stream reproduces the non-streamed samples
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}


def test_completion_n2_and_several_prompts(client, model):
    r = client.completions.create(model=model, prompt=["the quick", "a lazy dog"], n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # greedy: both samples of a prompt agree
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.usage.completion_tokens == 16


def test_seed_reproducible(client, model):
    kwargs = dict(model=model, prompt="seven wizards", max_tokens=8, temperature=1.0, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_chat_logprobs_top_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_chat_logprobs_streamed(client, model):
    entries = []
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, logprobs=True,
                                                top_logprobs=2, stream=True, **GREEDY):
        if chunk.choices and chunk.choices[0].logprobs:
            entries += chunk.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)


def test_completion_logprobs_with_echo(client, model):
    prompt = "the quick brown fox"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=3, logprobs=2, echo=True, **GREEDY)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    num_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_string(client, model):
    base = client.completions.create(model=model, prompt="the lazy dog", max_tokens=12, **GREEDY).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {base!r}"
    cut = client.completions.create(model=model, prompt="the lazy dog", max_tokens=12, stop=[stop], **GREEDY)
    c = cut.choices[0]
    assert c.finish_reason == "stop"
    assert c.text == base[:base.index(stop)]
    kept = client.completions.create(model=model, prompt="the lazy dog", max_tokens=12, stop=stop, temperature=0.0,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == base[:base.index(stop) + len(stop)]
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="the lazy dog", max_tokens=12, stop=[stop], stream=True, **GREEDY) if ch.choices)
    assert streamed == c.text


def test_return_token_ids_and_prompt_token_ids(client, model):
    r = client.completions.create(model=model, prompt="the quick", max_tokens=4, temperature=0.0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0].model_dump()
    prompt_ids, out_ids = choice["prompt_token_ids"], choice["completion_token_ids"]
    assert len(prompt_ids) == r.usage.prompt_tokens and len(out_ids) == 4
    again = client.completions.create(model=model, prompt="", max_tokens=4, temperature=0.0,
                                      extra_body={"ignore_eos": True, "prompt_token_ids": prompt_ids})
    assert again.choices[0].text == r.choices[0].text
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=3, temperature=0.0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    message = chat.choices[0].message.model_dump()
    assert len(message["completion_token_ids"]) == 3 and message["prompt_token_ids"]


def test_prompt_tokens_details_cached_tokens(client, model):
    # prefix caching is on by default: the second time, the prompt's full blocks come from the cache
    prompt = " ".join(["jovial ernie serves tokens in pages of cache blocks"] * 6)
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.choices[0].text == first.choices[0].text


def test_extra_sampling_fields_accepted(client, model):
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.2, stop=["\n\n"],
        extra_body={"top_k": 20, "min_p": 0.05, "min_tokens": 2, "repetition_penalty": 1.1, "bad_words": ["fox"],
                    "chat_template_kwargs": {"enable_thinking": False}, "stop_token_ids": [3]})
    assert r.usage.completion_tokens >= 2


def test_disable_chat_template(client, model):
    raw = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "the quick brown"}],
                                         max_tokens=5, temperature=0.0,
                                         extra_body={"ignore_eos": True, "disable_chat_template": True})
    plain = client.completions.create(model=model, prompt="the quick brown", max_tokens=5, **GREEDY)
    assert raw.choices[0].message.content == plain.choices[0].text


def test_content_parts_are_text(client, model):
    parts = [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the quick brown fox."}]
    a = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}], max_tokens=4,
                                       **GREEDY)
    b = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_metrics_parse_and_counters_move(server, client, model):
    before = metrics(server.url("/metrics"))
    client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, **GREEDY)
    after = metrics(server.url("/metrics"))
    for name in ("ernieserve:requests_number_total", "ernieserve:request_success_total",
                 "ernieserve:prompt_tokens_total", "ernieserve:time_to_first_token_seconds_count",
                 "ernieserve:e2e_request_latency_seconds_count", "ernieserve:request_queue_time_seconds_count"):
        assert after[name] == before[name] + 1 or name == "ernieserve:prompt_tokens_total", name
    assert after["ernieserve:prompt_tokens_total"] > before["ernieserve:prompt_tokens_total"]
    assert after["ernieserve:generation_tokens_total"] == before["ernieserve:generation_tokens_total"] + 5
    assert after["ernieserve:time_per_output_token_seconds_count"] == \
        before["ernieserve:time_per_output_token_seconds_count"] + 1
    assert after["ernieserve:max_gpu_block_num"] == 256
    assert after["ernieserve:num_requests_running"] == 0
    assert after["ernieserve:free_gpu_block_num"] == 256
    assert after["ernieserve:max_batch_size"] == 16


def test_prefix_cache_metrics_and_cached_tokens(server, client, model):
    long_chat = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 12}]
    first = client.chat.completions.create(model=model, messages=long_chat, max_tokens=2, **GREEDY)
    second = client.chat.completions.create(model=model, messages=long_chat, max_tokens=2, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # at least one full block (--block-size 16)
    assert second.usage.prompt_tokens_details.cached_tokens > (first.usage.prompt_tokens_details.cached_tokens or 0)
    after = metrics(server.url("/metrics"))
    assert 0 < after["ernieserve:hit_req_rate"] <= 1
    assert 0 < after["ernieserve:gpu_hit_token_rate"] == after["ernieserve:hit_token_rate"]
    assert after["ernieserve:cpu_hit_token_rate"] == 0  # this server has no --swap-space
    assert after["ernieserve:prefix_gpu_cache_token_num"] >= 16
    assert after["ernieserve:prefix_cpu_cache_token_num"] == 0
