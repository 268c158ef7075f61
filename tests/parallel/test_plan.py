"""How a config splits over N ranks, and the ConfigError for a split that cannot be, before any weight is read."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

import llavakit
from llavakit import weights
from llavakit.config import LlavaConfig
from llavakit.errors import ConfigError
from llavakit.parallel.plan import make_plan
from llavakit.weights import read_raw_config


def _config(heads: int = 14, kv_heads: int = 2, intermediate: int = 4864, vision_heads: int = 16,
            vocab: int = 151647) -> LlavaConfig:
    """A OneVision-0.5B-shaped config (14 heads, 2 kv heads) with the given widths."""
    return LlavaConfig.from_hf({
        "model_type": "llava_onevision",
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": heads,
                        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
                        "num_hidden_layers": 2},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_attention_heads": vision_heads, "num_hidden_layers": 2, "image_size": 384,
                          "patch_size": 14},
    })


def test_kv_heads_are_repeated_when_fewer_than_ranks():
    plan = make_plan(_config(), 2, 8, "CPU cores")
    assert (plan.heads, plan.kv_heads, plan.intermediate) == (7, 1, 2432)
    hd = plan.head_dim
    assert [plan.head_range(r) for r in range(2)] == [(0, 7 * hd), (7 * hd, 14 * hd)]
    assert [plan.kv_range(r) for r in range(2)] == [(0, hd), (hd, 2 * hd)]
    # 8 query heads, 2 kv heads, 4 ranks: ranks 0-1 read kv head 0, ranks 2-3 kv head 1 (query head h reads h // 4)
    four = make_plan(_config(heads=8, intermediate=4096), 4, 8, "CPU cores")
    assert four.kv_heads == 1 and [four.kv_range(r)[0] // hd for r in range(4)] == [0, 0, 1, 1]


def test_the_vocabulary_is_padded_and_a_tower_that_does_not_divide_stays_whole():
    plan = make_plan(_config(vision_heads=12), 2, 8, "CPU cores")
    assert plan.vocab_rows == 75824 and plan.vocab_range(1) == (75824, 151648)  # 151647 rows + 1 zero row
    assert plan.vision_split  # 12 heads, 4304 MLP rows, decoder width 896: all even
    three = make_plan(_config(heads=12, kv_heads=3, intermediate=4800, vision_heads=16), 3, 8, "CPU cores")
    assert not three.vision_split  # 16 tower heads do not divide by 3


@pytest.mark.parametrize("size, kwargs, message", [
    (4, {}, "tensor_parallel_size 4 does not divide the decoder's 14 attention heads (2 key/value heads); "
            "sizes that fit this model: 1, 2."),
    (2, dict(heads=12, kv_heads=3, intermediate=4800), "tensor_parallel_size 2 and the decoder's 3 key/value heads "
                                                      "(12 attention heads) do not divide one another"),
    (2, dict(intermediate=4863), "tensor_parallel_size 2 does not divide the decoder's MLP width 4863 "
                                 "(14 attention heads)"),
    (2, {}, "tensor_parallel_size 2 needs 2 CPU cores, and there are 1; use at most 1 (14 attention heads; "
            "sizes that fit this model: 1, 2)."),
    (0, {}, "tensor_parallel_size must be a positive integer, got 0"),
])
def test_impossible_splits_name_n_and_the_heads(size, kwargs, message):
    with pytest.raises(ConfigError) as e:
        make_plan(_config(**kwargs), size, 1 if "CPU cores" in message else 8, "CPU cores")
    assert str(e.value).startswith(message)


def test_load_refuses_before_reading_a_weight_or_starting_a_rank(checkpoint, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may be read or started for a split that cannot be")

    monkeypatch.setattr(weights, "_read_tensors", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    path = checkpoint("llama")  # 4 heads, 2 kv heads
    heads = LlavaConfig.from_hf(read_raw_config(path)).text
    assert (heads.num_heads, heads.num_kv_heads) == (4, 2)
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide the decoder's 4 attention heads"):
        llavakit.load(path, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer, got True"):
        llavakit.load(path, tensor_parallel_size=True)


def test_plans_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_plan(_config(), 2, 2, "CPU cores").size = 3


def test_parallel_error_is_public_and_a_llavakit_error():
    assert llavakit.ParallelError.__mro__[1] is llavakit.LlavakitError and "ParallelError" in llavakit.__all__
