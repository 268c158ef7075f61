"""The model families llavakit runs, keyed by config.json's `model_type`, and the vision towers they use.

    FAMILIES["llava_onevision"] ─► Family(architecture, processor_class, media, packing, defaults, ...)
    TOWERS["siglip_vision_model"] ─► Tower(mean, std, image_processor_type, has_class_token, ...)

Code outside this package asks `family(model_type)` / `tower(vision_model_type)` instead of
comparing model_type strings. Adding a family (say LLaVA-NeXT-Video) = one module here that
defines `FAMILY = Family(...)`, one line in `_MODULES` below, and its parity tests; a new way of
packing features also needs its branch in the model. Standard library only (config.py is torch-free).
"""

from __future__ import annotations

from . import llava, llava_next, llava_next_video, llava_onevision
from ..errors import ConfigError
from .base import MEDIA, PACKINGS, VIDEO_PACKINGS, Family, Tower

__all__ = ["FAMILIES", "MEDIA", "PACKINGS", "TOWERS", "VIDEO_PACKINGS", "Family", "Tower", "family", "tower"]

# One line per family; the order is the order of help texts and error messages.
_MODULES = (llava, llava_next, llava_onevision, llava_next_video)
FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training statistics
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOWERS: dict[str, Tower] = {
    "clip_vision_model": Tower(
        model_type="clip_vision_model", parent_model_type="clip", architecture="CLIPVisionModel",
        image_processor_type="CLIPImageProcessor", mean=_CLIP_MEAN, std=_CLIP_STD, has_class_token=True,
        original_drops_last_layer=False,
        config_defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                             hidden_act="quick_gelu"),
    ),
    "siglip_vision_model": Tower(
        model_type="siglip_vision_model", parent_model_type="siglip", architecture="SiglipVisionModel",
        image_processor_type="SiglipImageProcessor", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        has_class_token=False, original_drops_last_layer=True,
        config_defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                             hidden_act="gelu_pytorch_tanh"),
    ),
}


def family(model_type: str | None) -> Family:
    """The family of a config.json `model_type`; ConfigError naming the supported ones otherwise."""
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(FAMILIES)}."
        )
    return fam


def tower(model_type: str | None) -> Tower:
    """The facts of a vision_config `model_type`; ConfigError naming the supported ones otherwise."""
    t = TOWERS.get(model_type) if isinstance(model_type, str) else None
    if t is None:
        raise ConfigError(
            f"vision_config.model_type {model_type!r} is not supported; supported: {', '.join(TOWERS)}."
        )
    return t
