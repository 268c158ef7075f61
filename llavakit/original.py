"""The original LLaVA checkpoint format (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT, lmms-lab), mapped onto llavakit.

The original repositories save a causal LM with extra `mm_*` config keys (`LlavaLlamaForCausalLM`,
`LlavaMistralForCausalLM`, `LlavaQwenForCausalLM`), the projector as `model.mm_projector.{0,2}`,
the vision tower either inside the checkpoint (`model.vision_tower.vision_tower.vision_model.*`)
or only by name (`mm_vision_tower`), and mark images in token ids with -200. This module turns
such a config into the equivalent llava-hf config (the same one `convert --to hf` writes), maps
the weight names, and holds the repositories' conversation templates.

Differences that are the original code's and are kept: LLaVA-1.5's `pad` (expand to a square of
the mean colour, not a centre crop); SigLIP towers lose their last layer and give its input;
prompts are tokenized chunk by chunk around each `<image>`, as `tokenizer_image_token` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import families
from .errors import ConfigError

IMAGE_PLACEHOLDER_ID = -200  # the original IMAGE_TOKEN_INDEX
VIDEO_PLACEHOLDER_ID = -201  # llavakit's own: the original marks videos with -200 too

_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)
_ARCH_TO_TEXT = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
                 "LlavaQwenForCausalLM": "qwen2", "LlavaQwen2ForCausalLM": "qwen2"}
_TYPE_TO_TEXT = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}


def _tower_processor(vision_type: str, **sizes) -> dict:
    """A tower's own preprocessor_config.json: its type and statistics from the registry, plus `sizes`."""
    t = families.tower(vision_type)
    return dict(image_processor_type=t.image_processor_type, **sizes, image_mean=list(t.mean), image_std=list(t.std))


# Towers referenced by name in published configs, for when neither a folder nor the hub has them.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": (
        dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        _tower_processor("clip_vision_model", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                         do_center_crop=True, resample=3),
    ),
    "google/siglip-so400m-patch14-384": (
        dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
             num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
             layer_norm_eps=1e-6),
        _tower_processor("siglip_vision_model", size={"height": 384, "width": 384}, do_center_crop=False, resample=3),
    ),
}


def is_original(raw: dict) -> bool:
    """True for a config.json written by the original LLaVA code (flat LM keys plus `mm_*` keys)."""
    return "text_config" not in raw and any(k in raw for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


def text_model_type(raw: dict) -> str:
    """llama, mistral or qwen2, from the architecture name or the model type."""
    for arch in raw.get("architectures") or ():
        if arch in _ARCH_TO_TEXT:
            return _ARCH_TO_TEXT[arch]
    model_type = raw.get("model_type")
    if model_type in _TYPE_TO_TEXT:
        return _TYPE_TO_TEXT[model_type]
    raise ConfigError(
        f"cannot tell the language model of this original-format checkpoint: architectures "
        f"{raw.get('architectures')}, model_type {model_type!r}; supported: {', '.join(sorted(_ARCH_TO_TEXT))}."
    )


def family(raw: dict) -> str:
    """Which llava-hf model type the original config corresponds to (the first registered family whose
    `original_aspect` and `mm_patch_merge_type` it matches)."""
    aspect = raw.get("image_aspect_ratio") or "square"
    merge = raw.get("mm_patch_merge_type") or "flat"
    known = [f for f in families.FAMILIES.values() if f.original_aspect is not None]
    for fam in known:
        if re.fullmatch(fam.original_aspect, aspect) and merge.startswith(fam.mm_patch_merge_type):
            return fam.model_type
    supported = ", ".join(f"{_readable(f.original_aspect)} + {f.mm_patch_merge_type} ({f.display_name})" for f in known)
    raise ConfigError(
        f"image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not supported; supported: {supported}."
    )


def _readable(pattern: str) -> str:
    """An aspect pattern for people: "pad|square" -> "pad/square", "anyres_max_\\d+" -> "anyres_max_N"."""
    return pattern.replace("|", "/").replace(r"\d+", "N")


def resolve_tower(raw: dict, vision_tower: str | Path | None, checkpoint: Path | None = None,
                  stored: bool = False) -> tuple[dict, dict, Path | None]:
    """(vision config, image processor dict, folder with the tower's weights or None).

    Taken from `vision_tower` (a folder) when given, else from `mm_vision_tower` when it is a local
    folder, else from the known towers of published checkpoints (weights then must be stored in
    the checkpoint itself).
    """
    name = vision_tower or raw.get("mm_vision_tower") or raw.get("vision_tower")
    if name is None:
        raise ConfigError("the config names no vision tower (mm_vision_tower); pass vision_tower=DIR.")
    folder = Path(name).expanduser()
    if not folder.is_dir() and checkpoint is not None and (checkpoint / folder).is_dir():
        folder = checkpoint / folder  # a tower folder shipped inside the checkpoint, named relatively
    if not folder.is_dir() and str(name).count("/") == 1 and not stored:
        folder = _hub_tower(str(name))  # liuhaotian checkpoints name a hub tower they do not store
    if folder.is_dir():
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"vision tower folder {folder} has no config.json.")
        tower = json.loads(cfg_path.read_text())
        vision = tower.get("vision_config", tower)  # CLIPModel / SiglipModel nest it, *VisionModel is flat
        parents = {t.parent_model_type: t.model_type for t in families.TOWERS.values()}
        vision.setdefault("model_type", parents.get(tower.get("model_type"), tower.get("model_type")))
        pre = folder / "preprocessor_config.json"
        processor = json.loads(pre.read_text()) if pre.is_file() else KNOWN_TOWERS.get(str(name), ({}, {}))[1]
        return vision, processor, folder
    if str(name) in KNOWN_TOWERS:
        vision, processor = KNOWN_TOWERS[str(name)]
        return dict(vision), dict(processor), None
    raise ConfigError(
        f"vision tower {name!r} is neither a local folder nor a known tower ({', '.join(KNOWN_TOWERS)}); "
        "pass vision_tower=DIR (--vision-tower DIR) pointing at its checkpoint folder."
    )


