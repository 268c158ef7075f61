"""Training loss and gradients against transformers (float32), and label masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.train.data import IGNORE, DataError, collate, encode_example, to_messages
from llavakit.train.objective import enable_checkpointing, loss_sum, mean_loss
from llavakit.weights import canonical_key

REL = 1e-5


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _convs():
    a = [
        {"role": "user", "content": [{"type": "image", "image": _image(1, 50, 33)},
                                     {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat sits on a red mat."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many people are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two people walk along the beach."}]},
    ]
    b = [
        {"role": "user", "content": [{"type": "image", "image": _image(2, 20, 40)},
                                     {"type": "text", "text": "Describe the image in detail."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "There is a dog and a tree."}]},
    ]
    return [a, b]


def _fresh(checkpoint, name):
    from reference import load_reference

    path = checkpoint(name)
    ref, proc = load_reference(path)
    return llavakit.load(path, dtype=torch.float32), ref, proc


@pytest.mark.parametrize("name", ["llama", "next_mistral", "onevision"])
def test_loss_and_gradients_match_transformers(checkpoint, name):
    vlm, ref, proc = _fresh(checkpoint, name)
    convs = _convs()
    examples = [encode_example(vlm.processor, c) for c in convs]
    ref_in = proc.apply_chat_template(convs, add_generation_prompt=False, tokenize=True, return_dict=True,
                                      return_tensors="pt", padding=True)
    eos = vlm.processor.tokenizer.token_id(vlm.processor.tokenizer.eos_token)
    for row, e in enumerate(examples):
        real = ref_in["input_ids"][row][ref_in["attention_mask"][row].bool()].tolist()
        if name == "llama":  # its template ends answers without EOS; training appends it
            assert e.input_ids.count(eos) == 2 * row or e.input_ids.count(eos) == 2 - row
            assert [i for i in e.input_ids if i != eos] == real
        else:
            assert e.input_ids == real  # our ids are the reference processor's
    batch = collate(examples, vlm.processor.pad_token_id)
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    extra = {k: v for k, v in ref_in.items() if k not in ("input_ids", "attention_mask")}
    ref.train()
    out = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              labels=labels, **extra)
    out.loss.backward()

    model = vlm.model
    model.train()
    loss = mean_loss(model, batch)
    loss.backward()
    assert abs(loss.item() - out.loss.item()) <= REL * abs(out.loss.item())

    ours = dict(model.named_parameters())
    pairs = {}
    for key, p in ref.named_parameters():
        mine = ours.get(canonical_key(key))
        assert mine is not None, key
        pairs[key] = tuple(g if g is not None else torch.zeros_like(p) for g in (mine.grad, p.grad))
    overall = max(float(r.abs().max()) for _, r in pairs.values())
    num = sum(float(((g - r) ** 2).sum()) for g, r in pairs.values()) ** 0.5
    den = sum(float((r**2).sum()) for _, r in pairs.values()) ** 0.5
    assert num <= REL * den  # all gradients together
    compared = 0
    for key, (g, r) in pairs.items():
        if "vision_tower" in key and key.endswith("k_proj.bias"):
            # Zero in exact arithmetic (without rotary positions a key bias shifts all scores of a row alike, softmax ignores
            # that): both sides hold rounding noise only.
            assert max(float(g.abs().max()), float(r.abs().max())) <= 1e-6 * overall, key
            continue
        # Per tensor, relative to its own scale (floored far below the largest gradient).
        scale = max(float(r.abs().max()), 1e-3 * overall)
        assert float((g - r).abs().max()) <= REL * scale, key
        compared += float(r.abs().max()) > 1e-3 * overall
    assert compared > 20  # the gradients really flowed through tower, projector and decoder


def test_checkpointing_gives_the_same_gradients(checkpoint):
    path = checkpoint("onevision")
    grads = []
    for use in (False, True):
        vlm = llavakit.load(path, dtype=torch.float32)
        if use:
            enable_checkpointing(vlm.model)
        batch = collate([encode_example(vlm.processor, c) for c in _convs()], vlm.processor.pad_token_id)
        total, n = loss_sum(vlm.model, batch)
        (total / n).backward()
        grads.append({k: p.grad.clone() for k, p in vlm.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-7, rtol=1e-5), k


def _targets(vlm, conv):
    e = encode_example(vlm.processor, conv)
    return vlm.processor.tokenizer.decode([t for t in e.labels if t != IGNORE], skip_special_tokens=False), e


@pytest.mark.parametrize("name", ["llama", "onevision"])
def test_only_assistant_tokens_are_targets(models, name):
    vlm = models(name)[0]
    eos = vlm.processor.tokenizer.eos_token if name == "llama" else "<|im_end|>"
    # single turn, with an image
    text, e = _targets(vlm, _convs()[1])
    lead = " " if name == "llama" else ""  # "ASSISTANT:" is the prompt, the answer's space its first token
    assert text == lead + "There is a dog and a tree." + eos
    assert sum(1 for t in e.labels if t != IGNORE) < len(e.labels) // 3
    # multi-turn, with an image: both answers and nothing of the questions or the image
    text, e = _targets(vlm, _convs()[0])
    assert "A cat sits on a red mat." in text and "Two people walk along the beach." in text
    assert "How many" not in text and "picture" not in text and "<image>" not in text
    # without images, with a system prompt
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say yes."},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Say no."},
            {"role": "assistant", "content": "No."}]
    text, e = _targets(vlm, conv)
    assert text == lead + "Yes." + eos + lead + "No." + eos
    assert e.pixel_values is None


def test_llava_format_records(tmp_path, models):
    vlm = models("onevision")[0]
    _image(3, 30, 30).save(tmp_path / "a.png")
    _image(4, 30, 30).save(tmp_path / "b.png")
    rec = {"id": "x", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich has more shapes?"}, {"from": "gpt", "value": "the first"}]}
    msgs = to_messages(rec, tmp_path)
    assert [p["type"] for p in msgs[0]["content"]] == ["image", "image", "text"]
    assert msgs[0]["content"][0]["image"] == str(tmp_path / "a.png")
    assert msgs[0]["content"][2]["text"] == "Which has more shapes?"
    e = encode_example(vlm.processor, msgs)
    assert e.image_tiled == (False, False)  # several images: one square tile each, as at inference
    text, _ = _targets(vlm, msgs)
    assert text == "the first<|im_end|>"
    with pytest.raises(DataError, match="1 <image> marker"):
        to_messages({"image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}, tmp_path)
    with pytest.raises(DataError, match="no assistant answer"):
        encode_example(vlm.processor, to_messages({"conversations": [{"from": "human", "value": "Hi"}]}, tmp_path))
    with pytest.raises(DataError, match="more than --max-length 5"):
        encode_example(vlm.processor, msgs, max_length=5)
