"""Original-format checkpoints (liuhaotian / lmms-lab): loading, templates, conversion both ways."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import llavakit
from llavakit import original
from llavakit.convert import convert
from llavakit.errors import ConfigError
from llavakit.weights import canonical_key, read_tensors
from original_format import write_original
from reference import load_reference, make_llava, make_llava_next, make_llava_onevision

LOGITS_ATOL = 1e-4


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


CONV = [{"role": "user", "content": [{"type": "image", "image": _image(0, 50, 33)},
                                     {"type": "text", "text": "What is in the picture?"}]}]

VARIANTS = {  # name: (llava-hf builder and arguments, tower stored in the checkpoint)
    "llava15_pad": (lambda p: make_llava(p, family="llama", pad=True, seed=3), False),
    "next_stored": (lambda p: make_llava_next(p, family="mistral", seed=4), True),
    "onevision_stored": (lambda p: make_llava_onevision(p, seed=5), True),
    "onevision_tower_folder": (lambda p: make_llava_onevision(p, seed=6), False),
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """twins(name) -> (original folder, llava-hf folder, original vlm, reference model, reference processor)."""
    cache = {}

    def get(name):
        if name not in cache:
            build, stored = VARIANTS[name]
            root = tmp_path_factory.mktemp(name)
            hf = build(root / "hf")
            orig = write_original(hf, root / "orig", store_tower=stored)
            ref, proc = load_reference(hf)
            cache[name] = (orig, hf, llavakit.load(orig, dtype=torch.float32), ref, proc)
        return cache[name]

    return get


def _reference_inputs(vlm, batch, ref):
    """The original batch as transformers takes it: the llava-hf image token id, its pixel layout."""
    ids = batch.input_ids.clone()
    ids[ids == original.IMAGE_PLACEHOLDER_ID] = ref.config.image_token_id
    inputs = {"input_ids": ids}
    if vlm.config.model_type == "llava":
        inputs["pixel_values"] = batch.pixel_values
    else:
        inputs["pixel_values"] = batch.pixel_values[None]
        inputs["image_sizes"] = torch.tensor(batch.image_sizes)
    return inputs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_greedy_match_the_llava_hf_twin(twins, name):
    _, _, vlm, ref, _ = twins(name)
    batch = vlm.prepare([CONV])
    assert int((batch.input_ids == original.IMAGE_PLACEHOLDER_ID).sum()) > 0
    inputs = _reference_inputs(vlm, batch, ref)
    with torch.no_grad():
        want = ref(**inputs).logits
    assert float((vlm.forward(batch) - want).abs().max()) <= LOGITS_ATOL
    with torch.no_grad():
        gen = ref.generate(**inputs, max_new_tokens=20, do_sample=False)[0, batch.input_ids.shape[1]:].tolist()
    got = vlm.chat(CONV, max_new_tokens=20).token_ids
    cut = next((i + 1 for i, t in enumerate(gen) if t in vlm.eos_ids), len(gen))
    assert got == gen[:cut]


def test_pad_preprocessing_is_the_original_expand_to_square(twins):
    _, _, vlm, _, proc = twins("llava15_pad")
    image = CONV[0]["content"][0]["image"]
    want = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]  # LlavaImageProcessor(do_pad)
    assert float((vlm.prepare([CONV]).pixel_values - want).abs().max()) <= 1e-5
    # and it is not the centre crop of llava-hf's published processors
    from transformers import CLIPImageProcessor

    crop = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(images=[image],
                                                                                                return_tensors="pt")
    assert float((crop["pixel_values"] - want).abs().max()) > 0.1


def test_prompt_is_tokenized_chunk_by_chunk(twins):
    """As the original tokenizer_image_token: each chunk alone, BOS once, -200 between."""
    from tokenizers import Tokenizer

    orig, _, vlm, _, _ = twins("llava15_pad")
    text, _ = vlm.processor.render(CONV)
    tok = Tokenizer.from_file(str(orig / "tokenizer.json"))
    chunks = [tok.encode(c).ids for c in text.split("<image>")]
    want = chunks[0] + [-200] * vlm.config.image_features_per_tile + chunks[1][1:]  # drop the chunk's own BOS
    assert vlm.prepare([CONV]).input_ids[0].tolist() == want


TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
    {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
]
LLAVA_SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions.")
EXPECTED = {  # what the original repositories' Conversation.get_prompt() returns for TURNS
    "llava_v1": LLAVA_SYS + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "mistral_instruct": "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]",
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
                      "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"),
    "qwen_1_5": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n"
                 "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"),
    "llava_llama_3": ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
                      "You are able to understand the visual content that the user provides, and assist the user "
                      "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user"
                      "<|end_header_id|>\n\n<image>\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                      "A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_conversation_templates_render_as_the_original(name):
    from llavakit.processing.prompt import render_template

    assert render_template(original.TEMPLATES[name], TURNS, True, {}) == EXPECTED[name]


def test_system_message_replaces_the_default():
    from llavakit.processing.prompt import render_template

    turns = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + TURNS[:1]
    assert render_template(original.TEMPLATES["vicuna_v1"], turns, True, {}) == "Be brief. USER: <image>\nQ1 ASSISTANT:"
    assert render_template(original.TEMPLATES["mistral_instruct"], turns, True, {}) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nQ1 [/INST]")


@pytest.mark.parametrize("name, template", [
    ("liuhaotian/llava-v1.5-7b", "llava_v1"), ("liuhaotian/llava-v1.6-mistral-7b", "mistral_instruct"),
    ("liuhaotian/llava-v1.6-34b", "chatml_direct"), ("lmms-lab/llama3-llava-next-8b", "llava_llama_3"),
    ("lmms-lab/llava-onevision-qwen2-0.5b-ov", "qwen_1_5"),
])
def test_template_follows_the_model_name(name, template):
    assert original.pick_template(name, "llama", None) == template
    assert original.pick_template(name, "llama", "vicuna_v1") == "vicuna_v1"


def _canonical(folder):
    return {canonical_key(k): t for k, t in read_tensors(folder)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_to_original_to_hf_is_lossless(twins, name, tmp_path):
    _, hf, _, ref, _ = twins(name)
    convert(hf, tmp_path / "orig", "original")
    convert(tmp_path / "orig", tmp_path / "back", "hf")
    a, b = _canonical(hf), _canonical(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # the written original-format folder loads and answers like the llava-hf one
    vlm = llavakit.load(tmp_path / "orig", dtype=torch.float32)
    batch = vlm.prepare([CONV])
    with torch.no_grad():
        want = ref(**_reference_inputs(vlm, batch, ref)).logits
    assert float((vlm.forward(batch) - want).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_original_to_hf_loads_in_transformers(twins, name, tmp_path):
    orig, _, vlm, ref, _ = twins(name)
    convert(orig, tmp_path / "hf", "hf")
    converted, proc = load_reference(tmp_path / "hf")
    batch = vlm.prepare([CONV])
    inputs = _reference_inputs(vlm, batch, converted)
    with torch.no_grad():
        want = ref(**_reference_inputs(vlm, batch, ref)).logits
        got = converted(**inputs).logits
    assert float((got - want).abs().max()) <= LOGITS_ATOL
    # and llavakit reads the converted folder through its llava-hf path
    assert llavakit.load(tmp_path / "hf", dtype=torch.float32).config.model_type == vlm.config.model_type


def test_original_to_hf_grows_the_vocabulary_and_back(twins, tmp_path):
    """A tokenizer without `<image>` and no spare embedding rows: rows are added, then cut again."""
    orig, _, vlm, _, _ = twins("llava15_pad")
    src = tmp_path / "src"
    import shutil

    shutil.copytree(orig, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<image>":
            added["content"] = "<img-unused>"
    tok["model"]["vocab"]["<img-unused>"] = tok["model"]["vocab"].pop("<image>")
    (src / "tokenizer.json").write_text(json.dumps(tok))
    n_tokens = len(tok["model"]["vocab"])
    weights = load_file(str(src / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key][:n_tokens].clone()
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = n_tokens
    (src / "config.json").write_text(json.dumps(config))

    convert(src, tmp_path / "hf", "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["image_token_index"] == n_tokens
    assert hf_config["text_config"]["vocab_size"] == -(-(n_tokens + 1) // 64) * 64
    small = llavakit.load(src, dtype=torch.float32)
    big = llavakit.load(tmp_path / "hf", dtype=torch.float32)
    batch = small.prepare([CONV])
    ids = batch.input_ids.clone()
    ids[ids == original.IMAGE_PLACEHOLDER_ID] = n_tokens
    got = big.forward(dataclasses.replace(batch, input_ids=ids))
    assert float((got[..., :n_tokens] - small.forward(batch)).abs().max()) <= LOGITS_ATOL

    convert(tmp_path / "hf", tmp_path / "back", "original")
    a, b = dict(read_tensors(src)), dict(read_tensors(tmp_path / "back"))
    assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("patch, message", [
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' is not supported"),
    ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"}, "is not supported; supported: pad/square"),
    ({"mm_vision_tower": "no/such-tower"}, "neither a local folder nor a known tower"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls' is not supported"),
])
def test_unsupported_original_configs_name_field_and_value(twins, tmp_path, patch, message):
    import shutil

    orig = twins("llava15_pad")[0]
    shutil.copytree(orig, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config.update(patch)
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        llavakit.load(tmp_path / "bad")


def test_unknown_template_and_convert_errors(twins, tmp_path):
    orig, hf, _, _, _ = twins("llava15_pad")
    with pytest.raises(ConfigError, match="conversation template 'nope' is not known"):
        llavakit.load(orig, conv_template="nope")
    with pytest.raises(ConfigError, match="already in the llava-hf format"):
        convert(hf, tmp_path / "x", "hf")
    with pytest.raises(ConfigError, match="apply to original-format checkpoints only"):
        llavakit.load(hf, conv_template="llava_v1")


def test_cli_convert_and_chat(twins, tmp_path):
    orig, _, vlm, _, _ = twins("next_stored")
    res = subprocess.run([sys.executable, "-m", "llavakit", "convert", "--to", "hf", str(orig), str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    picture = tmp_path / "p.png"
    CONV[0]["content"][0]["image"].save(picture)
    res = subprocess.run([sys.executable, "-m", "llavakit", "chat", "--model", str(orig), "--dtype", "float32",
                          "--conv-template", "mistral_instruct", "--image", str(picture), "--max-new-tokens", "8",
                          "What is in the picture?"], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    conv = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                         {"type": "text", "text": "What is in the picture?"}]}]
    assert res.stdout.decode() == vlm.chat(conv, max_new_tokens=8).text + "\n"
