"""`llavakit convert`: between the llava-hf and the original LLaVA checkpoint formats.

Works on stored tensors (no model is built, no dtype changes), so weights survive a round trip
bit for bit. original → hf adds the `<image>` (and `<video>`) tokens to the tokenizer, using
padded vocabulary rows when the embeddings have them and growing the embeddings otherwise (the
original row count is recorded so that hf → original can cut them again); the tower is stored
in the result. hf → original stores the tower in the checkpoint and writes its config and
preprocessing beside it in `vision_tower/`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from . import families, original
from .config import LlavaConfig
from .errors import ConfigError
from .weights import canonical_key, published_key, read_raw_config, read_tensors, write_tensors

_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
         "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
_VOCAB_KEY = "llavakit_original_vocab_size"
_EMBED_ROWS = ("language_model.embed_tokens.weight", "lm_head.weight")


def convert(src: Path, dst: Path, to: str, vision_tower: str | None = None, conv_template: str | None = None) -> Path:
    """Write `src` in the `to` format ("hf" or "original") to `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst} exists and is not empty; choose a new output folder.")
    raw = read_raw_config(src)
    is_orig = original.is_original(raw)
    if to == "hf":
        if not is_orig:
            raise ConfigError(f"{src} is already in the llava-hf format.")
        return _to_hf(src, dst, raw, vision_tower, conv_template)
    if to == "original":
        if is_orig:
            raise ConfigError(f"{src} is already in the original format.")
        return _to_original(src, dst, raw)
    raise ConfigError(f"unknown target format {to!r}; use 'hf' or 'original'.")


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _COPY:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _add_tokens(dst: Path, tokens: list[str]) -> dict[str, int]:
    """Make sure `tokens` exist as special tokens in dst/tokenizer.json; return their ids."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.save(str(dst / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in tokens}


def _to_hf(src: Path, dst: Path, raw: dict, vision_tower: str | None, conv_template: str | None) -> Path:
    vision, tower_processor, tower_folder = original.resolve_tower(raw, vision_tower, src, original.tower_stored(src))
    fam = families.family(original.family(raw))
    _copy_side_files(src, dst)
    ids = _add_tokens(dst, ["<image>"] + (["<video>"] if fam.takes_video else []))
    hf = original.hf_config(raw, vision, ids["<image>"], ids.get("<video>"))
    cfg = LlavaConfig.from_hf(hf)
    siglip_layers = cfg.vision.num_layers if families.tower(cfg.vision.model_type).original_drops_last_layer else None

    tensors: dict[str, torch.Tensor] = {}
    for key, t in read_tensors(src):
        name = original.weight_name(key, siglip_layers)
        if name is not None:
            tensors[name] = t
    if not any(n.startswith("vision_tower.") for n in tensors):
        if tower_folder is None:
            raise ConfigError("the checkpoint stores no vision tower; pass --vision-tower DIR with its weights.")
        for key, t in read_tensors(tower_folder):
            name = original.tower_weight_name(key, siglip_layers)
            if name is not None:
                tensors[name] = t
    rows = tensors["language_model.embed_tokens.weight"].shape[0]
    needed = max(ids.values()) + 1
    if needed > rows:  # grow as transformers' own conversions did: to a multiple of 64, new rows at the mean
        new_rows = math.ceil(needed / 64) * 64
        for name in _EMBED_ROWS:
            if name in tensors:
                t = tensors[name]
                extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(new_rows - rows, -1)
                tensors[name] = torch.cat([t, extra])
        hf[_VOCAB_KEY] = rows
        hf["text_config"]["vocab_size"] = new_rows
    write_tensors({published_key(n): t for n, t in tensors.items()}, dst)

    _write_json(dst / "config.json", hf)
    _write_json(dst / "preprocessor_config.json", original.image_processor_dict(raw, tower_processor))
    patches = cfg.vision.patches_per_side
    proc = {"processor_class": fam.processor_class,
            "image_token": "<image>", "vision_feature_select_strategy": cfg.select_strategy}
    if fam.takes_video:
        proc["video_token"] = "<video>"
    if fam.caps_tiles:  # LlavaOnevisionProcessor counts tokens from these
        proc.update(num_image_tokens=patches**2, vision_aspect_ratio=raw["image_aspect_ratio"])
    else:
        proc.update(patch_size=cfg.vision.patch_size, num_additional_image_tokens=int(cfg.vision.has_class_token))
    _write_json(dst / "processor_config.json", proc)
    template = original.TEMPLATES[original.template_for(raw, src, cfg.text.model_type, conv_template)]
    _write_json(dst / "chat_template.json", {"chat_template": template})
    return dst


def _to_original(src: Path, dst: Path, raw: dict) -> Path:
    cfg = LlavaConfig.from_hf(raw)
    if len(cfg.vision_feature_layers) != 1:
        raise ConfigError(
            f"vision_feature_layer {list(cfg.vision_feature_layers)} cannot be written in the original format, "
            "which selects a single layer (mm_vision_select_layer)."
        )
    fam, tw = cfg.family, families.tower(cfg.vision.model_type)
    siglip = tw.original_drops_last_layer  # SigLIP: the original code takes the input of its last layer
    if siglip and (cfg.vision_feature_layers[0] % (cfg.vision.num_layers + 1) != cfg.vision.num_layers
                   or cfg.select_strategy != "full"):
        raise ConfigError("a SigLIP tower converts to the original format only with its last layer and 'full'.")
    _copy_side_files(src, dst)
    text = dict(raw["text_config"])
    out = {k: v for k, v in text.items() if k != "model_type"}
    out["architectures"] = [{"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM",
                             "qwen2": "LlavaQwenForCausalLM"}[cfg.text.model_type]]
    out["model_type"] = {"llama": "llava_llama", "mistral": "llava_mistral", "qwen2": "llava_qwen"}[cfg.text.model_type]
    image_proc = _image_processor(src)
    if fam.caps_tiles:
        aspect = f"anyres_max_{cfg.max_tiles}"
    elif fam.tiled:
        aspect = "anyres"
    else:
        aspect = "pad" if image_proc.get("do_pad") else "square"
    out.update(
        mm_vision_tower="vision_tower",
        mm_hidden_size=cfg.vision.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2 if siglip else cfg.vision_feature_layers[0],
        mm_vision_select_feature="patch" if cfg.select_strategy == "default" else "cls_patch",
        image_aspect_ratio=aspect,
        mm_patch_merge_type=fam.mm_patch_merge_type,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.image_grid_pinpoints:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    for key in ("torch_dtype", "dtype"):
        if key in raw:
            out[key] = raw[key]

    tensors = {}
    keep_rows = raw.get(_VOCAB_KEY)
    for key, t in read_tensors(src):
        name = canonical_key(key)
        if keep_rows is not None and name in _EMBED_ROWS:
            t = t[:keep_rows]
        tensors[original.original_weight_name(name)] = t
    if keep_rows is not None:
        out["vocab_size"] = keep_rows
    write_tensors(tensors, dst)
    _write_json(dst / "config.json", out)

    tower = dict(raw["vision_config"])
    if siglip:  # the original code drops the last layer of the tower it is given
        tower["num_hidden_layers"] = cfg.vision.num_layers + 1
    tower_dir = dst / "vision_tower"
    tower_dir.mkdir()
    _write_json(tower_dir / "config.json", tower)
    tower_proc = {k: v for k, v in image_proc.items() if k not in ("do_pad", "image_grid_pinpoints")}
    tower_proc["image_processor_type"] = tw.image_processor_type
    _write_json(tower_dir / "preprocessor_config.json", tower_proc)
    return dst


def _image_processor(folder: Path) -> dict:
    from .processing.image import read_image_processor_dict

    return read_image_processor_dict(folder)
