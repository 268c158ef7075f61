"""Shared fixtures: tiny random checkpoints built once per session by transformers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reference import make_llava  # noqa: E402

# name -> make_llava arguments; each is one checkpoint folder per test session.
CHECKPOINTS = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral", text_extra={"sliding_window": 24}),
    "qwen2": dict(family="qwen2"),
    "llama_full_list": dict(family="llama", vision_feature_layer=[-3, -1], strategy="full"),
    "qwen2_tied": dict(family="qwen2", tie=True, vision_feature_layer=0),
    # llava-interleave: SigLIP tower, "full", last layer
    "qwen2_siglip": dict(family="qwen2", tower="siglip", strategy="full", vision_feature_layer=-1, tie=True),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> Path of a tiny random checkpoint (built on first use)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = make_llava(tmp_path_factory.mktemp(name), seed=len(built), **CHECKPOINTS[name])
        return built[name]

    return get
