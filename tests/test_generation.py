"""Generation: greedy parity with transformers' `generate`, batching, streaming, stop conditions, sampling.

Greedy token sequences must be identical to the reference's; a row of a batch must produce exactly
what it produces alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit import GenerationError, SamplingParams
from llavakit.api import VLM
from llavakit.processing.prompt import StreamDecoder

FAMILIES = ["llama", "mistral", "qwen2"]
NEW = 24


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(text: str, images=()) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


IMG_A, IMG_B, IMG_C = _image(10, 70, 40), _image(11, 33, 90), _image(12, 64, 64)
PROMPTS = {
    "one_image": _conv("What is in the picture?", [IMG_A]),
    "two_images": _conv("Describe the image in detail. How many people are there?", [IMG_B, IMG_C]),
    "no_image": _conv("The quick brown fox jumps over the lazy dog."),
}
SAMPLED = dict(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.9)




def _ref_generate(ref, proc, conv, **kwargs) -> list[int]:
    """New token ids of transformers' generate, up to and including the first EOS."""
    inputs = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    eos = kwargs.get("eos_token_id", 2)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def _check_finish(out, eos_ids):
    if out.token_ids and out.token_ids[-1] in eos_ids:
        assert out.finish_reason == "stop"
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == NEW
    assert out.completion_tokens == len(out.token_ids)


# ───────────────────────────── greedy parity ─────────────────────────────


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers(models, name, prompt):
    vlm, ref, proc = models(name)
    conv = PROMPTS[prompt]
    out = vlm.chat(conv, max_new_tokens=NEW, temperature=0.0)
    expected = _ref_generate(ref, proc, conv)
    assert out.token_ids == expected
    assert len(out.token_ids) >= 20 or out.token_ids[-1] == 2
    _check_finish(out, vlm.eos_ids)
    assert out.prompt_tokens == vlm.prepare([conv]).input_ids.shape[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_stops_at_eos_like_transformers(models, name):
    """Make a token the greedy path emits mid-way the EOS: both stop on it, and it is not in the text."""
    vlm, ref, proc = models(name)
    conv = PROMPTS["one_image"]
    full = vlm.chat(conv, max_new_tokens=NEW).token_ids
    k = next(i for i in range(3, NEW) if full[i] not in full[:i])  # first occurrence at index k >= 3
    eos = full[k]
    vlm_eos = VLM(vlm.model, vlm.processor, vlm.config, vlm.folder, {eos})
    out = vlm_eos.chat(conv, max_new_tokens=NEW)
    assert out.token_ids == full[: k + 1]
    assert out.token_ids == _ref_generate(ref, proc, conv, eos_token_id=eos)
    assert out.finish_reason == "stop"
    tok = vlm.processor.tokenizer
    assert out.text == tok.decode(full[:k])


@pytest.mark.parametrize("name", FAMILIES)
def test_repetition_penalty_matches_transformers(models, name):
    vlm, ref, proc = models(name)
    conv = PROMPTS["one_image"]
    out = vlm.chat(conv, max_new_tokens=NEW, temperature=0.0, repetition_penalty=1.3)
    assert out.token_ids == _ref_generate(ref, proc, conv, repetition_penalty=1.3)
    # The penalty must matter on these repetitive random models, or the test proves nothing.
    assert out.token_ids != vlm.chat(conv, max_new_tokens=NEW).token_ids


# ───────────────────────────── batching ─────────────────────────────


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_rows_equal_alone(models, name):
    vlm = models(name)[0]
    convs = [PROMPTS["no_image"], PROMPTS["one_image"], PROMPTS["two_images"]]
    batch = vlm.prepare(convs)
    assert len(set(batch.attention_mask.sum(-1).tolist())) == 3  # different lengths: padding is exercised
    outs = vlm.generate(convs, SamplingParams(max_new_tokens=NEW))
    assert len(outs) == 3
    for conv, out in zip(convs, outs):
        alone = vlm.chat(conv, max_new_tokens=NEW, temperature=0.0)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert out.finish_reason == alone.finish_reason
        assert out.prompt_tokens == alone.prompt_tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_rows_equal_alone_with_repetition_penalty(models, name):
    """The penalty sees each row's own prompt and output, never the padding or the other rows."""
    vlm = models(name)[0]
    convs = [PROMPTS["two_images"], PROMPTS["no_image"]]
    outs = vlm.generate(convs, SamplingParams(max_new_tokens=NEW, repetition_penalty=1.3))
    for conv, out in zip(convs, outs):
        assert out.token_ids == vlm.chat(conv, max_new_tokens=NEW, repetition_penalty=1.3).token_ids


def test_batch_rows_with_different_lengths_finish_independently(models):
    vlm = models("llama")[0]
    convs = [PROMPTS["one_image"], PROMPTS["no_image"]]
    outs = vlm.generate(convs, [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=NEW)])
    assert [len(o.token_ids) for o in outs] == [3, NEW]
    assert outs[0].token_ids == vlm.chat(convs[0], max_new_tokens=NEW).token_ids[:3]
    assert outs[1].token_ids == vlm.chat(convs[1], max_new_tokens=NEW).token_ids


# ───────────────────────────── streaming and stopping ─────────────────────────────


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("name", FAMILIES)
def test_stream_joins_to_chat_text(models, name, prompt):
    vlm = models(name)[0]
    conv = PROMPTS[prompt]
    pieces = list(vlm.chat(conv, max_new_tokens=NEW, stream=True))
    out = vlm.chat(conv, max_new_tokens=NEW)
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == out.text


