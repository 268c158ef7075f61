"""Chat templates, placeholder expansion, tokenization and processor-file layouts vs transformers."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import PromptError
from llavakit.processing.prompt import DEFAULT_TEMPLATES, expand_image_tokens, render_template, split_conversation
from reference import load_reference


def _img(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
    "text only": [{"role": "user", "content": "Hello there, how are you?"}],
    "multi-turn, system, two images": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is brighter."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why? 日本語 ünï 🙂"}]},
    ],
}


def _with_images(conv):
    """Give every image part a PIL image (distinct sizes), as a user would."""
    out, k = [], 0
    for m in conv:
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        parts = []
        for p in content:
            if p["type"] == "image":
                parts.append({"type": "image", "image": _img(40 + 30 * k, 70 - 10 * k, seed=k)})
                k += 1
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


@pytest.fixture(scope="module")
def pair(checkpoint):
    path = checkpoint("llama")
    return llavakit.load(path, dtype=torch.float32), load_reference(path)[1]


@pytest.mark.parametrize("parse_special", [False, True], ids=["content as text", "content specials parsed"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendered_prompt_and_ids_match_transformers(pair, name, parse_special):
    """The messages hold no special-token text, so both tokenizations of message text give transformers' ids."""
    vlm, proc = pair
    conv = _with_images(CONVERSATIONS[name])
    text, parsed = vlm.processor.render(conv)
    images = parsed.images
    assert text == proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    ref = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    batch = vlm.prepare([conv], parse_special_tokens_in_content=parse_special)
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    if images:
        assert float((batch.pixel_values - ref["pixel_values"]).abs().max()) <= 1e-5
    else:
        assert batch.pixel_values is None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_default_templates_render_the_published_formats(family):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = render_template(DEFAULT_TEMPLATES[family], conv, True, {"eos_token": "</s>", "bos_token": "<s>"})
    assert text == {
        "llama": "USER: <image>\nWhat is shown? ASSISTANT:",
        "mistral": "[INST] <image>\nWhat is shown? [/INST]",
        "qwen2": "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n",
    }[family]


def test_published_file_layout_loads_like_transformers(checkpoint, tmp_path):
    """preprocessor_config.json + chat_template.json, as on the hub, instead of transformers 5's files."""
    src = checkpoint("llama")
    dst = tmp_path / "published"
    shutil.copytree(src, dst)
    proc_cfg = json.loads((dst / "processor_config.json").read_text())
    (dst / "preprocessor_config.json").write_text(json.dumps(proc_cfg.pop("image_processor")))
    (dst / "processor_config.json").write_text(json.dumps(proc_cfg))
    template = (dst / "chat_template.jinja").read_text()
    (dst / "chat_template.jinja").unlink()
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    vlm = llavakit.load(dst, dtype=torch.float32)
    _, proc = load_reference(dst)
    conv = _with_images(CONVERSATIONS["multi-turn, system, two images"])
    ref = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    batch = vlm.prepare([conv])
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    assert float((batch.pixel_values - ref["pixel_values"]).abs().max()) <= 1e-5


def test_missing_template_falls_back_to_the_family_default(checkpoint, tmp_path):
    dst = tmp_path / "no_template"
    shutil.copytree(checkpoint("qwen2"), dst)
    (dst / "chat_template.jinja").unlink()
    vlm = llavakit.load(dst, dtype=torch.float32)
    text, _ = vlm.processor.render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_image_sources_in_every_spelling():
    images = split_conversation([{"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "image", "url": "https://x/b.png"},
        {"type": "image", "path": "c.png"}, {"type": "image", "base64": "QUJD"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
        {"type": "text", "text": "?"}]}]).images
    assert images == ["a.png", "https://x/b.png", "c.png", "QUJD", "data:image/png;base64,QUJD"]


def test_expansion_counts_placeholders():
    assert expand_image_tokens("a<image>b<image>", "<image>", [2, 3]) == "a<image><image>b<image><image><image>"
    with pytest.raises(PromptError, match="2 <image> placeholder\\(s\\) but 1 image"):
        expand_image_tokens("a<image>b<image>", "<image>", [2])


def test_literal_placeholder_in_user_text(pair):
    """Plain text by default; a placeholder without its image when special tokens in messages are parsed."""
    vlm, _ = pair
    conv = [{"role": "user", "content": [{"type": "image", "image": _img(30, 30)},
                                         {"type": "text", "text": "see <image> here"}]}]
    ids = vlm.prepare([conv]).input_ids[0].tolist()
    assert ids.count(vlm.config.image_token_id) == vlm.processor.features_per_image
    with pytest.raises(PromptError, match="placeholder"):
        vlm.prepare([conv], parse_special_tokens_in_content=True)
