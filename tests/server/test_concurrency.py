"""32 concurrent streaming requests of mixed images, lengths and sampling all complete, and each
equals the same request sent alone (greedy and seeded alike)."""

from __future__ import annotations

import asyncio

from server_helpers import image_message, png_bytes

NAME = "next_mistral"  # any-resolution: image sizes change prompt lengths


def _requests() -> list[dict]:
    sizes = [(40, 30), (30, 60), (90, 40), (20, 20)]
    out = []
    for i in range(32):
        images = [png_bytes(*sizes[i % 4], seed=i % 5)] * (1 + (i % 7 == 0))
        question = ["What is in the picture?", "Describe the image in detail.", "How many people are there?"][i % 3]
        out.append(dict(messages=image_message(question, *images) if i % 6 else
                        [{"role": "user", "content": question}],  # some without images
                        max_tokens=4 + (i * 5) % 21, temperature=0.0 if i % 2 == 0 else 0.8,
                        seed=None if i % 2 == 0 else 100 + i, top_k=0 if i % 4 else 20))
    return out


async def _stream(client, req: dict) -> tuple[str, str, int]:
    extra = {"top_k": req["top_k"]}
    body = {k: v for k, v in req.items() if k != "top_k"}
    stream = await client.chat.completions.create(model=NAME, stream=True, stream_options={"include_usage": True},
                                                  extra_body=extra, **body)
    text, finish, tokens = [], None, None
    async for c in stream:
        if c.choices:
            text.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
        if c.usage is not None:
            tokens = c.usage.completion_tokens
    return "".join(text), finish, tokens


def test_32_concurrent_streams_equal_their_sequential_results(server):
    s = server(NAME)
    reqs = _requests()

    async def concurrent():
        client = s.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(_stream(client, r) for r in reqs)), timeout=120)
        finally:
            await client.close()

    async def sequential():
        client = s.async_client()
        try:
            return [await asyncio.wait_for(_stream(client, r), timeout=30) for r in reqs]
        finally:
            await client.close()

    together = asyncio.run(concurrent())
    alone = asyncio.run(sequential())
    assert all(finish in ("stop", "length") for _, finish, _ in together)
    assert together == alone
    metrics = s.metrics()
    assert metrics["llavakit_choices_in_flight"] == 0
    assert metrics["llavakit_running_requests"] == 0 and metrics["llavakit_waiting_requests"] == 0