def _pick_stop(text: str) -> str:
    """An ASCII alphanumeric string of 2-3 characters whose first occurrence is not at the start."""
    for n in (3, 2):
        for i in range(1, len(text) - n + 1):
            s = text[i : i + n]
            if s.isascii() and s.isalnum() and text.find(s) == i:
                return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("name", FAMILIES)
def test_stop_string(models, name):
    vlm = models(name)[0]
    conv = next(c for c in PROMPTS.values() if len(vlm.chat(c, max_new_tokens=NEW).text) >= 6)
    full = vlm.chat(conv, max_new_tokens=NEW)
    stop = _pick_stop(full.text)
    cut = full.text.index(stop)
    out = vlm.chat(conv, max_new_tokens=NEW, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert stop not in out.text
    assert len(out.token_ids) < len(full.token_ids)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    # Streaming never leaks the stop string, even when it spans several tokens.
    assert "".join(vlm.chat(conv, max_new_tokens=NEW, stop=stop, stream=True)) == full.text[:cut]


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_gives_length(models, n):
    vlm = models("mistral")[0]
    out = vlm.chat(PROMPTS["one_image"], max_new_tokens=n)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == n and out.completion_tokens == n
    assert out.token_ids == vlm.chat(PROMPTS["one_image"], max_new_tokens=NEW).token_ids[:n]


# ───────────────────────────── sampling ─────────────────────────────


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_sampling_reproducible(models, name):
    vlm = models(name)[0]
    conv = PROMPTS["one_image"]
    a = vlm.chat(conv, seed=7, **SAMPLED)
    b = vlm.chat(conv, seed=7, **SAMPLED)
    c = vlm.chat(conv, seed=8, **SAMPLED)
    greedy = vlm.chat(conv, max_new_tokens=NEW)
    assert len(a.token_ids) == NEW or a.finish_reason == "stop"
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_sampling_alone_equals_in_batch(models, name):
    vlm = models(name)[0]
    conv = PROMPTS["one_image"]
    params = SamplingParams(seed=7, **SAMPLED)
    alone = vlm.generate([conv], params)[0]
    assert alone.token_ids == vlm.chat(conv, seed=7, **SAMPLED).token_ids
    others = [SamplingParams(seed=1, **SAMPLED), params, SamplingParams(max_new_tokens=NEW)]
    batch = vlm.generate([PROMPTS["two_images"], conv, PROMPTS["no_image"]], others)
    assert batch[1].token_ids == alone.token_ids
    assert batch[1].text == alone.text


def test_sampling_with_top_k_1_is_greedy(models):
    vlm = models("qwen2")[0]
    conv = PROMPTS["two_images"]
    out = vlm.chat(conv, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3)
    assert out.token_ids == vlm.chat(conv, max_new_tokens=NEW).token_ids


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(top_k=-1),
     dict(repetition_penalty=0.0), dict(stop=[""])],
    ids=lambda k: next(iter(k)) + "=" + repr(next(iter(k.values()))),
)
def test_invalid_sampling_params(models, kwargs):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(info.value)
    vlm = models("llama")[0]
    with pytest.raises(GenerationError):
        vlm.chat(PROMPTS["no_image"], **kwargs)


def test_generate_sampling_list_length_must_match(models):
    vlm = models("llama")[0]
    with pytest.raises(GenerationError):
        vlm.generate([PROMPTS["no_image"]] * 2, [SamplingParams()])


# ───────────────────────────── streaming detokenizer ─────────────────────────────


@pytest.mark.parametrize("name", FAMILIES)
def test_stream_decoder_utf8(models, name):
    tok = models(name)[0].processor.tokenizer
    text = "日本語 🙂 ünï, Ünïcödé tëxt"
    ids = tok.tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    # Some character must span several byte-level tokens, or nothing here is tested.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # a partial character is held back
    pieces.append(dec.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


# ───────────────────────────── long answers and the context limit ─────────────────────────────


def test_long_answer_grows_the_cache_and_matches_transformers(models):
    """Past the first cache allocation (256 new tokens) the answer still equals the reference's."""
    vlm, ref, proc = models("llama")
    conv = PROMPTS["one_image"]
    inputs = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    with torch.no_grad():  # an end-of-sequence id no token has: the reference never stops early either
        want = ref.generate(**inputs, max_new_tokens=300, do_sample=False, eos_token_id=10**6)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    got = vlm.chat(conv, sampling=SamplingParams(max_new_tokens=300, ignore_eos=True)).token_ids
    assert len(got) == 300 and got == want


def test_answers_end_at_the_context_limit(checkpoint, tmp_path):
    import json
    import shutil

    path = tmp_path / "short_context"
    shutil.copytree(checkpoint("llama"), path)
    vlm = llavakit.load(path, dtype=torch.float32)
    prompt_len = int(vlm.prepare([PROMPTS["one_image"]]).attention_mask.sum())
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = prompt_len + 5
    (path / "config.json").write_text(json.dumps(config))
    short = llavakit.load(path, dtype=torch.float32)
    out = short.chat(PROMPTS["one_image"], sampling=SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert (len(out.token_ids), out.finish_reason) == (5, "length")
    config["text_config"]["max_position_embeddings"] = prompt_len
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GenerationError, match=f"holds {prompt_len} tokens but the model's context is {prompt_len}"):
        llavakit.load(path, dtype=torch.float32).chat(PROMPTS["one_image"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(seed=2**70), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(top_p=float("nan")), "top_p must be a number"),
])
def test_sampling_param_types_are_checked(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)
