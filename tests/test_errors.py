"""Every documented error type is raised for its kind of bad input, with a message that names the problem."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import llavakit
from llavakit import (
    ConfigError,
    GenerationError,
    ImageError,
    LlavakitError,
    PromptError,
    TokenFeatureMismatch,
    VideoError,
    WeightsError,
)

IMG = Image.fromarray(np.random.default_rng(30).integers(0, 256, (40, 70, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vlm(checkpoint):
    return llavakit.load(checkpoint("llama"), dtype=torch.float32)


@pytest.fixture
def copy(checkpoint, tmp_path):
    """A private copy of the llama checkpoint, safe to corrupt."""
    return shutil.copytree(checkpoint("llama"), tmp_path / "ckpt")


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


# ───────────────────────────── hierarchy ─────────────────────────────


@pytest.mark.parametrize("cls", [ConfigError, WeightsError, ImageError, VideoError, PromptError,
                                 TokenFeatureMismatch, GenerationError])
def test_hierarchy(cls):
    assert issubclass(cls, LlavakitError) and issubclass(cls, ValueError)
    assert cls is not LlavakitError
    assert getattr(llavakit, cls.__name__) is cls


def test_token_feature_mismatch_is_a_prompt_error():
    assert issubclass(TokenFeatureMismatch, PromptError)


# ───────────────────────────── tokens vs features ─────────────────────────────


def test_token_feature_mismatch_names_both_counts(vlm):
    image_id = vlm.config.image_token_id
    ids = torch.tensor([[1] + [image_id] * 7 + [30, 31]])
    feats = torch.zeros(16, vlm.config.text.hidden_size)
    with pytest.raises(TokenFeatureMismatch) as info:
        vlm.model.embed(ids, feats)
    msg = str(info.value)
    assert re.search(r"\b7\b", msg) and re.search(r"\b16\b", msg), msg


def test_token_feature_mismatch_without_features(vlm):
    ids = torch.tensor([[1, vlm.config.image_token_id, vlm.config.image_token_id, 30]])
    with pytest.raises(TokenFeatureMismatch) as info:
        vlm.model.embed(ids, None)
    assert re.search(r"\b2\b", str(info.value)) and re.search(r"\b0\b", str(info.value))


def test_token_feature_match_is_fine(vlm):
    ids = torch.tensor([[1] + [vlm.config.image_token_id] * 3 + [30]])
    out = vlm.model.embed(ids, torch.ones(3, vlm.config.text.hidden_size))
    assert out.shape == (1, 5, vlm.config.text.hidden_size) and torch.all(out[0, 1:4] == 1)


@pytest.mark.parametrize("images", [0, 1])
def test_literal_image_placeholder_in_text(vlm, images):
    """Typed `<image>` is plain text by default; parsed as the placeholder (opt-in) it must pair with an image."""
    parts = [{"type": "image", "image": IMG}] * images + [{"type": "text", "text": "look <image> here"}]
    typed = vlm.prepare([_user(*parts)]).input_ids
    without = vlm.prepare([_user(*parts[:images], {"type": "text", "text": "look here"})]).input_ids
    image_id = vlm.config.image_token_id
    assert int((typed == image_id).sum()) == int((without == image_id).sum())  # only real images' tokens
    assert typed.shape[1] > without.shape[1]  # "<image>" is there, as text
    with pytest.raises(PromptError) as info:
        vlm.prepare([_user(*parts)], parse_special_tokens_in_content=True)
    assert "<image>" in str(info.value)
    with pytest.raises(PromptError):
        vlm.chat(_user(*parts), max_new_tokens=2, parse_special_tokens_in_content=True)


# ───────────────────────────── weights ─────────────────────────────


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_missing_key(copy):
    path = copy / "model.safetensors"
    tensors = _tensors(path)
    gone = "language_model.model.layers.1.mlp.down_proj.weight"
    del tensors[gone]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as info:
        llavakit.load(copy)
    msg = str(info.value)
    assert "missing" in msg and "layers.1.mlp.down_proj.weight" in msg, msg
    assert "unexpected" not in msg


def test_unexpected_key(copy):
    path = copy / "model.safetensors"
    tensors = _tensors(path)
    extra = "language_model.model.layers.0.self_attn.foo_proj.weight"
    tensors[extra] = torch.zeros(4, 4)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as info:
        llavakit.load(copy)
    msg = str(info.value)
    assert "unexpected" in msg and extra in msg, msg
    assert "missing" not in msg


def test_wrong_shape(copy):
    path = copy / "model.safetensors"
    tensors = _tensors(path)
    key = "multi_modal_projector.linear_2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="linear_2"):
        llavakit.load(copy)


def test_truncated_safetensors(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        llavakit.load(copy)


def test_garbage_safetensors(copy):
    path = copy / "model.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match="model.safetensors"):
        llavakit.load(copy)


def test_no_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        llavakit.load(copy)


def test_shard_index_names_missing_shard(copy, tmp_path):
    vlm = llavakit.load(copy, dtype=torch.float32)
    out = vlm.save_pretrained(tmp_path / "sharded", max_shard_bytes=50_000)
    victim = sorted(out.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=re.escape(victim.name)):
        llavakit.load(out)


# ───────────────────────────── config ─────────────────────────────


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_unknown_model_type(copy):
    _edit_config(copy, lambda c: c.update(model_type="llava_foo"))
    with pytest.raises(ConfigError) as info:
        llavakit.load(copy)
    msg = str(info.value)
    assert "llava_foo" in msg
    assert re.search(r"llava(?!_foo)", msg), f"the message should name the supported 'llava': {msg}"


def test_unsupported_text_model(copy):
    _edit_config(copy, lambda c: c["text_config"].update(model_type="gemma"))
    with pytest.raises(ConfigError) as info:
        llavakit.load(copy)
    msg = str(info.value)
    assert "gemma" in msg and "llama" in msg and "qwen2" in msg, msg


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type(copy, spelling):
    def edit(c):
        text = c["text_config"]
        if spelling == "rope_parameters":
            text["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}
        else:
            text.pop("rope_parameters")
            text["rope_scaling"] = {"type": "dynamic", "factor": 2.0}

    _edit_config(copy, edit)
    with pytest.raises(ConfigError) as info:
        llavakit.load(copy)
    bad = "yarn" if spelling == "rope_parameters" else "dynamic"
    assert bad in str(info.value) and "rope" in str(info.value)


def test_unsupported_vision_model(copy):
    _edit_config(copy, lambda c: c["vision_config"].update(model_type="pixtral"))
    with pytest.raises(ConfigError, match="'pixtral' is not supported; supported: clip_vision_model"):
        llavakit.load(copy)


def test_weights_of_another_tower_are_refused(copy):
    """CLIP weights under a SigLIP config: the class token and pre-norm are unexpected, shapes differ."""
    _edit_config(copy, lambda c: c["vision_config"].update(model_type="siglip_vision_model"))
    with pytest.raises(WeightsError, match="do not match"):
        llavakit.load(copy)


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        llavakit.load(copy)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError):
        llavakit.load(tmp_path)  # a folder without config.json
    with pytest.raises(ConfigError):
        llavakit.load(tmp_path / "no" / "such" / "folder")


# ───────────────────────────── images ─────────────────────────────


def test_unreadable_image_path(vlm, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError):
        vlm.chat(_user({"type": "image", "image": str(missing)}, {"type": "text", "text": "hi"}), max_new_tokens=2)


def test_corrupt_image_file(vlm, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    with pytest.raises(ImageError):
        vlm.prepare([_user({"type": "image", "path": str(bad)}, {"type": "text", "text": "hi"})])


# ───────────────────────────── messages ─────────────────────────────


@pytest.mark.parametrize(
    "conv, needle",
    [
        ([], "non-empty"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user</s>", "content": "hi"}], "a role is a word of letters"),  # any word passes to the template
        (_user({"type": "audio", "audio": "x.wav"}), "audio"),
        (_user({"type": "text", "text": 3}), "text"),
        (_user({"type": "image"}), "image"),
        ([{"role": "user", "content": 42}], "content"),
        ("just a string", "list"),
    ],
    ids=["empty", "no_role", "no_content", "bad_role", "bad_part", "text_not_str", "image_no_source",
         "content_not_list", "not_a_list"],
)
def test_malformed_messages(vlm, conv, needle):
    with pytest.raises(PromptError) as info:
        vlm.prepare([conv])
    assert needle in str(info.value)
    with pytest.raises(PromptError):
        vlm.chat(conv, max_new_tokens=2)


def test_empty_batch(vlm):
    with pytest.raises(PromptError):
        vlm.prepare([])
    with pytest.raises(PromptError, match="wrap a single one in a list"):
        vlm.prepare(_user({"type": "text", "text": "hi"}))  # a single conversation not wrapped in a list


def test_bad_input_does_not_poison_the_model(vlm):
    """After every error above, the same VLM still answers (errors are raised before any state changes)."""
    with pytest.raises(PromptError):
        vlm.generate([_user({"type": "text", "text": "ok"}), []])
    out = vlm.chat(_user({"type": "text", "text": "ok"}), max_new_tokens=3)
    assert len(out.token_ids) == 3
