"""Tensor parallelism computes what one process computes: 2 ranks (gloo, 127.0.0.1), float32, every family.

Through the continuous-batching engine with its caches (image features, prefix blocks, prompts
prefilled in chunks): greedy tokens identical to the one-process model's, log-probabilities within
1e-4; text only, one or several images, video. The ranks run as threads (parallel_helpers.py);
test_processes.py starts real processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.engine import core
from llavakit.engine.async_engine import EngineConfig
from llavakit.engine.core import Engine, run_to_completion
from llavakit.parallel.layers import RowParallel, VocabEmbedding, VocabHead

from parallel_helpers import thread_ranks
from reference import make_llava

LOGPROB_TOL = 1e-4


def _image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _video(seed: int, frames: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 30, 40, 3), dtype=np.uint8)


def _conv(text: str, images=(), videos=()) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _requests(family: str) -> list[list[dict]]:
    """Text only, one image, two images of other sizes, the first image again (a feature-cache hit);
    a video for OneVision."""
    out = [_conv("How many people are there?"),
           _conv("What is in the picture?", [_image(1, 50, 40)]),
           _conv("Describe the image in detail.", [_image(2, 30, 60), _image(3, 70, 35)]),
           _conv("The quick brown fox jumps over the lazy dog.", [_image(1, 50, 40)])]
    if family in ("onevision", "next_video"):
        out += [_conv("What happens in the video?", videos=[_video(4)])]
    return out


def _answers(vlm, conversations, max_new_tokens: int = 8) -> tuple[list[list[int]], list[list[float]], Engine]:
    """Token ids and their log-probabilities per conversation, all run together on one fresh engine;
    then the first conversation once more with a follow-up turn (a prefix-cache hit)."""
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig(max_batch_size=8))
    params = llavakit.SamplingParams(max_new_tokens=max_new_tokens, logprobs=True, ignore_eos=True)
    ids, logprobs = {}, {}
    follow = conversations[1] + [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                                 {"role": "user", "content": [{"type": "text", "text": "And the sky?"}]}]
    for batch in (conversations, [follow]):
        requests = [(f"{len(ids) + i}", vlm.processor.encode(c), params) for i, c in enumerate(batch)]
        for rid, delta in run_to_completion(engine, requests):
            assert delta.error is None, delta.error
            ids.setdefault(rid, []).append(delta.token_id)
            logprobs.setdefault(rid, []).append(delta.logprob)
    order = sorted(ids, key=int)
    return [ids[k] for k in order], [logprobs[k] for k in order], engine


def _text_logprob_diff(got: torch.Tensor, want: torch.Tensor, batch, cfg) -> float:
    """Largest log-probability difference over the batch's real text positions.

    Positions holding image or video features are left out: what the model predicts there is never
    used (the next position is a feature again, not a sampled token). They are also where splitting
    the tower shows most, as float32 rounding: the tiny random towers' features reach about 450, and
    summing a row-split layer's two halves rounds differently from one product (OneVision: 1.7e-4 at
    those positions, 3.6e-5 at the text ones; with the tower whole, 4.4e-6).
    """
    placeholder = batch.input_ids == cfg.image_token_id
    if cfg.video_token_id is not None:
        placeholder |= batch.input_ids == cfg.video_token_id
    rows = batch.attention_mask.bool() & ~placeholder
    return (got.log_softmax(-1) - want.log_softmax(-1))[rows].abs().max().item()


@pytest.mark.parametrize("family", ["llama", "next_mistral", "onevision", "next_video"])
def test_two_ranks_answer_as_one_process(models, checkpoint, family, monkeypatch):
    one = models(family)[0]
    monkeypatch.setattr(core, "PREFILL_CHUNK", 24)  # long prompts are prefilled in several steps
    conversations = _requests(family)
    want_ids, want_logprobs, _ = _answers(one, conversations)
    with thread_ranks(checkpoint(family)) as tp:
        got_ids, got_logprobs, engine = _answers(tp, conversations)
        stats = engine.stats()
        # Every text position's log-probabilities over a prepared batch (VLM.forward: no cache, left padding).
        batch = one.prepare(conversations[:3])
        diff = _text_logprob_diff(tp.forward(batch), one.forward(batch), batch, one.config)
    assert got_ids == want_ids
    worst = max(abs(a - b) for got, want in zip(got_logprobs, want_logprobs) for a, b in zip(got, want))
    assert worst <= LOGPROB_TOL, worst
    assert diff <= LOGPROB_TOL, diff
    assert stats["image_cache_hits"] >= 1 and stats["prefix_cache_hit_tokens"] > 0  # the caches were used


def test_the_split_is_megatron_s(checkpoint):
    """Each rank holds half of every split layer; the row-split ones all-reduce, the head gathers."""
    with thread_ranks(checkpoint("onevision")) as tp:
        model, cfg = tp.model, tp.config
        attn, mlp = model.language_model.layers[0].self_attn, model.language_model.layers[0].mlp
        hd = cfg.text.head_dim
        assert attn.q_proj.out_features == cfg.text.num_heads // 2 * hd
        assert attn.k_proj.out_features == cfg.text.num_kv_heads // 2 * hd
        assert isinstance(attn.o_proj, RowParallel) and attn.o_proj.linear.in_features == cfg.text.num_heads // 2 * hd
        assert isinstance(mlp.down_proj, RowParallel) and mlp.gate_proj.out_features == cfg.text.intermediate_size // 2
        assert isinstance(model.language_model.embed_tokens, VocabEmbedding) and isinstance(model.lm_head, VocabHead)
        assert model.language_model.embed_tokens.weight.shape[0] == -(-cfg.text.vocab_size // 2)
        tower = model.vision_tower.encoder.layers[0]
        assert tower.self_attn.q_proj.out_features == cfg.vision.hidden_size // 2
        assert isinstance(tower.mlp.fc2, RowParallel)
        assert model.language_model.fused_decode is None  # the native whole-step decode cannot all-reduce
        whole = _one(checkpoint("onevision"))
        assert tp.info()["parameters"] == sum(p.numel() for p in {id(p): p for p in whole.parameters()}.values())


def _one(path):
    return llavakit.load(path, dtype=torch.float32).model


@pytest.fixture(scope="module")
def mqa_checkpoint(tmp_path_factory):
    """One key/value head for 4 query heads, so that 2 ranks repeat it."""
    return make_llava(tmp_path_factory.mktemp("mqa"), family="qwen2", seed=3, text_extra={"num_key_value_heads": 1})


def test_fewer_kv_heads_than_ranks_are_repeated(mqa_checkpoint):
    one = llavakit.load(mqa_checkpoint, dtype=torch.float32)
    conversations = _requests("qwen2")[:3]
    want_ids, want_logprobs, _ = _answers(one, conversations)
    with thread_ranks(mqa_checkpoint) as tp:
        assert tp.model.language_model.layers[0].self_attn.k_proj.out_features == tp.config.text.head_dim
        got_ids, got_logprobs, _ = _answers(tp, conversations)
    assert got_ids == want_ids
    assert max(abs(a - b) for g, w in zip(got_logprobs, want_logprobs) for a, b in zip(g, w)) <= LOGPROB_TOL


def test_a_tower_kept_on_rank_0_and_int8_weights(checkpoint):
    """A tower whose heads do not divide stays whole on rank 0 (the others hold none of it); int8
    quantisation of each rank's share gives the one-process int8 model's tokens."""
    path = checkpoint("next_mistral")
    one = llavakit.load(path, dtype=torch.float32, quantize="int8")
    conversations = _requests("next_mistral")[1:3]
    want_ids, _, _ = _answers(one, conversations)
    cfg = one.config
    whole = dict(vision_split=False, vision_heads=cfg.vision.num_heads,
                 vision_intermediate=cfg.vision.intermediate_size, projector_rows=cfg.text.hidden_size)
    with thread_ranks(path, quantize="int8", plan_changes=whole) as tp:
        assert tp.model.vision_tower.encoder.layers[0].self_attn.q_proj.out_features == cfg.vision.hidden_size
        got_ids, _, _ = _answers(tp, conversations)
    assert got_ids == want_ids


def test_bad_input_fails_the_request_and_the_ranks_go_on(checkpoint):
    with thread_ranks(checkpoint("llama")) as tp:
        batch = tp.prepare([_conv("What is in the picture?", [_image(5, 40, 40)])])
        with pytest.raises(ValueError, match="vision tower expects pixel values"):
            tp.model.encode_tiles(torch.zeros(1, 3, 8, 8))  # every rank raises before any collective
        assert tp.parallel.failed is None
        assert tp.forward(batch).shape[-1] == tp.config.text.vocab_size
        with pytest.raises(llavakit.ConfigError, match="load it without tensor_parallel_size to save it"):
            tp.save_pretrained("unused")

