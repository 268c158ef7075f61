"""Tiny random LLaVA checkpoints built with transformers, the test-only reference.

Everything here imports transformers; llavakit itself never does. Each builder writes a
complete Hugging Face folder (config, safetensors, tokenizer, processor files, chat template)
with `save_pretrained`, exactly as a published checkpoint looks to a loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "What is in the picture? A cat sits on a red mat next to a blue ball.",
    "Describe the image in detail. There is a dog, a tree, and the sky is bright.",
    "How many people are there? Two people walk along the beach at sunset.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🙂 and symbols: {}[]()<>!?.,;:'\"",
    "USER: ASSISTANT: [INST] [/INST] system user assistant",
]

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(add_bos: bool, extra_special=()):
    """A byte-level BPE tokenizer trained on a small corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL + list(extra_special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _randomize(model) -> None:
    """Perturb every weight so a wrong one shows, and widen the matrices so that answers depend on context.

    With transformers' 0.02 init the residual stream is dominated by the input embedding and greedy
    decoding repeats one token whatever the image; six times wider matrices give varied answers, so
    token-for-token comparisons really test the image path.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
            if p.ndim >= 2 and "embed" not in name:
                p.mul_(6.0)


def tiny_tower(tower: str, image_size: int, patch_size: int):
    """The tiny CLIP ("clip") or SigLIP ("siglip") vision config every random checkpoint here uses."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    return (SiglipVisionConfig if tower == "siglip" else CLIPVisionConfig)(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-5,
    )


