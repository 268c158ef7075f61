"""Complete checkpoint folders with random weights, written by llavakit alone.

They have the Hugging Face layout (config.json, safetensors, tokenizer.json with the real
vocabulary size, processor files, chat template), so both llavakit and transformers load them.
The `tiny` preset is the quick-start demo; the others have the architectures of published
checkpoints, for benchmarks without a hub. Weights are generated and written tensor by tensor
in shards, so a 7B checkpoint never has to fit in memory at once.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .config import LlavaConfig
from .errors import ConfigError
from .families import family, tower
from .processing.prompt import DEFAULT_TEMPLATES

_CORPUS = (
    "USER: ASSISTANT: What is in the picture? Describe the image. The picture shows a cat, a dog, a red "
    "ball, a blue sky, green trees, a small house and two people walking on the beach at sunset. "
    "There is a bright yellow sun above the sea and white clouds in the sky."
)
_CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                      num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
_LLAMA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
_QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


# name -> model_type, text config, vision config, special tokens (text -> id), image/video ids, extras
PRESETS: dict[str, dict] = {
    "tiny": dict(
        model_type="llava",
        text=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters=_rope(10000.0), vocab_size=None),  # None: just the learned tokens
        vision=dict(_CLIP_L336, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        specials={**_LLAMA_SPECIALS, "<pad>": 3, "<image>": 4}, image_token="<image>", bos="<s>", eos="</s>",
        pad="<pad>",
    ),
    "llava-1.5-7b": dict(
        model_type="llava",
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters=_rope(10000.0), vocab_size=32064),
        vision=_CLIP_L336,
        specials={**_LLAMA_SPECIALS, "<image>": 32000, "<pad>": 32001}, image_token="<image>", bos="<s>",
        eos="</s>", pad="<pad>",
    ),
    "llava-v1.6-mistral-7b": dict(
        model_type="llava_next",
        text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_parameters=_rope(1000000.0), sliding_window=None, vocab_size=32064),
        vision=_CLIP_L336,
        specials={**_LLAMA_SPECIALS, "<image>": 32000, "<pad>": 32001}, image_token="<image>", bos="<s>",
        eos="</s>", pad="<pad>",
    ),
    "llava-next-video-7b": dict(  # llava-hf/LLaVA-NeXT-Video-7B-hf: Vicuna-7B, CLIP-L/14-336, frames pooled by 2
        model_type="llava_next_video",
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters=_rope(10000.0), vocab_size=32064),
        vision=_CLIP_L336,
        specials={**_LLAMA_SPECIALS, "<video>": 32000, "<image>": 32001, "<pad>": 32002}, image_token="<image>",
        bos="<s>", eos="</s>", pad="<pad>",
    ),
    "llava-onevision-qwen2-0.5b": dict(
        model_type="llava_onevision",
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters=_rope(1000000.0), tie_word_embeddings=True, vocab_size=152000),
        vision=_SIGLIP_SO400M,
        specials={**_QWEN_SPECIALS, "<image>": 151646, "<video>": 151647}, image_token="<image>", bos=None,
        eos="<|im_end|>", pad="<|endoftext|>",
    ),
    "llava-onevision-qwen2-7b": dict(
        model_type="llava_onevision",
        text=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters=_rope(1000000.0), tie_word_embeddings=False, vocab_size=152128),
        vision=_SIGLIP_SO400M,
        specials={**_QWEN_SPECIALS, "<image>": 151646, "<video>": 151647}, image_token="<image>", bos=None,
        eos="<|im_end|>", pad="<|endoftext|>",
    ),
}


def _tokenizer(vocab_size: int | None, specials: dict[str, int], bos: str | None):
    """A byte-level BPE tokenizer of exactly `vocab_size` entries with the special tokens at their real ids.

    A few hundred entries are learned from a small corpus (printable ASCII only, so anything a random
    model samples decodes to readable text); the rest are fillers that no text produces, as the
    benchmarks need the real vocabulary size, not a real vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learned = Tokenizer(models.BPE())
    learned.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    target = 384 if vocab_size is None else min(384, vocab_size - len(specials))
    trainer = trainers.BpeTrainer(vocab_size=target, show_progress=False)
    learned.train_from_iterator([_CORPUS] * 8 + [string.printable], trainer=trainer)
    state = json.loads(learned.to_str())["model"]
    taken = set(specials.values())
    vocab: dict[str, int] = dict(specials)
    next_id = 0
    for token in sorted(state["vocab"], key=state["vocab"].get):
        while next_id in taken:
            next_id += 1
        vocab[token] = next_id
        taken.add(next_id)
    for i in range(vocab_size or 0):
        if i not in taken:
            vocab[f"<|filler_{i}|>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, specials[bos])])
    return tok


def _write_weights(cfg: LlavaConfig, out: Path, dtype: torch.dtype, seed: int, std: float,
                   max_shard_bytes: int = 2 << 30) -> None:
    """Random weights in the published key layout, generated and written shard by shard."""
    from safetensors.torch import save_file

    from .model.llava import LlavaModel
    from .weights import published_key

    with torch.device("meta"):
        model = LlavaModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    names = [n for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = torch.Size(shapes[name]).numel() * torch.finfo(dtype).bits // 8
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            shape = shapes[name]
            if name.endswith("bias"):
                t = torch.zeros(shape)
            elif "norm" in name:  # RMSNorm and LayerNorm scales
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * (0.02 if "embed" in name else std)
            tensors[published_key(name)] = t.to(dtype)
            weight_map[published_key(name)] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(torch.Size(shapes[n]).numel() * torch.finfo(dtype).bits // 8 for n in names)
        _write(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_random_checkpoint(out: Path, preset: str = "tiny", layers: int | None = None, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint of `preset`'s architecture with random weights to `out`; return `out`.

    layers: for quick runs, keep only this many decoder layers and at most this many tower layers
    (widths, vocabulary and every other shape stay the preset's).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    text, vision, specials = dict(p["text"]), dict(p["vision"]), p["specials"]
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {layers}.")
        text["num_hidden_layers"] = layers
        vision["num_hidden_layers"] = min(layers, vision["num_hidden_layers"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(text["vocab_size"], specials, p["bos"])
    text["vocab_size"] = tok.get_vocab_size()
    text.update(bos_token_id=specials.get(p["bos"]), eos_token_id=specials[p["eos"]], pad_token_id=specials[p["pad"]])
    fam, tw = family(p["model_type"]), tower(vision["model_type"])
    config = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type, "dtype": str(dtype).removeprefix("torch."),
        "image_token_index": specials[p["image_token"]], "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "text_config": text, "vision_config": vision,
    }
    # CLIP: the second-last layer without the class token; SigLIP (no class token): the last, whole.
    config["vision_feature_layer"] = -2 if tw.has_class_token else -1
    config["vision_feature_select_strategy"] = "default" if tw.has_class_token else "full"
    if fam.tiled:
        config["image_grid_pinpoints"] = [list(x) for x in fam.default_pinpoints]
    if fam.caps_tiles:
        config["vision_aspect_ratio"] = fam.default_vision_aspect_ratio
    if fam.takes_video:
        config["video_token_index"] = specials["<video>"]
    cfg = LlavaConfig.from_hf(config)
    # The demo's matrices are wider than an initialisation's: at 0.02 a tiny random model repeats one
    # token forever; at 0.12 its (meaningless) answers at least vary with the picture and question.
    _write_weights(cfg, out, dtype, seed, std=0.12 if preset == "tiny" else 0.02)
    tok.save(str(out / "tokenizer.json"))
    _write(out / "config.json", config)
    _write(out / "generation_config.json", {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
                                            "pad_token_id": text["pad_token_id"]})
    tokens = {"bos_token": p["bos"], "eos_token": p["eos"], "pad_token": p["pad"],
              "unk_token": "<unk>" if "<unk>" in specials else None}
    _write(out / "tokenizer_config.json", {**{k: v for k, v in tokens.items() if v is not None},
                                           "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"})
    _write_processor(out, fam.model_type, vision)
    template = DEFAULT_TEMPLATES[fam.chat_template or text["model_type"]]
    _write(out / "chat_template.json", {"chat_template": template})
    return out


def _write_processor(out: Path, model_type: str, vision: dict, siglip: bool | None = None,
                     pinpoints: list[list[int]] | None = None) -> None:
    """preprocessor_config.json and processor_config.json for a family; pinpoints default to the published ones.

    `siglip` is ignored (the registry's tower facts decide); it stays for train.assemble's positional call.
    """
    fam, tw = family(model_type), tower(vision["model_type"])
    side = vision["image_size"]
    pre = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(tw.mean), "image_std": list(tw.std), "do_convert_rgb": True}
    # Untiled (LLaVA-1.5) checkpoints ship the tower's own processor, as llava-1.5-*-hf do.
    pre["image_processor_type"] = fam.image_processor_type if fam.tiled else tw.image_processor_type
    # The processor entries only steer transformers' token counts: p² (+ a class token, - it again when
    # "default") per tile, which these values give for either tower.
    proc = {"processor_class": fam.processor_class, "image_token": "<image>"}
    if fam.takes_video:
        proc["video_token"] = "<video>"
    if fam.caps_tiles:  # OneVision: square resize, no crop; its processor counts p² from num_image_tokens
        pre.update(size={"height": side, "width": side}, do_center_crop=False)
        proc.update(num_image_tokens=(side // vision["patch_size"]) ** 2, vision_feature_select_strategy="full",
                    vision_aspect_ratio=fam.default_vision_aspect_ratio)
    else:
        pre.update(size={"shortest_edge": side}, do_center_crop=True, crop_size={"height": side, "width": side})
        proc.update(patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                    num_additional_image_tokens=1)
    if fam.tiled:
        pre.update(do_pad=True, image_grid_pinpoints=pinpoints or [list(x) for x in fam.default_pinpoints])
    if fam.video_processor_type is not None:  # frames sized as the images' tiles, as the published files say
        keys = ("size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std")
        _write(out / "video_preprocessor_config.json",
               {"video_processor_type": fam.video_processor_type, **{k: pre[k] for k in keys if k in pre}})
    _write(out / "preprocessor_config.json", pre)
    _write(out / "processor_config.json", proc)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
