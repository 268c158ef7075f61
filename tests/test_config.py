"""Config parsing: both transformers spellings, filled defaults, clear errors."""

import json

import pytest

from llavakit.config import LlavaConfig
from llavakit.errors import ConfigError

# llava-hf/llava-1.5-7b-hf's config.json as published (transformers 4.x spelling, sparse text_config).
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def test_published_llava_15_fills_transformers_defaults():
    cfg = LlavaConfig.from_hf(LLAVA_15_7B)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (
        4096, 11008, 32, 32, 32, 128)
    assert (t.vocab_size, t.rms_norm_eps, t.rope.theta, t.rope.kind) == (32064, 1e-5, 10000.0, "default")
    assert (t.qkv_bias, t.o_bias, t.sliding_windows) == (False, False, (None,) * 32)
    assert (v.hidden_size, v.num_layers, v.image_size, v.patch_size, v.hidden_act) == (1024, 24, 336, 14, "quick_gelu")
    assert cfg.image_token_id == 32000
    assert cfg.vision_feature_layers == (-2,)
    assert cfg.image_features_per_tile == 576
    assert cfg.tie_word_embeddings is False


def test_transformers_5_spelling_matches_4x():
    new = json.loads(json.dumps(LLAVA_15_7B))
    new["image_token_id"] = new.pop("image_token_index")
    new["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert LlavaConfig.from_hf(new) == LlavaConfig.from_hf(LLAVA_15_7B)


def test_llama3_rope_scaling_both_spellings():
    old = {"model_type": "llava", "text_config": {
        "model_type": "llama", "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}}
    new = {"model_type": "llava", "text_config": {"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}
    a, b = LlavaConfig.from_hf(old).text.rope, LlavaConfig.from_hf(new).text.rope
    assert a == b
    assert (a.kind, a.theta, a.factor, a.original_max_position_embeddings) == ("llama3", 500000.0, 8.0, 8192)


def test_family_switches():
    mistral = LlavaConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "mistral", "num_hidden_layers": 2}})
    assert mistral.text.sliding_windows == (4096, 4096)  # the 4.x/5.x default when the key is absent
    v02 = LlavaConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "mistral", "sliding_window": None}})
    assert set(v02.text.sliding_windows) == {None}
    qwen = LlavaConfig.from_hf({"model_type": "llava", "text_config": {
        "model_type": "qwen2", "num_hidden_layers": 3, "tie_word_embeddings": True,
        "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}})
    assert (qwen.text.qkv_bias, qwen.text.o_bias) == (True, False)
    assert qwen.text.sliding_windows == (None, 16, 16)
    assert qwen.tie_word_embeddings is True  # forwarded from text_config as transformers does
    llama_bias = LlavaConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "llama", "attention_bias": True}})
    assert (llama_bias.text.qkv_bias, llama_bias.text.o_bias) == (True, True)


def test_feature_layer_list_and_full_strategy():
    cfg = LlavaConfig.from_hf({**LLAVA_15_7B, "vision_feature_layer": [-2, -5, 3], "vision_feature_select_strategy": "full"})
    assert cfg.vision_feature_layers == (-2, -5, 3)
    assert cfg.image_features_per_tile == 577


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "llava_foo"}, "supported model types: llava"),
        ({"text_config": {"model_type": "gemma"}}, "supported: llama, mistral, qwen2"),
        ({"vision_config": {"model_type": "pixtral"}}, "supported: clip_vision_model"),
        ({"text_config": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}},
         "supported rope types: default, linear, llama3"),
        ({"vision_feature_select_strategy": "cls"}, "supported: default, full"),
        ({"projector_hidden_act": "swish"}, "supported activations"),
        ({"vision_feature_layer": 30}, "out of range"),
    ],
)
def test_unsupported_values_name_what_is_supported(patch, message):
    with pytest.raises(ConfigError, match=message):
        LlavaConfig.from_hf({**LLAVA_15_7B, **patch})


def test_not_a_dict():
    with pytest.raises(ConfigError, match="JSON object"):
        LlavaConfig.from_hf([1, 2])
