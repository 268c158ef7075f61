"""Shared fixtures: tiny random checkpoints built once per session by transformers."""

from __future__ import annotations

import os
import tempfile
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# quantised loads keep their weights in a disk cache: the session's own, not the user's
_QUANTIZED_CACHE = tempfile.TemporaryDirectory(prefix="llavakit-quantized-")
os.environ.setdefault("LLAVAKIT_QUANTIZED_CACHE", _QUANTIZED_CACHE.name)

import llavakit  # noqa: E402
from reference import load_reference, make_llava, make_llava_next, make_llava_next_video, make_llava_onevision  # noqa: E402,E501
from reference import CHATML_TEMPLATE  # noqa: E402

# name -> make_llava arguments; each is one checkpoint folder per test session.
CHECKPOINTS = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral", text_extra={"sliding_window": 24}),
    # Seeds are pinned where the default one gives answers too short or repetitive to test sampling on.
    "qwen2": dict(family="qwen2", seed=1),
    "llama_full_list": dict(family="llama", vision_feature_layer=[-3, -1], strategy="full"),
    "qwen2_tied": dict(family="qwen2", tie=True, vision_feature_layer=0),
    # llava-interleave: SigLIP tower, "full", last layer
    "qwen2_siglip": dict(family="qwen2", tower="siglip", strategy="full", vision_feature_layer=-1, tie=True),
    # CLIP "full" with a layer list on Mistral; a projector without biases and another activation
    "mistral_full_list_nobias": dict(family="mistral", strategy="full", vision_feature_layer=[-2, 0],
                                     projector_bias=False, projector_act="gelu_pytorch_tanh"),
    # CLIP "default" with a layer list on Qwen2
    "qwen2_default_list": dict(family="qwen2", vision_feature_layer=[1, -1]),
    # LLaVA-NeXT
    "next_mistral": dict(builder=make_llava_next, family="mistral"),
    "next_llama_layers_list": dict(builder=make_llava_next, family="llama", vision_feature_layer=[-3, -1], seed=1),
    "next_qwen2_tied": dict(builder=make_llava_next, family="qwen2", tie=True, template=CHATML_TEMPLATE),
    "next_siglip_full": dict(builder=make_llava_next, family="llama", tower="siglip", template=CHATML_TEMPLATE),
    # LLaVA-OneVision
    "onevision": dict(builder=make_llava_onevision),  # untied: greedy answers are diverse enough to compare
    # 0.5B-style tied embeddings, a lower cap, two feature layers
    "onevision_cap4_list": dict(builder=make_llava_onevision, max_tiles=4, vision_feature_layer=[-3, -1], tie=True),
    # LLaVA-NeXT-Video: the published settings (average pooling by 2, CLIP "default", layer -2) on Llama;
    # max pooling by 3 with two feature layers on Mistral; a learned conv on tied Qwen2; SigLIP "full"
    # pooled by 4 (a 6x6 grid floors to 1x1)
    "next_video": dict(builder=make_llava_next_video),
    "next_video_max3_list": dict(builder=make_llava_next_video, family="mistral", pool_mode="max", pool_stride=3,
                                 vision_feature_layer=[-3, -1]),
    "next_video_conv_qwen2_tied": dict(builder=make_llava_next_video, family="qwen2", pool_mode="conv", tie=True),
    "next_video_siglip_full": dict(builder=make_llava_next_video, tower="siglip", pool_stride=4,
                                   vision_feature_layer=-1),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> Path of a tiny random checkpoint (built on first use)."""
    built = {}

    def get(name: str):
        if name not in built:
            kwargs = dict(CHECKPOINTS[name])
            builder = kwargs.pop("builder", make_llava)
            # The seed follows the name, so a checkpoint is the same whichever tests ran before.
            seed = kwargs.pop("seed", zlib.crc32(name.encode()) % 10_000)
            built[name] = builder(tmp_path_factory.mktemp(name), seed=seed, **kwargs)
        return built[name]

    return get


@pytest.fixture(scope="session")
def models(checkpoint):
    """models(name) -> (vlm float32, reference model, reference processor), loaded once per session."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            path = checkpoint(name)
            ref, proc = load_reference(path)
            loaded[name] = (llavakit.load(path, dtype=torch.float32), ref, proc)
        return loaded[name]

    return get