def text_config(family: str, vocab_size: int, **extra):
    """A tiny decoder config of the given family (llama, mistral, qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    common.update(extra)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**common)


def make_llava(
    out: Path,
    family: str = "llama",
    vision_feature_layer=-2,
    strategy: str = "default",
    image_size: int = 56,
    patch_size: int = 14,
    tie: bool = False,
    seed: int = 0,
    text_extra: dict | None = None,
    template: str | None = LLAVA_TEMPLATE,
    tower: str = "clip",
    projector_bias: bool = True,
    projector_act: str = "gelu",
    pad: bool = False,
) -> Path:
    """Write a tiny random `model_type: llava` checkpoint folder and return its path.

    tower "siglip" gives the llava-interleave layout: SigLIP, no class token, a plain resize.
    """
    from transformers import (
        CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor,
    )

    out = Path(out)
    tokenizer = build_tokenizer(add_bos=family != "qwen2")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer) + 12  # published vocabularies are padded past the tokenizer
    vision = tiny_tower(tower, image_size, patch_size)
    tcfg = text_config(family, vocab, tie_word_embeddings=tie, **(text_extra or {}))
    cfg = LlavaConfig(
        vision_config=vision, text_config=tcfg, image_token_index=image_id,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie, multimodal_projector_bias=projector_bias, projector_hidden_act=projector_act,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb everything so a wrong weight shows.
    _randomize(model)
    model.save_pretrained(out)
    if tower == "siglip":
        improc = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=3,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif pad:  # the original LLaVA-1.5 preprocessing: pad to a square of the mean colour first
        from transformers import LlavaImageProcessor

        improc = LlavaImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            resample=3, do_center_crop=True, do_pad=True,
        )
    else:
        improc = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            resample=3, do_center_crop=True,
        )
    proc = LlavaProcessor(
        image_processor=improc, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=0 if tower == "siglip" else 1,
        chat_template=template,
    )
    proc.save_pretrained(out)
    return out


# Tiny NeXT pinpoints for 28-pixel tiles: grids 1x2, 2x1, 2x2, 1x3, 3x1, as the published five.
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]

MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ ' ' + content['text'] + '</s> '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def make_llava_next(
    out: Path,
    family: str = "mistral",
    vision_feature_layer=-2,
    tile: int = 28,
    patch_size: int = 7,
    pinpoints=None,
    tie: bool = False,
    seed: int = 0,
    template: str | None = MISTRAL_TEMPLATE,
    tower: str = "clip",
) -> Path:
    """Write a tiny random `model_type: llava_next` checkpoint folder and return its path.

    tower "siglip" (no class token) goes with the `full` strategy, the only one it can tile with.
    """
    from transformers import (
        LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
    )

    out = Path(out)
    pinpoints = pinpoints or NEXT_PINPOINTS
    tokenizer = build_tokenizer(add_bos=family != "qwen2")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = tiny_tower(tower, tile, patch_size)
    strategy = "full" if tower == "siglip" else "default"
    tcfg = text_config(family, len(tokenizer) + 12, tie_word_embeddings=tie)
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=tcfg, image_token_index=image_id, image_grid_pinpoints=pinpoints,
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _randomize(model)
    with torch.no_grad():
        model.model.image_newline.normal_()  # its init is random already; make it clearly non-zero
    model.save_pretrained(out)
    improc = LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
        resample=3,
    )
    proc = LlavaNextProcessor(
        image_processor=improc, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=int(tower != "siglip"),
        chat_template=template,
    )
    proc.save_pretrained(out)
    return out


ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ONEVISION_TILE, ONEVISION_PATCH = 35, 7  # 5x5 patches: an odd grid, so video pooling rounds up (5 -> 3)


def onevision_pinpoints(tile: int = ONEVISION_TILE, max_grid: int = 6):
    """The published 36 pinpoints (grids 1x1 ... 6x6), scaled to a tiny tile."""
    return [[tile * h, tile * w] for h in range(1, max_grid + 1) for w in range(1, max_grid + 1)]


def make_llava_onevision(out: Path, vision_feature_layer=-1, max_tiles: int = 9, tie: bool = False, seed: int = 0,
                         template: str = ONEVISION_TEMPLATE) -> Path:
    """Write a tiny random `model_type: llava_onevision` checkpoint folder and return its path.

    transformers' OneVision processor cannot be built without torchvision (its video processor
    needs it), so the processor files are written as the published checkpoints have them.
    """
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        SiglipVisionConfig,
    )

    out = Path(out)
    tokenizer = build_tokenizer(add_bos=False, extra_special=["<video>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    vision = SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=ONEVISION_TILE, patch_size=ONEVISION_PATCH, vision_use_head=False,
    )
    tcfg = text_config("qwen2", len(tokenizer) + 12, tie_word_embeddings=tie)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=tcfg, image_token_index=image_id, video_token_index=video_id,
        image_grid_pinpoints=onevision_pinpoints(), vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{max_tiles}",
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _randomize(model)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.save_pretrained(out)
    improc = LlavaOnevisionImageProcessor(
        size={"height": ONEVISION_TILE, "width": ONEVISION_TILE}, image_grid_pinpoints=onevision_pinpoints(),
        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3,
    )
    improc.save_pretrained(out)  # preprocessor_config.json, as on the hub
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
        "num_image_tokens": (ONEVISION_TILE // ONEVISION_PATCH) ** 2, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": f"anyres_max_{max_tiles}",
    }))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return out


def _bare_processor(path: Path, cls_name: str, keys: tuple[str, ...]):
    """transformers' processor `cls_name` without its video processor (which needs torchvision).

    Built around its __init__ (which insists on a video processor) with the checkpoint's image
    processor and tokenizer, and `keys` of processor_config.json as attributes; images and text go
    through the real transformers code.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg = json.loads((Path(path) / "processor_config.json").read_text())
    proc = object.__new__(getattr(transformers, cls_name))
    proc.image_processor = AutoImageProcessor.from_pretrained(path)
    proc.tokenizer = AutoTokenizer.from_pretrained(path)
    proc.video_processor = None
    proc.chat_template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    for key in keys:
        setattr(proc, key, cfg[key])
    proc.image_token, proc.video_token = "<image>", "<video>"
    proc.image_token_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    proc.video_token_id = proc.tokenizer.convert_tokens_to_ids("<video>")
    return proc


