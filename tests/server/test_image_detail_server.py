"""`detail` on image_url parts, --default-image-detail and --max-image-tokens: usage.prompt_tokens follows."""

from __future__ import annotations

import pytest

from server_helpers import Server, data_url, local_message, png_bytes

QUESTION = "What is in the picture?"
IMAGE = png_bytes(90, 40, seed=3)


def _message(detail: str | None) -> list[dict]:
    url = {"url": data_url(IMAGE), **({"detail": detail} if detail else {})}
    return [{"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": QUESTION}]}]


def _local(detail: str | None) -> list[dict]:
    conv = local_message(QUESTION, IMAGE)
    if detail:
        conv[0]["content"][0]["detail"] = detail
    return conv


def test_detail_sets_the_image_tokens_and_the_answer_follows(server, local_vlm):
    s, vlm = server("onevision"), local_vlm("onevision")
    client = s.client()
    usage = {}
    for detail in (None, "auto", "low", "high"):
        r = client.chat.completions.create(model="onevision", messages=_message(detail), max_tokens=6, temperature=0)
        want = vlm.chat(_local(detail), max_new_tokens=6, temperature=0)
        assert r.choices[0].message.content == want.text
        usage[detail] = r.usage.prompt_tokens
        assert usage[detail] == len(vlm.processor.encode(_local(detail)).input_ids)
    base = vlm.config.image_features_per_tile
    assert usage[None] == usage["auto"] == usage["high"] > usage["low"]
    assert usage["auto"] - usage["low"] == vlm.image_layout(IMAGE)["tokens"] - (base + 1)


@pytest.fixture(scope="module")
def low_server(checkpoint, local_vlm, tmp_path_factory):
    """A server whose images default to low, with a budget just under the test image's any-res cost."""
    vlm = local_vlm("onevision")
    cap = vlm.image_layout(IMAGE)["tokens"] - 1
    s = Server(checkpoint("onevision"), "onevision", ["--default-image-detail", "low", "--max-image-tokens", str(cap)],
               tmp_path_factory.mktemp("logs") / "low.log")
    yield s, cap
    assert s.stop() == 0, s.log_tail()


def test_default_detail_and_the_token_budget(low_server, local_vlm):
    s, cap = low_server
    vlm = local_vlm("onevision")
    low = len(vlm.processor.encode(_local("low")).input_ids)
    client = s.client()
    for detail in (None, "auto"):  # the default is low; auto is over the budget, so low too
        r = client.chat.completions.create(model="onevision", messages=_message(detail), max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens == low
    status, body, _ = s.post({"model": "onevision", "messages": _message("high"), "max_tokens": 2})
    assert status == 400
    tokens = vlm.image_layout(IMAGE)["tokens"]
    assert body["error"]["message"] == (
        f"image 0 (90x40) costs {tokens} tokens with detail 'high', more than the limit of {cap} image tokens; "
        "send it with detail 'low' or 'auto', or raise the limit.")
