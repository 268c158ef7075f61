"""The server through the official `openai` client: answers equal vlm.chat, usage counts match the prompt."""

from __future__ import annotations

import json

import pytest

from server_helpers import data_url, image_message, local_message, mp4_bytes, png_bytes

FAMILIES = ["llama", "next_mistral", "onevision"]
QUESTION = "What is in the picture?"


@pytest.mark.parametrize("name", FAMILIES)
def test_models_and_health(server, name):
    s = server(name)
    assert s.get("/health") == (200, b'{"status":"ok"}')
    models = s.client().models.list()
    assert [m.id for m in models.data] == [name]
    card = models.data[0].model_dump()
    display = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}
    assert card["family"] == display[card["model_type"]]


@pytest.mark.parametrize("name", FAMILIES)
def test_image_greedy_equals_vlm_chat_with_usage(server, local_vlm, name):
    s, vlm = server(name), local_vlm(name)
    image = png_bytes(48, 36, seed=1)
    r = s.client().chat.completions.create(model=name, messages=image_message(QUESTION, image), max_tokens=12,
                                           temperature=0)
    want = vlm.chat(local_message(QUESTION, image), max_new_tokens=12, temperature=0)
    choice = r.choices[0]
    assert (choice.message.content, choice.finish_reason) == (want.text, want.finish_reason)
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(vlm.processor.encode(local_message(QUESTION, image)).input_ids)
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_stream_equals_whole_answer_and_ends_with_done(server, name):
    s = server(name)
    messages = image_message(QUESTION, png_bytes(40, 60, seed=2), png_bytes(30, 30, seed=3))  # two images
    whole = s.client().chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    chunks = list(s.client().chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream is server-sent events closed by [DONE]
    status, raw, headers = s.request("POST", "/v1/chat/completions", json.dumps(
        {"model": name, "messages": messages, "max_tokens": 3, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_video_onevision_data_url_and_local_file(server, local_vlm, media_dir):
    s, vlm = server("onevision"), local_vlm("onevision")
    clip = mp4_bytes()
    (media_dir / "clip.mp4").write_bytes(clip)
    want = vlm.chat([{"role": "user", "content": [{"type": "video", "video": clip, "num_frames": 4},
                                                  {"type": "text", "text": "What happens?"}]}],
                    max_new_tokens=8, temperature=0)
    for url in (data_url(clip, "video/mp4"), f"file://{media_dir}/clip.mp4"):
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_frames": 4}},
                                                 {"type": "text", "text": "What happens?"}]}]
        r = s.client().chat.completions.create(model="onevision", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.prompt_tokens


@pytest.mark.parametrize("name", ["llama", "onevision"])
def test_n2_seeded_choices_equal_vlm_chat_with_seed_plus_i(server, local_vlm, name):
    s, vlm = server(name), local_vlm(name)
    image = png_bytes(32, 32, seed=4)
    r = s.client().chat.completions.create(model=name, messages=image_message(QUESTION, image), n=2, seed=7,
                                           temperature=1.0, top_p=0.9, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):
        want = vlm.chat(local_message(QUESTION, image), max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7 + i)
        assert c.message.content == want.text
    assert r.usage.completion_tokens == sum(
        vlm.chat(local_message(QUESTION, image), max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7 + i)
        .completion_tokens for i in range(2))


@pytest.mark.parametrize("name", ["llama", "next_mistral"])
def test_stop_string_and_max_tokens(server, name):
    s = server(name)
    client = s.client()
    messages = image_message(QUESTION, png_bytes(50, 30, seed=5))
    full = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut
    short = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_logprobs_and_top_logprobs(server):
    s = server("llama")
    r = s.client().chat.completions.create(model="llama", messages=image_message(QUESTION, png_bytes(20, 20)),
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the most likely
        assert entry.logprob <= 0
    streamed = s.client().chat.completions.create(model="llama", messages=image_message(QUESTION, png_bytes(20, 20)),
                                                  max_tokens=6, temperature=0, logprobs=True, stream=True,
                                                  extra_body={"ignore_eos": True})
    lps = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert lps == pytest.approx([e.logprob for e in content])


@pytest.mark.parametrize("name", ["llama", "onevision"])
def test_response_format_json_schema_and_json_object(server, name):
    s = server(name)
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["animal", "count"], "additionalProperties": False}
    messages = image_message("Describe it as JSON.", png_bytes(24, 24, seed=6))
    for temperature in (0.0, 1.0):
        r = s.client().chat.completions.create(
            model=name, messages=messages, max_tokens=40, temperature=temperature, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
        value = json.loads(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
        assert set(value) == {"animal", "count"} and value["animal"] in ("cat", "dog") and 0 <= value["count"] <= 9
    r = s.client().chat.completions.create(model=name, messages=messages, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_same_image_twice_hits_the_image_cache(server):
    s = server("next_mistral")
    image = png_bytes(70, 50, seed=99)  # used by no other test
    before = s.metrics()
    vision = []
    for _ in range(2):
        s.client().chat.completions.create(model="next_mistral", messages=image_message(QUESTION, image),
                                           max_tokens=2, temperature=0)
        vision.append(s.metrics()["llavakit_vision_seconds_total"])
    after = s.metrics()
    # the first request ran the tower, the second spent no vision time at all
    assert vision[0] > before["llavakit_vision_seconds_total"] and vision[1] == vision[0]
    assert after["llavakit_image_cache_misses_total"] - before["llavakit_image_cache_misses_total"] == 1
    assert after["llavakit_image_cache_hits_total"] - before["llavakit_image_cache_hits_total"] == 1
    assert after["llavakit_image_cache_hit_rate"] > 0
    assert after['llavakit_http_requests_total{route="/v1/chat/completions",status="200"}'] >= 2
    assert after["llavakit_time_to_first_token_seconds_count"] >= 2
    for name in ("llavakit_running_requests", "llavakit_waiting_requests", "llavakit_generation_tokens_total",
                 "llavakit_prompt_tokens_total", "llavakit_inter_token_latency_seconds_count"):
        assert name in after