def onevision_reference_processor(path: Path):
    """transformers' LlavaOnevisionProcessor for a checkpoint of make_llava_onevision (see _bare_processor)."""
    return _bare_processor(path, "LlavaOnevisionProcessor",
                           ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"))


# The published LLaVA-NeXT-Video template (llava-hf/LLaVA-NeXT-Video-7B-hf): media first, then text.
NEXT_VIDEO_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
NEXT_VIDEO_TILE, NEXT_VIDEO_PATCH = 42, 7  # 6x6 patches: pooled by 2 -> 3x3, by 3 -> 2x2, by 4 -> 1x1 (floor)


def make_llava_next_video(out: Path, family: str = "llama", pool_mode: str = "average", pool_stride: int = 2,
                          vision_feature_layer=-2, tower: str = "clip", tie: bool = False, seed: int = 0,
                          video_size: dict | None = None) -> Path:
    """Write a tiny random `model_type: llava_next_video` checkpoint folder and return its path.

    The video processor file is written as the published checkpoints have it (transformers' video
    processor class needs torchvision to be built; tests/video_reference.py runs it without).
    video_size: the frames' `size` (default: shortest edge = the tile, then a centre crop to the tile).
    """
    from transformers import (
        LlavaNextImageProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
    )

    out = Path(out)
    tokenizer = build_tokenizer(add_bos=family != "qwen2", extra_special=["<video>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    tile, patch = NEXT_VIDEO_TILE, NEXT_VIDEO_PATCH
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile], [3 * tile, tile]]
    vision = tiny_tower(tower, tile, patch)
    strategy = "full" if tower == "siglip" else "default"
    tcfg = text_config(family, len(tokenizer) + 12, tie_word_embeddings=tie)
    cfg = LlavaNextVideoConfig(
        vision_config=vision, text_config=tcfg, image_token_index=image_id, video_token_index=video_id,
        image_grid_pinpoints=pinpoints, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy, spatial_pool_mode=pool_mode, spatial_pool_stride=pool_stride,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    _randomize(model)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.save_pretrained(out)
    mean, std = ([0.5] * 3, [0.5] * 3) if tower == "siglip" else (None, None)
    improc = LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
        resample=3, **({"image_mean": mean, "image_std": std} if mean else {}),
    )
    improc.save_pretrained(out)
    tokenizer.save_pretrained(out)
    video = {"video_processor_type": "LlavaNextVideoVideoProcessor", "size": video_size or {"shortest_edge": tile},
             "crop_size": {"height": tile, "width": tile}, "do_center_crop": True, "resample": 3,
             "image_mean": list(improc.image_mean), "image_std": list(improc.image_std)}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaNextVideoProcessor", "image_token": "<image>", "video_token": "<video>",
        "patch_size": patch, "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": int(tower != "siglip"),
    }))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": NEXT_VIDEO_TEMPLATE}))
    return out


def next_video_reference_processor(path: Path):
    """transformers' LlavaNextVideoProcessor for a checkpoint of make_llava_next_video (see _bare_processor)."""
    return _bare_processor(path, "LlavaNextVideoProcessor",
                           ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"))


def load_reference(path: Path):
    """Load (model, processor) with transformers, float32, for comparison; the class follows config.json."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from transformers import LlavaOnevisionForConditionalGeneration

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    from transformers import LlavaNextVideoForConditionalGeneration

    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
           "llava_onevision": LlavaOnevisionForConditionalGeneration,
           "llava_next_video": LlavaNextVideoForConditionalGeneration}[model_type]
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    if model_type == "llava_onevision":
        return model, onevision_reference_processor(path)
    if model_type == "llava_next_video":
        return model, next_video_reference_processor(path)
    proc = AutoProcessor.from_pretrained(path)
    return model, proc


if __name__ == "__main__":
    import sys

    p = make_llava(Path(sys.argv[1]), family=sys.argv[2] if len(sys.argv) > 2 else "llama")
    for f in sorted(p.iterdir()):
        print(f.name)
    print(json.dumps(json.loads((p / "tokenizer_config.json").read_text()), indent=1)[:1500])