def _hub_tower(name: str) -> Path:
    """The tower's folder from the hub cache (or a download); a non-folder path when unavailable."""
    from .weights import resolve_model_dir

    try:
        return resolve_model_dir(name)
    except ConfigError:
        return Path(name)  # falls through to the known-tower table, or a clear error


def hf_config(raw: dict, vision: dict, image_token_id: int, video_token_id: int | None) -> dict:
    """The llava-hf config.json equivalent to an original-format config."""
    fam = families.family(family(raw))
    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConfigError(
            f"mm_projector_type {projector!r} is not supported; supported: mlp2x_gelu (every published LLaVA-1.5, "
            "NeXT and OneVision checkpoint)."
        )
    text = {k: raw[k] for k in _TEXT_KEYS if k in raw}
    text["model_type"] = text_model_type(raw)
    vision = dict(vision)
    tower = families.TOWERS.get(vision.get("model_type", "clip_vision_model"))
    if tower is not None and tower.original_drops_last_layer:  # unknown towers: LlavaConfig.from_hf says so
        # The original SigLIP wrapper deletes the last layer and takes the last hidden state.
        vision["num_hidden_layers"] = int(vision.get("num_hidden_layers", 12)) - 1
        layer, strategy = -1, "full"
    else:
        layer = int(raw.get("mm_vision_select_layer", -2))
        select = raw.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ConfigError(f"mm_vision_select_feature {select!r} is not supported; supported: patch, cls_patch.")
        strategy = "default" if select == "patch" else "full"
    out = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "text_config": text,
        "vision_config": vision,
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": strategy,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
    }
    for key in ("torch_dtype", "dtype"):
        if key in raw:
            out[key] = raw[key]
    if fam.tiled:
        out["image_grid_pinpoints"] = raw.get("image_grid_pinpoints")
    if fam.caps_tiles:
        out["vision_aspect_ratio"] = raw["image_aspect_ratio"]
    if fam.takes_video:
        out["video_token_index"] = video_token_id
    return out


def image_processor_dict(raw: dict, tower_processor: dict) -> dict:
    """The image processor the original preprocessing corresponds to."""
    d = dict(tower_processor)
    fam = families.family(family(raw))
    d["image_processor_type"] = fam.image_processor_type
    if fam.tiled:
        d["image_grid_pinpoints"] = raw.get("image_grid_pinpoints")
    else:
        d["do_pad"] = raw.get("image_aspect_ratio") == "pad"
    return d


def weight_name(key: str, siglip_layers: int | None) -> str | None:
    """llavakit's name for an original-format weight, or None for weights the original code drops."""
    for old, new in (
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.image_newline", "image_newline"),
        ("model.", "language_model."),
    ):
        if key.startswith(old):
            return _drop_extra_siglip_layer(new + key[len(old):], siglip_layers)
    return key


def tower_weight_name(key: str, siglip_layers: int | None) -> str | None:
    """llavakit's name for a weight of a separate CLIP/SigLIP checkpoint folder (vision part only)."""
    key = key.removeprefix("vision_tower.")
    if not key.startswith("vision_model."):
        return None  # text tower, projections, logit scale of a full CLIP/SigLIP model
    return _drop_extra_siglip_layer("vision_tower." + key[len("vision_model."):], siglip_layers)


def _drop_extra_siglip_layer(name: str, siglip_layers: int | None) -> str | None:
    if siglip_layers is None or not name.startswith("vision_tower."):
        return name
    if name.startswith("vision_tower.head."):
        return None
    match = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", name)
    if match and int(match.group(1)) >= siglip_layers:
        return None
    return name


def original_weight_name(name: str) -> str:
    """The original-format key for a llavakit weight name (the tower stored in the checkpoint)."""
    for new, old in (
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("image_newline", "model.image_newline"),
        ("language_model.", "model."),
    ):
        if name.startswith(new):
            return old + name[len(new):]
    return name


# ── conversation templates of the original repositories, as jinja (rendered like HF templates) ──

_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_VISION_ASSISTANT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                     "content that the user provides, and assist the user with a variety of tasks using natural "
                     "language.")

