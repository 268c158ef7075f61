"""The family registry: its facts agree with transformers, it takes a new family, and nothing else tests model_type."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from llavakit import families
from llavakit.config import LlavaConfig
from llavakit.errors import ConfigError
from llavakit.families import FAMILIES, TOWERS, Family, family, tower

transformers = pytest.importorskip("transformers")

PACKAGE = Path(__file__).resolve().parents[1] / "llavakit"
CONFIG_CLASS = {"llava": "LlavaConfig", "llava_next": "LlavaNextConfig", "llava_onevision": "LlavaOnevisionConfig",
                "llava_next_video": "LlavaNextVideoConfig"}


def test_registry_has_the_four_families():
    assert list(FAMILIES) == ["llava", "llava_next", "llava_onevision", "llava_next_video"]
    for key, fam in FAMILIES.items():
        assert fam.model_type == key
    assert [f.display_name for f in FAMILIES.values()] == ["LLaVA-1.5", "LLaVA-NeXT", "LLaVA-OneVision",
                                                           "LLaVA-NeXT-Video"]
    assert set(TOWERS) == {"clip_vision_model", "siglip_vision_model"}


def test_unknown_family_and_tower_name_what_is_supported():
    with pytest.raises(ConfigError, match="'llava_foo' is not supported; supported model types: llava, llava_next"):
        family("llava_foo")
    with pytest.raises(ConfigError, match="supported model types"):
        family(None)
    with pytest.raises(ConfigError, match="'pixtral' is not supported; supported: clip_vision_model"):
        tower("pixtral")


@pytest.mark.parametrize("model_type", list(CONFIG_CLASS))
def test_family_defaults_equal_transformers_config(model_type):
    fam = family(model_type)
    hf = getattr(transformers, CONFIG_CLASS[model_type])()
    d = hf.to_dict()
    assert getattr(transformers, fam.architecture).config_class is type(hf)
    assert type(hf).model_type == fam.model_type
    assert d["image_token_index"] == fam.default_image_token_id
    assert d.get("video_token_index") == fam.default_video_token_id
    assert d["vision_feature_layer"] == fam.default_vision_feature_layer
    assert d["vision_feature_select_strategy"] == fam.default_select_strategy
    assert d.get("vision_aspect_ratio") == fam.default_vision_aspect_ratio
    assert hf.text_config.model_type == fam.default_text_model_type
    pins = tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ())
    assert pins == fam.default_pinpoints
    for key, value in fam.default_vision_config.items():
        assert getattr(hf.vision_config, key) == value, key
    # What llavakit builds from an empty config is what transformers builds from none.
    cfg = LlavaConfig.from_hf({"model_type": model_type})
    assert cfg.vision.num_layers == hf.vision_config.num_hidden_layers
    assert cfg.text.model_type == hf.text_config.model_type
    assert cfg.has_image_newline == fam.tiled


@pytest.mark.parametrize("model_type", list(CONFIG_CLASS))
def test_family_class_names_exist_in_transformers(model_type):
    fam = family(model_type)
    for name in (fam.architecture, fam.processor_class, fam.image_processor_type):
        assert hasattr(transformers, name), name
    processor = getattr(transformers, fam.processor_class)
    takes_video = "video_token" in processor.__init__.__code__.co_varnames
    assert takes_video == fam.takes_video


def test_forwarded_text_tie_matches_transformers():
    for model_type, fam in FAMILIES.items():
        hf = getattr(transformers, CONFIG_CLASS[model_type])(text_config={"model_type": "qwen2",
                                                                         "tie_word_embeddings": True})
        cfg = LlavaConfig.from_hf({"model_type": model_type, "text_config": {"model_type": "qwen2",
                                                                             "tie_word_embeddings": True}})
        assert cfg.tie_word_embeddings == fam.forwards_text_tie
        assert bool(hf.tie_word_embeddings) == fam.forwards_text_tie


@pytest.mark.parametrize("vision_type,processor", [("clip_vision_model", "CLIPImageProcessor"),
                                                   ("siglip_vision_model", "SiglipImageProcessor")])
def test_tower_facts_equal_transformers(vision_type, processor):
    t = tower(vision_type)
    assert t.image_processor_type == processor
    hf = getattr(transformers, processor)()
    assert tuple(hf.image_mean) == t.mean and tuple(hf.image_std) == t.std
    config_class = getattr(transformers, t.architecture).config_class
    assert config_class.model_type == t.model_type
    hf_cfg = config_class()
    for key, value in t.config_defaults.items():
        assert getattr(hf_cfg, key) == value, key
    assert getattr(transformers, config_class.__name__.replace("Vision", "")).model_type == t.parent_model_type


def test_old_public_names_are_the_registry_values():
    from llavakit import config
    from llavakit.processing import image

    assert config.SUPPORTED_MODEL_TYPES == tuple(FAMILIES)
    assert config.SUPPORTED_VISION_TYPES == tuple(TOWERS)
    assert config.NEXT_PINPOINTS == family("llava_next").default_pinpoints
    assert config.ONEVISION_PINPOINTS == family("llava_onevision").default_pinpoints
    assert image.OPENAI_CLIP_MEAN == tower("clip_vision_model").mean
    assert image.OPENAI_CLIP_STD == tower("clip_vision_model").std
    assert image.HALF_MEAN_STD == tower("siglip_vision_model").std


def test_a_registered_new_family_is_accepted(monkeypatch):
    """What a family module does: one Family, one registry entry, and configs parse."""
    video = dataclasses.replace(
        family("llava_next"), model_type="llava_next_bilinear", display_name="LLaVA-NeXT-Bilinear",
        media=("image", "video"), video_packing="pool_bilinear_newline", default_video_token_id=32001,
        original_aspect=None)
    monkeypatch.setitem(FAMILIES, "llava_next_bilinear", video)
    assert family("llava_next_bilinear") is video
    cfg = LlavaConfig.from_hf({"model_type": "llava_next_bilinear"})
    assert cfg.family is video and cfg.video_token_id == 32001 and cfg.image_grid_pinpoints
    with pytest.raises(AssertionError):  # a family that takes video must say how its features are packed
        dataclasses.replace(video, video_packing=None)


def test_family_modules_are_light():
    """families/ imports only the standard library and llavakit.errors (config.py is torch-free)."""
    allowed_relative = {"base", "errors", "llava", "llava_next", "llava_onevision", "llava_next_video"}
    for path in (PACKAGE / "families").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = {node.module.split(".")[-1]} if node.module else {a.name for a in node.names}
                assert names <= allowed_relative, (path.name, names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for m in mods:
                    assert m.split(".")[0] in {"__future__", "dataclasses", "typing", "re"}, (path.name, m)
    assert set(families.__all__) >= {"FAMILIES", "TOWERS", "Family", "Tower", "family", "tower"}
    assert isinstance(family("llava"), Family)


_FAMILY_TEST = re.compile(r"model_type\s*(==|!=|in\s*\()")


def test_no_model_type_string_tests_outside_families_and_config():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "families" or rel == Path("config.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if _FAMILY_TEST.search(line):
                offenders.append(f"llavakit/{rel}:{i}: {line.strip()}")
    assert not offenders, "ask llavakit.families instead of testing model_type:\n" + "\n".join(offenders)
