"""Write tiny checkpoints in the original LLaVA format (haotian-liu/LLaVA, LLaVA-NeXT, lmms-lab).

Test-side and independent of llavakit's own mapping: it takes a llava-hf checkpoint built by
transformers and writes what the original training code would have saved for the same model:
flat LM config keys plus `mm_*` keys, `model.*` / `model.mm_projector.{0,2}` weight names, the
vision tower stored in the checkpoint (lmms-lab) or in a separate CLIP/SigLIP folder referenced
by `mm_vision_tower` (liuhaotian), and no `<image>` token handling in the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _split(hf: dict[str, torch.Tensor]):
    """(language model + projector + newline under original names, vision tower under `vision_model.` names)."""
    lm, tower = {}, {}
    for key, t in hf.items():
        if key.startswith("vision_tower."):
            rest = key[len("vision_tower."):]
            tower["vision_model." + rest.removeprefix("vision_model.")] = t
        elif key.startswith("language_model.model."):
            lm["model." + key[len("language_model.model."):]] = t
        elif key == "language_model.lm_head.weight":
            lm["lm_head.weight"] = t
        elif key.startswith("multi_modal_projector.linear_1."):
            lm["model.mm_projector.0." + key.split(".")[-1]] = t
        elif key.startswith("multi_modal_projector.linear_2."):
            lm["model.mm_projector.2." + key.split(".")[-1]] = t
        elif key == "image_newline":
            lm["model.image_newline"] = t
        else:
            raise AssertionError(f"unexpected key in the llava-hf checkpoint: {key}")
    return lm, tower


def write_original(hf_folder: Path, out: Path, store_tower: bool, extra_siglip_layer: bool = True) -> Path:
    """Write the original-format twin of a llava-hf checkpoint; return `out`.

    store_tower: keep the tower inside the checkpoint (lmms-lab) or in `out/../<name>-tower` (liuhaotian).
    extra_siglip_layer: SigLIP towers get one more (random) layer in their own folder, as so400m has
    27 layers of which the original code drops the last.
    """
    hf_folder, out = Path(hf_folder), Path(out)
    cfg = json.loads((hf_folder / "config.json").read_text())
    proc = json.loads((hf_folder / "processor_config.json").read_text()) if (hf_folder / "processor_config.json").is_file() else {}
    image_proc = proc.get("image_processor") or json.loads((hf_folder / "preprocessor_config.json").read_text())
    text, vision = cfg["text_config"], dict(cfg["vision_config"])
    siglip = vision["model_type"] == "siglip_vision_model"
    lm, tower = _split(_hf_tensors(hf_folder))

    out.mkdir(parents=True)
    for name in SIDE_FILES:
        if (hf_folder / name).is_file():
            shutil.copyfile(hf_folder / name, out / name)

    arch = {"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM", "qwen2": "LlavaQwenForCausalLM"}
    raw = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters", "layer_types")}
    raw["rope_theta"] = text.get("rope_parameters", {}).get("rope_theta", 10000.0)
    raw["architectures"] = [arch[text["model_type"]]]
    raw["model_type"] = {"llama": "llava_llama", "mistral": "llava_mistral", "qwen2": "llava_qwen"}[text["model_type"]]
    kind = cfg["model_type"]
    layer = cfg["vision_feature_layer"]
    raw.update(
        mm_hidden_size=vision["hidden_size"],
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2 if siglip else layer,
        mm_vision_select_feature="patch" if cfg["vision_feature_select_strategy"] == "default" else "cls_patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio={"llava": "pad" if image_proc.get("do_pad") else "square", "llava_next": "anyres",
                            "llava_onevision": cfg.get("vision_aspect_ratio", "anyres_max_9")}[kind],
        mm_patch_merge_type="flat" if kind == "llava" else "spatial_unpad",
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )
    if kind != "llava":
        raw["image_grid_pinpoints"] = cfg["image_grid_pinpoints"]

    tower_dir = out.parent / (out.name + "-tower")
    tower_dir.mkdir()
    tower_cfg = dict(vision)
    if siglip and extra_siglip_layer:
        tower_cfg["num_hidden_layers"] = vision["num_hidden_layers"] + 1
    (tower_dir / "config.json").write_text(json.dumps(tower_cfg))
    tower_proc = {k: v for k, v in image_proc.items() if k not in ("do_pad", "image_grid_pinpoints")}
    tower_proc["image_processor_type"] = "SiglipImageProcessor" if siglip else "CLIPImageProcessor"
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(tower_proc))
    raw["mm_vision_tower"] = str(tower_dir)
    if store_tower:
        lm.update({"model.vision_tower.vision_tower." + k: t for k, t in tower.items()})
    else:
        if siglip and extra_siglip_layer:  # the layer the original code drops: random, must not matter
            n = vision["num_hidden_layers"]
            for k, t in list(tower.items()):
                if k.startswith(f"vision_model.encoder.layers.{n - 1}."):
                    tower[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = torch.randn_like(t)
        save_file(tower, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(lm, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out