# Each user turn starts with one "<image>\n" per image (and "<video>\n" per video), then its text.
_MEDIA = ("{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
          "{% for c in m['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}")
_TEXT = "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
_SYSTEM = ("{% set system = messages[0]['content'][0]['text'] if messages[0]['role'] == 'system' else DEFAULT %}"
           "{% set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}")


def _two(system: str) -> str:
    """Vicuna's SeparatorStyle.TWO: "SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT:"."""
    return (_SYSTEM.replace("DEFAULT", json.dumps(system)) + "{{ system + ' ' }}"
            "{% for m in turns %}{% if m['role'] == 'user' %}{{ 'USER: ' }}" + _MEDIA + _TEXT + "{{ ' ' }}"
            "{% else %}{{ 'ASSISTANT: ' }}" + _TEXT + "{{ '</s>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _chatml(system: str, after_sep: str) -> str:
    """MPT / CHATML styles: "<|im_start|>system\\n...<|im_end|>" + turns, `after_sep` after each <|im_end|>."""
    sep = "'<|im_end|>" + after_sep + "'"
    return (_SYSTEM.replace("DEFAULT", json.dumps(system)) +
            "{% if system %}{{ '<|im_start|>system\\n' + system + " + sep + " }}{% endif %}"
            "{% for m in turns %}{{ '<|im_start|>' + m['role'] + '\\n' }}" + _MEDIA + _TEXT + "{{ " + sep + " }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


TEMPLATES = {
    "llava_v1": _two(_LLAVA_SYSTEM),
    "vicuna_v1": _two(_VICUNA_SYSTEM),
    # SeparatorStyle.LLAMA_2 with an empty system: "[INST] q [/INST] a </s>[INST] q [/INST]"
    "mistral_instruct": (
        _SYSTEM.replace("DEFAULT", '""') +
        "{% for m in turns %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
        "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        + _MEDIA + _TEXT + "{{ ' [/INST]' }}{% else %}{{ ' ' }}" + _TEXT + "{{ ' </s>' }}{% endif %}{% endfor %}"
    ),
    "chatml_direct": _chatml("Answer the questions.", ""),
    "qwen_1_5": _chatml("You are a helpful assistant.", "\\n"),
    "llava_llama_3": (
        _SYSTEM.replace("DEFAULT", json.dumps(_VISION_ASSISTANT)) +
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
        "{% for m in turns %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}" + _MEDIA + _TEXT +
        "{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def template_for(raw: dict, folder: Path, text_type: str, override: str | None) -> str:
    """The conversation template of an original-format checkpoint in `folder` (its name says which)."""
    return pick_template(str(raw.get("_name_or_path") or folder.name) + " " + folder.name, text_type, override)


def pick_template(name_hint: str, text_type: str, override: str | None) -> str:
    """The conversation template: `override`, else guessed from the model's name as the original CLI does."""
    if override is not None:
        if override not in TEMPLATES:
            raise ConfigError(f"conversation template {override!r} is not known; known: {', '.join(TEMPLATES)}.")
        return override
    name = name_hint.lower()
    if "llama3" in name or "llama-3" in name:
        return "llava_llama_3"
    if "34b" in name:
        return "chatml_direct"
    if "mistral" in name or text_type == "mistral":
        return "mistral_instruct"
    if "qwen" in name or text_type == "qwen2":
        return "qwen_1_5"
    return "llava_v1"


def load_parts(folder: Path, raw: dict, dtype, vision_tower: str | Path | None, conv_template: str | None,
               quantize: str = "none"):
    """(LlavaConfig, model, Processor) for an original-format checkpoint folder (quantised while read
    when `quantize` says so)."""
    from .config import LlavaConfig
    from .processing.processor import Processor
    from .processing.prompt import load_tokenizer
    from .model.build import load_model

    stored = tower_stored(folder)
    vision, tower_processor, tower_folder = resolve_tower(raw, vision_tower, folder, stored)
    video_id = VIDEO_PLACEHOLDER_ID if families.family(family(raw)).takes_video else None
    hf = hf_config(raw, vision, IMAGE_PLACEHOLDER_ID, video_id)
    cfg = LlavaConfig.from_hf(hf)
    siglip_layers = cfg.vision.num_layers if families.tower(cfg.vision.model_type).original_drops_last_layer else None
    sources = [(folder, lambda k: weight_name(k, siglip_layers))]
    if tower_folder is not None and not stored:
        sources.append((tower_folder, lambda k: tower_weight_name(k, siglip_layers)))
    model = load_model(folder, cfg, dtype, sources, quantize)
    tokenizer = load_tokenizer(folder)
    template = TEMPLATES[template_for(raw, folder, cfg.text.model_type, conv_template)]
    processor = Processor.build(tokenizer, image_processor_dict(raw, tower_processor), cfg, template, original=True)
    return cfg, model, processor


def tower_stored(folder: Path) -> bool:
    """Whether the checkpoint carries its own vision tower weights (lmms-lab does, liuhaotian does not)."""
    from safetensors import safe_open

    from .weights import weight_files

    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith("model.vision_tower.") for k in f.keys()):
                return True
    return False
