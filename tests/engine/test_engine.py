"""The continuous-batching engine: identical answers under load, caches, memory budget, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

import llavakit
from llavakit.engine.async_engine import AsyncEngine, EngineConfig, EngineOverloaded
from llavakit.engine.core import BLOCK, Engine
from llavakit.errors import GenerationError


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(text, images=(), videos=()):
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _mixed(family: str, n: int = 16):
    """n requests: different images, sizes, counts, lengths, greedy and seeded sampling."""
    words = "What is in the picture? Describe the image in detail. How many people are there?".split()
    out = []
    for i in range(n):
        k = i % 4
        images = [_image(100 + i + j, 20 + 17 * ((i + j) % 5), 30 + 11 * ((i * j) % 4)) for j in range(k % 3)]
        videos = []
        if family == "onevision" and k == 3:
            videos = [np.random.default_rng(i).integers(0, 256, (3, 30, 40, 3), dtype=np.uint8)]
            images = []
        text = " ".join(words[: 3 + (i * 7) % len(words)])
        params = llavakit.SamplingParams(max_new_tokens=6 + i % 9)
        if i % 5 == 4:
            params = llavakit.SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=i)
        out.append((_conv(text, images, videos), params))
    return out


def _run_all(engine: Engine, vlm, requests):
    for i, (conv, params) in enumerate(requests):
        engine.add_request(f"r{i}", vlm.processor.encode(conv), params)
    got = {f"r{i}": [] for i in range(len(requests))}
    peak = 0
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        peak = max(peak, len(engine.running))
        for rid, d in engine.step():
            got[rid].append(d.token_id)
    return [got[f"r{i}"] for i in range(len(requests))], peak


@pytest.mark.parametrize("family", ["llama", "next_mistral", "onevision"])
def test_sixteen_concurrent_requests_equal_each_alone(models, family):
    vlm = models(family)[0]
    requests = _mixed(family)
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig(max_batch_size=16))
    together, peak = _run_all(engine, vlm, requests)
    assert peak >= 8  # they really ran together
    alone = [vlm.chat(conv, sampling=params).token_ids for conv, params in requests]
    assert together == alone
    assert engine.pool.available() == engine.pool.num_blocks  # every block came back


def test_same_image_again_skips_the_tower(models):
    vlm = models("next_mistral")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    calls = []
    real = vlm.model.encode_tiles
    picture = _image(7, 50, 40)
    try:
        vlm.model.encode_tiles = lambda px, chunk=16: calls.append(px.shape[0]) or real(px, chunk)
        first, _ = _run_all(engine, vlm, [(_conv("What is in the picture?", [picture]), llavakit.SamplingParams(max_new_tokens=5))])
        second, _ = _run_all(engine, vlm, [(_conv("Describe it in detail, please.", [picture]), llavakit.SamplingParams(max_new_tokens=5))])
    finally:
        vlm.model.encode_tiles = real
    assert len(calls) == 1  # only the first request ran the vision tower
    assert engine.stats()["image_cache_hits"] == 1 and engine.stats()["image_cache_misses"] == 1
    assert second[0] == vlm.chat(_conv("Describe it in detail, please.", [picture]), max_new_tokens=5).token_ids


def test_follow_up_turn_reuses_the_prefix(models):
    vlm = models("llama")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    turn1 = _conv("What is in the picture?", [_image(8, 60, 60)])
    (answer,), _ = _run_all(engine, vlm, [(turn1, llavakit.SamplingParams(max_new_tokens=6))])
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": vlm.processor.tokenizer.decode(answer)}]},
                     {"role": "user", "content": [{"type": "text", "text": "And what colour is it?"}]}]
    before = engine.stats()["prefix_cache_hit_tokens"]
    (again,), _ = _run_all(engine, vlm, [(turn2, llavakit.SamplingParams(max_new_tokens=6))])
    hit = engine.stats()["prefix_cache_hit_tokens"] - before
    shared = len(vlm.processor.encode(turn1).input_ids)
    assert hit >= (shared // BLOCK - 1) * BLOCK and hit > 0  # the first turn's blocks were not recomputed
    assert again == vlm.chat(turn2, max_new_tokens=6).token_ids


def test_abort_frees_blocks_at_once(models):
    vlm = models("llama")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    engine.add_request("long", vlm.processor.encode(_conv("hi", [_image(1, 30, 30)])),
                       llavakit.SamplingParams(max_new_tokens=500, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.pool.available() < engine.pool.num_blocks
    engine.abort("long")
    engine.step()
    assert engine.pool.available() == engine.pool.num_blocks and not engine.has_unfinished()


def test_small_budget_queues_then_serves_everyone(models):
    vlm = models("llama")[0]
    requests = [(_conv(f"Question number {i}?", [_image(i, 40, 30)]), llavakit.SamplingParams(max_new_tokens=8))
                for i in range(5)]
    need = max(len(vlm.processor.encode(c).input_ids) for c, _ in requests) + 8
    text = vlm.config.text
    per_token = 2 * text.num_layers * text.num_kv_heads * text.head_dim * 4
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids,
                    EngineConfig(kv_cache_bytes=2 * (need // BLOCK + 1) * BLOCK * per_token))
    got, peak = _run_all(engine, vlm, requests)
    assert peak == 2  # memory for two at a time; the rest waited
    assert got == [vlm.chat(c, sampling=p).token_ids for c, p in requests]
    with pytest.raises(GenerationError, match="tokens of KV cache but the engine holds"):
        engine.add_request("huge", vlm.processor.encode(requests[0][0]), llavakit.SamplingParams(max_new_tokens=2000))


def test_async_engine_streams_cancels_and_refuses_when_full(models):
    vlm = models("llama")[0]

    async def main():
        engine = AsyncEngine(vlm, EngineConfig(max_batch_size=4, max_queue=4))
        convs = [_conv(f"Tell me about picture {i}.", [_image(20 + i, 40, 30)]) for i in range(4)]
        encoded = [await asyncio.to_thread(engine.encode, c) for c in convs]

        async def collect(i):
            return [d.token_id async for d in engine.submit(f"a{i}", encoded[i], llavakit.SamplingParams(max_new_tokens=6))]

        results = await asyncio.gather(*(collect(i) for i in range(4)))
        assert results == [vlm.chat(c, max_new_tokens=6).token_ids for c in convs]

        # a consumer that stops after two tokens frees its slot
        stream = engine.submit("cut", encoded[0], llavakit.SamplingParams(max_new_tokens=400, ignore_eos=True))
        n = 0
        async for _ in stream:
            n += 1
            if n == 2:
                break
        await stream.aclose()
        for _ in range(100):
            if engine.stats()["requests_running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats()["requests_running"] == 0 and engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]

        # more waiting requests than the queue allows: refused at once, not queued forever
        blockers, refused = [], 0
        for i in range(12):
            try:
                blockers.append(engine.submit(f"b{i}", encoded[0],
                                              llavakit.SamplingParams(max_new_tokens=300, ignore_eos=True)))
            except EngineOverloaded:
                refused += 1
        assert refused >= 4  # 4 may run and 4 wait; the rest are refused
        for b in blockers:
            await b.aclose()
        await engine.stop(timeout=5)
        small = AsyncEngine(vlm, EngineConfig(kv_cache_bytes=1))  # one block: no image prompt fits
        with pytest.raises(GenerationError, match="tokens of KV cache"):  # refused before any stream exists
            small.submit("huge", encoded[0], llavakit.SamplingParams(max_new_tokens=8))
        await small.stop(timeout=5)

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_pool_grows_with_demand_up_to_the_budget(models):
    vlm = models("llama")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    start = engine.stats()["kv_blocks_total"]
    assert start * BLOCK == 4096  # small until something needs more
    engine.add_request("big", vlm.processor.encode(_conv("hi")), llavakit.SamplingParams(max_new_tokens=3900))
    engine.add_request("big2", vlm.processor.encode(_conv("hello")), llavakit.SamplingParams(max_new_tokens=3900))
    engine.step()
    assert engine.stats()["requests_running"] == 2 and engine.stats()["kv_blocks_total"] > start
    engine.abort("big")
    engine.abort("big2")
    engine.step()
    assert engine.pool.available() == engine.pool.num_blocks


def test_clear_caches_makes_the_next_request_cold(models):
    vlm = models("next_mistral")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    conv = _conv("What is in the picture?", [_image(9, 50, 40)])
    first, _ = _run_all(engine, vlm, [(conv, llavakit.SamplingParams(max_new_tokens=4))])
    engine.clear_caches()
    again, _ = _run_all(engine, vlm, [(conv, llavakit.SamplingParams(max_new_tokens=4))])
    stats = engine.stats()
    assert (stats["image_cache_hits"], stats["prefix_cache_hit_tokens"]) == (0, 0) and first == again


def test_long_prompts_prefill_in_chunks_between_decode_steps(models, monkeypatch):
    """A prompt is prefilled PREFILL_CHUNK tokens per step; others keep decoding; answers do not change."""
    import llavakit.engine.core as core

    vlm, ref, proc = models("next_mistral")
    long_conv = _conv("Describe the image in detail. " * 12, [_image(3, 80, 60)])
    short_conv = _conv("What is in the picture?")
    want_long = vlm.chat(long_conv, max_new_tokens=8).token_ids
    want_short = vlm.chat(short_conv, max_new_tokens=30).token_ids
    monkeypatch.setattr(core, "PREFILL_CHUNK", 16)
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    engine.add_request("short", vlm.processor.encode(short_conv), llavakit.SamplingParams(max_new_tokens=30))
    got = {"short": [], "long": []}
    for rid, d in engine.step() + engine.step():
        got[rid].append(d.token_id)
    prompt = len(vlm.processor.encode(long_conv).input_ids)
    engine.add_request("long", vlm.processor.encode(long_conv), llavakit.SamplingParams(max_new_tokens=8))
    steps_until_long = 0
    while not got["long"]:
        for rid, d in engine.step():
            got[rid].append(d.token_id)
        steps_until_long += 1
    assert steps_until_long >= prompt // 16  # the prompt really went in pieces ...
    assert len(got["short"]) >= min(30, steps_until_long)  # ... while the other request kept decoding
    while engine.has_unfinished():
        for rid, d in engine.step():
            got[rid].append(d.token_id)
    assert got == {"short": want_short, "long": want_long}
    # and the chunked prompt's logits are the reference's
    inputs = proc.apply_chat_template(long_conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    import torch

    with torch.no_grad():
        gen = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(gen) if t in vlm.eos_ids), len(gen))
    assert got["long"] == gen[:cut]


def test_requests_about_one_image_arriving_together_prefill_it_once(models):
    vlm = models("onevision")[0]
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig(max_batch_size=8))
    picture = _image(12, 70, 50)
    questions = ["What is in the picture?", "What colour is it?", "Where is it?", "How big is it?"]
    requests = [(_conv(q, [picture]), llavakit.SamplingParams(max_new_tokens=5)) for q in questions]
    together, peak = _run_all(engine, vlm, requests)
    assert peak == 4  # the three that waited for the shared prefix then ran beside the first
    first = vlm.processor.encode(requests[0][0]).input_ids
    shared = 0  # prompt tokens the four prompts have in common, in whole blocks
    others = [vlm.processor.encode(c).input_ids for c, _ in requests[1:]]
    while all(len(o) > shared and o[shared] == first[shared] for o in others):
        shared += 1
    assert shared > 2 * BLOCK  # the image and the template before the question
    assert engine.stats()["prefix_cache_hit_tokens"] == 3 * (shared // BLOCK) * BLOCK
    assert together == [vlm.chat(c, sampling=p).token_ids for c, p in requests]


def test_chunked_half_precision_prefill_reads_the_cached_prefix_through_blocks(checkpoint, monkeypatch):
    """bfloat16 on the CPU: every chunk of a prompt prefilled in pieces runs through block_attention
    over the cached beginning and itself (keys > queries), and the answer is the unchunked one."""
    import torch

    import llavakit.engine.core as core
    import llavakit.model.text as text

    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.bfloat16)
    conv = _conv("Describe the image in detail. " * 6, [_image(3, 80, 60)])
    whole = vlm.chat(conv, max_new_tokens=8).token_ids
    calls = []
    real = text.block_attention
    monkeypatch.setattr(text, "block_attention", lambda q, k, v: calls.append((q.shape[2], k.shape[2])) or real(q, k, v))
    monkeypatch.setattr(core, "PREFILL_CHUNK", 16)
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())
    enc = vlm.processor.encode(conv)
    engine.add_request("long", enc, llavakit.SamplingParams(max_new_tokens=8))
    got = []
    while engine.has_unfinished():
        got += [d.token_id for _, d in engine.step()]
    prompt = len(enc.input_ids)
    layers = len(vlm.model.language_model.layers)
    chunks = [(min(16, prompt - start), min(start + 16, prompt)) for start in range(0, prompt, 16)]
    assert calls == [c for c in chunks for _ in range(layers)]  # every chunk, every layer, keys = all so far
    assert got == whole
