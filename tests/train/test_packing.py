"""Training with shared media (`train --share-media`): conversations about one picture packed after
its tokens give the loss and the gradients of the same conversations trained apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavakit.checkpoint import open_checkpoint
from llavakit.errors import ConfigError
from llavakit.model.text import attention_mask
from llavakit.train import packing
from llavakit.train.assemble import init_checkpoint
from llavakit.train.data import collate, encode_example, read_records
from llavakit.train.loop import TrainConfig, _order, load_dataset, train
from llavakit.train.objective import loss_sum

from tiny_training import COLORS, TEXT, VISION, write_records

QUESTIONS = [("What colour is the picture?", "{c}"), ("Is the picture bright?", "no, it is {c}"),
             ("Name its colour in one word.", "{c}.")]


def _write_data(folder: Path, pictures: int = 6) -> Path:
    """Pictures of one colour, each with 1 to 3 conversations (1 or 2 turns) about it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(pictures):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (32 + 16 * (i % 3), 32), COLORS[name]).save(folder / f"{i}.png")
        for k in range(1 + i % 3):
            q, a = QUESTIONS[k]
            turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a.format(c=name)}]
            if k == 1:
                turns += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a rectangle"}]
            lines.append({"id": f"{i}-{k}", "image": f"{i}.png", "conversations": turns})
    return write_records(folder, lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    data = _write_data(root / "data")
    model = init_checkpoint(root / "init", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, seed=0)
    return model, data


def _media_ids(vlm) -> set[int]:
    return {vlm.model.cfg.image_token_id, vlm.model.cfg.video_token_id}


def test_packed_conversations_give_the_loss_and_gradients_of_separate_ones(tiny):
    model, data = tiny
    vlm = open_checkpoint(model, dtype=torch.float32, device="cpu")
    records = list(read_records(data))
    keys = [packing.media_key(r) for r in records]
    examples = [encode_example(vlm.processor, r.messages) for r in records]
    packed = packing.pack_batch(examples, keys, _media_ids(vlm))
    assert len(packed) == 6 and len(examples) == 12  # one row per picture: 1 + 2 + 3 conversations each
    three = packed[-1]
    assert sorted(set(three.segments)) == [0, 1, 2, 3]
    prefix = three.segments.count(0)
    assert all(t != vlm.model.cfg.image_token_id for t in three.input_ids[prefix:])
    assert three.positions[:prefix] == list(range(prefix)) and three.positions[prefix] == prefix
    assert len(three.input_ids) == sum(len(e.input_ids) for e in examples[-3:]) - 2 * prefix

    def loss_and_grads(batch_examples):
        vlm.model.zero_grad(set_to_none=True)
        total, n = loss_sum(vlm.model, collate(batch_examples, vlm.processor.pad_token_id))
        total.backward()
        return total.detach(), n, {k: p.grad.clone() for k, p in vlm.model.named_parameters() if p.grad is not None}

    apart, n_apart, g_apart = loss_and_grads(examples)
    together, n_together, g_together = loss_and_grads(packed)
    assert n_together == n_apart > 0
    assert abs(float(together - apart)) <= 1e-4 * float(apart)
    assert g_apart.keys() == g_together.keys()
    for k in g_apart:  # summed losses: gradients up to hundreds (some zero but for noise), float32 sums reordered
        assert float((g_apart[k] - g_together[k]).abs().max()) <= 1e-6 * float(g_apart[k].abs().max()) + 1e-7, k


def test_a_conversation_encoded_with_anothers_media_is_encoded_as_alone(tiny):
    model, data = tiny
    vlm = open_checkpoint(model, dtype=torch.float32, device="cpu")
    records = list(read_records(data))
    first, second = (encode_example(vlm.processor, r.messages) for r in records[1:3])  # one picture's two
    reused = encode_example(vlm.processor, records[2].messages, media=first)
    assert reused.input_ids == second.input_ids and reused.labels == second.labels
    assert reused.pixel_values is first.pixel_values and (reused.pixel_values == second.pixel_values).all()
    assert reused.image_layouts == second.image_layouts


def test_conversations_whose_media_follow_a_target_stay_apart(tiny):
    model, data = tiny
    vlm = open_checkpoint(model, dtype=torch.float32, device="cpu")
    image = str(data.parent / "0.png")
    late = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    other = late[:3] + [{"role": "assistant", "content": [{"type": "text", "text": "it is red"}]}]
    members = [encode_example(vlm.processor, m) for m in (late, other)]
    assert packing.pack(members, _media_ids(vlm)) == members  # the picture comes after the answer "hi"
    assert packing.pack(members[:1], _media_ids(vlm)) == members[:1]


def test_media_keys_group_records_of_the_same_media(tiny):
    _, data = tiny
    records = list(read_records(data))
    keys = [packing.media_key(r) for r in records]
    assert keys[1] == keys[2] != keys[0]
    assert packing.media_groups(keys) == [[0], [1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11]]
    assert packing.media_groups([None, "a", None, "a"]) == [[0], [1, 3], [2]]


def test_the_order_keeps_each_groups_records_together_and_singletons_change_nothing():
    groups = [[0], [1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11]]
    order = _order(12, seed=3, epoch=1, groups=groups)
    assert sorted(order) == list(range(12))
    for g in groups:
        at = order.index(g[0])
        assert order[at:at + len(g)] == g
    lengths = [50 + 7 * (i % 5) for i in range(40)]
    for batch in (1, 4):
        assert _order(40, 1, 0, lengths, batch) == _order(40, 1, 0, lengths, batch, [[i] for i in range(40)])
    grouped = _order(40, 1, 0, lengths, 4, [[i, i + 1] for i in range(0, 40, 2)])
    assert sorted(grouped) == list(range(40))


def test_the_check_before_training_counts_each_records_media_tokens(tiny):
    model, data = tiny
    vlm = open_checkpoint(model, dtype=torch.float32, device="cpu")
    records = load_dataset(data, vlm, TrainConfig(), log=lambda *_: None)
    for rec in records[:3]:
        example = encode_example(vlm.processor, rec.messages)
        assert rec.media_tokens == sum(x.tokens for x in example.image_layouts) > 0
        assert rec.tokens - 1 == len(example.input_ids)  # "about": the placeholder is counted as well


def test_segments_see_the_prefix_and_themselves():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 0]])  # the last token is padding
    valid = torch.tensor([[True] * 6 + [False]])
    mask = attention_mask(valid, 7, None, "cpu", segments)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0],
                         [1, 1, 0, 0, 1, 1, 0],
                         [1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees itself only
    assert torch.equal(mask, want)


def test_training_with_shared_media_runs_and_learns(tiny, tmp_path):
    model, data = tiny
    cfg = TrainConfig(stage="full", max_steps=12, batch_size=4, lr=3e-3, seed=0, share_media=True,
                      group_by_length=True)
    summary = train(model, data, tmp_path / "out", cfg, progress=False)
    assert summary["steps"] == 12 and summary["samples"] == 48
    assert summary["final_loss"] < summary["first_loss"]
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["share_media"] is True


def test_shared_media_refuses_sliding_window_models(tiny, tmp_path):
    model, data = tiny
    windowed = tmp_path / "windowed"
    windowed.mkdir()
    for f in Path(model).iterdir():
        (windowed / f.name).write_bytes(f.read_bytes())
    config = json.loads((windowed / "config.json").read_text())
    config["text_config"].update(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    (windowed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="--share-media packs conversations by position"):
        train(windowed, data, tmp_path / "out", TrainConfig(max_steps=1, batch_size=2, share_media=True),
              progress=False)
