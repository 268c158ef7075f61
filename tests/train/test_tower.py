"""`llavakit pretrain-tower`: labels, learning, determinism, and a folder that init and transformers load."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file

import llavakit
from llavakit.cli import main
from llavakit.config import VisionConfig
from llavakit.errors import ConfigError
from llavakit.train import shapes as S
from llavakit.train.assemble import _pinpoints, init_checkpoint
from llavakit.train.tower import CLASSES, pretrain_tower, sample_batch, token_labels

VISION = "siglip:image_size=48,patch_size=16,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
TEXT = ("qwen2:hidden_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
        "intermediate_size=128,max_position_embeddings=1024")


def test_a_token_is_labelled_with_the_shape_whose_centre_it_holds():
    shapes = [S.Shape("red", "circle", (20, 2, 30, 12)),  # centre (25, 7): row 0, column 1
              S.Shape("blue", "triangle", (33, 33, 47, 47))]  # centre (40, 40): row 2, column 2
    labels = token_labels(shapes, size=48, patch=16)
    assert labels == [0, 1 + CLASSES.index(("red", "circle")), 0, 0, 0, 0, 0, 0,
                      1 + CLASSES.index(("blue", "triangle"))]


def _cfg() -> VisionConfig:
    return VisionConfig.from_hf({"model_type": "siglip_vision_model", "image_size": 48, "patch_size": 16,
                                 "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64})


def test_batches_hold_normalised_pictures_and_one_label_per_token():
    cfg = _cfg()
    pixels, labels = sample_batch(random.Random(0), 12, cfg)
    assert pixels.shape == (12, 3, 48, 48) and labels.shape == (12, 9)
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0  # SigLIP's (x - 0.5) / 0.5
    counts = (labels > 0).sum(1)
    assert 1 <= counts.min() and counts.max() <= S.MAX_SHAPES
    again, _ = sample_batch(random.Random(0), 12, cfg)
    assert torch.equal(pixels, again)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower") / "t"
    return out, pretrain_tower(out, VISION, steps=200, batch_size=16, lr=3e-3, seed=0, progress=False)


def test_pretraining_lowers_the_loss_and_writes_a_vision_checkpoint(tower):
    out, summary = tower
    assert summary["final_loss"] < 0.6 * summary["first_loss"]
    _, labels = sample_batch(random.Random("tower/0/test"), 256, _cfg())
    empty = (labels == 0).float().mean().item()  # what "nothing everywhere" would score
    assert summary["token_accuracy"] > empty + 0.03 and summary["shape_accuracy"] > 0.15
    assert json.loads((out / "train_summary.json").read_text()) == summary
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model" and config["architectures"] == ["SiglipVisionModel"]
    keys = load_file(str(out / "model.safetensors"))
    assert keys and all(k.startswith("vision_model.") for k in keys)


def test_the_same_seed_gives_the_same_tower(tower, tmp_path):
    out, _ = tower
    again = tmp_path / "again"
    pretrain_tower(again, VISION, steps=200, batch_size=16, lr=3e-3, seed=0, progress=False)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_takes_the_tower_and_transformers_loads_it(tower, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, _ = tower
    reference = transformers.SiglipVisionModel.from_pretrained(out).eval()
    model = init_checkpoint(tmp_path / "init", "llava_onevision", str(out), TEXT, corpus=[_corpus(tmp_path)],
                            vocab_size=300)
    vision_config = json.loads((model / "config.json").read_text())["vision_config"]
    assert vision_config["model_type"] == "siglip_vision_model" and "architectures" not in vision_config
    ours = llavakit.load(model, dtype="float32").model.vision_tower
    pixels, _ = sample_batch(random.Random(1), 3, ours.cfg)
    with torch.no_grad():
        want = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        got = ours(pixels, (-1,))
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec,message", [
    (VISION.replace("patch_size=16,", ""), "needs patch_size=N"),
    (VISION.replace("patch_size=16", "patch_size=0"), "needs patch_size=N with N a positive integer, got 0"),
    (VISION.replace("patch_size=16", "patch_size=20"), "patch_size 20 must divide image_size 48"),
    (VISION.replace("patch_size=16", "patch_size=24"), "be at most 16, so that no patch spans two cells"),
    (VISION.replace("image_size=48", "image_size=32"), "image_size must be at least 48"),
    (VISION.replace("image_size=48", "image_size=abc"), "image_size must be an integer"),
    (VISION.replace("num_attention_heads=2", "num_attention_heads=3"), "not a multiple of num_attention_heads 3"),
    ("vit:image_size=48", "unknown model spec kind 'vit'"),
])
def test_bad_specs_are_refused(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        pretrain_tower(tmp_path / "x", spec, steps=1, progress=False)
    assert not (tmp_path / "x").exists()  # nothing written


def test_bad_arguments_and_folders_are_refused(tmp_path):
    for kwargs in ({"steps": 0}, {"batch_size": 0}, {"lr": 0.0}):
        with pytest.raises(ConfigError, match="steps and batch size must be >= 1 and lr > 0"):
            pretrain_tower(tmp_path / "x", VISION, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="starts from a size spec"):
        pretrain_tower(tmp_path / "x", str(tmp_path), steps=1, progress=False)


def test_a_clip_tower_drops_its_class_token_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = VISION.replace("siglip:", "clip:")
    summary = pretrain_tower(tmp_path / "c", spec, steps=3, batch_size=4, progress=False)
    assert summary["steps"] == 3
    reference = transformers.CLIPVisionModel.from_pretrained(tmp_path / "c").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "c")
    from PIL import Image

    pixels = processor(images=Image.new("RGB", (48, 48), (200, 30, 30)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 48, 48)  # no crop to CLIP's default 224
    model = init_checkpoint(tmp_path / "init", "llava", str(tmp_path / "c"), TEXT, corpus=[_corpus(tmp_path)],
                            vocab_size=300)
    ours = llavakit.load(model, dtype="float32").model.vision_tower
    with torch.no_grad():
        want = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        got = ours(pixels, (-1,))
    assert (got - want).abs().max().item() <= 1e-5


def _corpus(folder):
    corpus = folder / "corpus.txt"
    corpus.write_text("What colour is the circle? red blue green\n")
    return corpus


def test_cli_pretrain_tower(tmp_path, capsys):
    assert main(["pretrain-tower", "--vision", VISION, "--out", str(tmp_path / "t"), "--steps", "2",
                 "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and (tmp_path / "t" / "model.safetensors").is_file()


# ---- the free world -------------------------------------------------------------------------------

def test_free_patch_labels_take_the_shape_covering_most_of_each_patch():
    from llavakit.train.tower import patch_labels

    red, blue = 1 + CLASSES.index(("red", "circle")), 1 + CLASSES.index(("blue", "square"))
    shapes = [("red", "circle", (0.0, 0.0, 36.0, 36.0)),  # all of patch 0, an eighth of patches 1 and 3
              ("blue", "square", (36.0, 36.0, 64.0, 64.0)),  # 77% of patch 4, where the red covers 1.6%
              ("red", "circle", (70.0, 70.0, 72.0, 72.0))]  # 2 px: a smudge, labelled nowhere
    labels = patch_labels(shapes, side=96, patch=32)
    assert labels.tolist() == [red, 0, 0, 0, blue, 0, 0, 0, 0]
    small = [("blue", "square", (40.0, 40.0, 50.0, 50.0))]  # a tenth of the patch, but all of the shape
    assert patch_labels(small, side=96, patch=32).tolist() == [0, 0, 0, 0, blue, 0, 0, 0, 0]


def test_free_patch_targets_give_every_token_of_a_shape_its_whole_centre():
    from llavakit.train.tower import patch_targets

    cut = [("green", "triangle", (-32.0, 40.0, 56.0, 90.0))]  # cut by the left edge: centre at x = 12
    labels, centres = patch_targets(cut, side=96, patch=32)
    held = [i for i, v in enumerate(labels.tolist()) if v]
    assert held == [3, 4, 6, 7]  # rows 1 and 2, columns 0 and 1 (column 1 holds 24 of its 32 px)
    for i in held:
        assert centres[i].tolist() == pytest.approx([12 / 96, 65 / 96])
    assert not centres[[0, 1, 2, 5, 8]].any()


def test_free_views_follow_the_processor_and_hold_their_shapes():
    from llavakit.train.tower import free_views

    rng = random.Random(5)
    seen = 0
    views = [v for _ in range(15) for v in free_views(rng, 64, _pinpoints("llava_onevision", 64))]
    assert len(views) >= 30  # several views of each drawn picture
    for hwc, shapes in views:
        assert hwc.shape == (64, 64, 3) and hwc.dtype.name == "uint8"
        for color, kind, (x0, y0, x1, y1) in shapes:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if 2 <= cx < 62 and 2 <= cy < 62 and x1 - x0 >= 8 and kind == "square":
                pixel = hwc[int(cy), int(cx)].astype(int)  # a square's centre shows its colour
                assert max(abs(pixel - S.COLORS[color])) <= 60, (color, pixel)
                seen += 1
    assert seen >= 3


def test_free_world_pretraining_writes_a_tower(tmp_path):
    spec = "siglip:image_size=64,patch_size=16,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
    summary = pretrain_tower(tmp_path / "f", spec, steps=3, batch_size=4, progress=False, world="free")
    assert summary["world"] == "free" and summary["steps"] == 3
    assert (tmp_path / "f" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="world must be grid or free"):
        pretrain_tower(tmp_path / "g", spec, steps=1, progress=False, world="round")
    with pytest.raises(ConfigError, match="workers must be 0"):
        pretrain_tower(tmp_path / "g", spec, steps=1, progress=False, world="free", workers=2)
    with pytest.raises(ConfigError, match="--min-tiles must be 1 to 6"):
        pretrain_tower(tmp_path / "g", spec, steps=1, progress=False, world="free", min_tiles=0)
    with pytest.raises(ConfigError, match=r"--max-grid must be from --min-tiles \(3\) to 6"):
        pretrain_tower(tmp_path / "g", spec, steps=1, progress=False, world="free", min_tiles=3, max_grid=2)
    summary = pretrain_tower(tmp_path / "m", spec, steps=2, batch_size=4, progress=False, world="free", min_tiles=3,
                             workers=0)
    assert summary["steps"] == 2 and (tmp_path / "m" / "model.safetensors").is_file()


def test_free_views_from_grids_of_at_least_three_tiles_scale_small_pictures_up(monkeypatch):
    from llavakit.train import scenes, tower

    small = scenes.sample_picture(random.Random(0), 64, 64)  # one tile at the published grids
    monkeypatch.setattr(tower.scenes, "sample_picture", lambda rng: small)
    monkeypatch.setattr(tower, "FRAME_SHARE", 0.0)
    monkeypatch.setattr(tower, "JPEG_SHARE", 0.0)

    def widest_in_a_tile(min_tiles):
        views = tower.free_views(random.Random(1), 64, _pinpoints("llava_onevision", 64, min_tiles))
        return max(x1 - x0 for _, _, (x0, _, x1, _) in views[-1][1])  # the last view is a tile

    widest = max(s.box[2] - s.box[0] for s in small[1].shapes)
    assert widest_in_a_tile(1) == pytest.approx(widest)  # the 64-px picture is its own tile
    assert widest_in_a_tile(3) == pytest.approx(3 * widest)  # scaled onto 3x3 tiles of 64 px


def test_free_views_of_a_large_picture_end_at_the_largest_grid(monkeypatch):
    from llavakit.train import scenes, tower

    big = scenes.sample_picture(random.Random(0), 1000, 1000)
    monkeypatch.setattr(tower.scenes, "sample_picture", lambda rng: big)
    monkeypatch.setattr(tower, "FRAME_SHARE", 0.0)
    monkeypatch.setattr(tower, "JPEG_SHARE", 0.0)

    def widest_in_a_tile(max_grid):
        views = tower.free_views(random.Random(1), 64, _pinpoints("llava_onevision", 64, 1, max_grid))
        return max(x1 - x0 for _, _, (x0, _, x1, _) in views[-1][1])

    widest = max(s.box[2] - s.box[0] for s in big[1].shapes)
    assert widest_in_a_tile(6) == pytest.approx(widest * 384 / 1000)  # 1000 px onto 6 tiles of 64
    assert widest_in_a_tile(2) == pytest.approx(widest * 128 / 1000)  # ... onto 2


def test_a_drawing_worker_gives_the_weights_of_drawing_in_process(tmp_path):
    spec = "siglip:image_size=64,patch_size=32,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
    for workers in (0, 1):
        pretrain_tower(tmp_path / str(workers), spec, steps=2, batch_size=4, progress=False, world="free", workers=workers)
    a, b = (load_file(tmp_path / str(w) / "model.safetensors") for w in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
