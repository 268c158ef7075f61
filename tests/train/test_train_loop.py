"""The training loop end to end on a tiny model: stages, loss going down, resume, LoRA, bad data, init,
the output folder guard and evaluation progress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import llavakit
from llavakit.cli import main
from llavakit.errors import ConfigError
from llavakit.train import lora
from llavakit.train.assemble import init_checkpoint
from llavakit.train.loop import TrainConfig, TrainError, train

from tiny_training import COLORS, TEXT, VISION, write_records


def _write_data(folder: Path, n: int = 12) -> Path:
    """A tiny dataset: plain-colour pictures and their colour, in the LLaVA format."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (32 + 8 * (i % 2), 32), COLORS[name]).save(folder / f"{i}.png")
        lines.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": name},
            {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]})
    return write_records(folder, lines)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    data = _write_data(root / "data")
    model = init_checkpoint(root / "init", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, seed=0)
    return model, data


def _quiet(*_):
    pass


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_init_makes_a_checkpoint_transformers_loads(base):
    model, _ = base
    from transformers import LlavaOnevisionForConditionalGeneration

    vlm = llavakit.load(model, dtype="float32")
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    batch = vlm.prepare([[{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 32), "red")},
                                                       {"type": "text", "text": "What colour is the picture?"}]}]])
    from reference import onevision_reference_processor

    proc = onevision_reference_processor(model)
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 32), "red")},
                                         {"type": "text", "text": "What colour is the picture?"}]}]
    ref_in = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert ref_in["input_ids"].tolist() == batch.input_ids.tolist()
    with torch.no_grad():
        want = ref(**ref_in).logits
    assert float((vlm.forward(batch) - want).abs().max()) <= 1e-4
    tok = json.loads((model / "tokenizer.json").read_text())
    assert {"<image>", "<video>", "<|im_end|>"} <= {t["content"] for t in tok["added_tokens"]}


def test_init_min_tiles_scales_small_pictures_up_as_transformers_does(tmp_path):
    data = _write_data(tmp_path / "data", n=3)
    model = init_checkpoint(tmp_path / "m", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, seed=0,
                            min_tiles=3)
    config = json.loads((model / "config.json").read_text())
    assert min(min(p) for p in config["image_grid_pinpoints"]) == 96  # 3 tiles of 32
    assert len(config["image_grid_pinpoints"]) == 16  # grids 3x3 .. 6x6
    vlm = llavakit.load(model, dtype="float32")
    from reference import onevision_reference_processor

    proc = onevision_reference_processor(model)
    for size in [(40, 32), (20, 80), (200, 150)]:
        image = Image.new("RGB", size, "red")
        conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is the picture?"}]}]
        ref_in = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        batch = vlm.prepare([conv])
        assert ref_in["input_ids"].tolist() == batch.input_ids.tolist()
        assert min(batch.image_layouts[0].grid) >= 3  # even a 20 px side is scaled up onto 3 tiles
    with pytest.raises(ConfigError, match="--min-tiles is for llava_onevision"):
        init_checkpoint(tmp_path / "n", "llava_next", VISION, TEXT, corpus=[data], vocab_size=300, min_tiles=2)
    with pytest.raises(ConfigError, match="--min-tiles must be 1 to 6"):
        init_checkpoint(tmp_path / "o", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, min_tiles=7)


def test_init_max_grid_ends_the_grids_and_transformers_tiles_the_same(tmp_path):
    data = _write_data(tmp_path / "data", n=3)
    model = init_checkpoint(tmp_path / "m", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, seed=0,
                            min_tiles=2, max_grid=3, max_tiles=4)
    config = json.loads((model / "config.json").read_text())
    assert sorted(map(tuple, config["image_grid_pinpoints"])) == [(64, 64), (64, 96), (96, 64), (96, 96)]
    assert config["vision_aspect_ratio"] == "anyres_max_4"
    vlm = llavakit.load(model, dtype="float32")
    from reference import onevision_reference_processor

    proc = onevision_reference_processor(model)
    for size in [(20, 80), (300, 200), (1000, 250)]:
        image = Image.new("RGB", size, "blue")
        conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is the picture?"}]}]
        ref_in = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        batch = vlm.prepare([conv])
        assert ref_in["input_ids"].tolist() == batch.input_ids.tolist()
        assert 2 <= min(batch.image_layouts[0].grid) and max(batch.image_layouts[0].grid) <= 3
    with pytest.raises(ConfigError, match="--max-grid is for llava_onevision"):
        init_checkpoint(tmp_path / "n", "llava_next", VISION, TEXT, corpus=[data], vocab_size=300, max_grid=4)
    for bad in (1, 7):
        message = rf"--max-grid must be from --min-tiles \(2\) to 6 \(tiles a side\), got {bad}"
        with pytest.raises(ConfigError, match=message):
            init_checkpoint(tmp_path / "o", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300,
                            min_tiles=2, max_grid=bad)


def test_stages_train_what_they_should_and_the_loss_falls(base, tmp_path):
    model, data = base
    before = _weights(model)
    cfg = TrainConfig(stage="projector", max_steps=3, batch_size=4, lr=1e-3, seed=0)
    train(model, data, tmp_path / "p", cfg, log=_quiet, progress=False)
    after = _weights(tmp_path / "p")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k or "image_newline" in k for k in changed)

    cfg = TrainConfig(stage="full", train_vision=True, max_steps=40, batch_size=6, lr=3e-3, warmup_ratio=0.1, seed=0)
    summary = train(model, data, tmp_path / "f", cfg, eval_data=data, log=_quiet, progress=False)
    after = _weights(tmp_path / "f")
    assert any("vision_tower" in k and not torch.equal(before[k], after[k]) for k in before)
    assert summary["eval_loss"] < 0.5 * summary["first_loss"]  # it learned the fixed data
    vlm = llavakit.load(tmp_path / "f", dtype="float32")
    conv = [{"role": "user", "content": [{"type": "image", "image": str(data.parent / "1.png")},
                                         {"type": "text", "text": "What colour is the picture?"}]}]
    assert vlm.chat(conv, max_new_tokens=5).text == "blue"


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_reaches_the_same_weights(base, tmp_path, group_by_length):
    model, data = base
    cfg = TrainConfig(stage="full", max_steps=6, batch_size=3, grad_accum=2, lr=1e-3, save_every=3, seed=1,
                      group_by_length=group_by_length)
    train(model, data, tmp_path / "straight", cfg, log=_quiet, progress=False)
    # The same run stopped after its step-3 checkpoint, then resumed.
    stopped = TrainConfig(**{**cfg.__dict__})
    train(model, data, tmp_path / "resumed", TrainConfig(**{**cfg.__dict__, "max_steps": 6}), log=_quiet,
          progress=False)  # writes checkpoint-3 and the end
    import shutil

    shutil.rmtree(tmp_path / "resumed")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    summary = train(model, data, tmp_path / "resumed", stopped, resume=True, log=_quiet, progress=False)
    assert summary["steps"] == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainError, match="other options"):
        train(model, data, tmp_path / "resumed", TrainConfig(**{**cfg.__dict__, "lr": 5e-4}),
              resume=tmp_path / "straight" / "checkpoint-3", log=_quiet, progress=False)


def test_grouping_by_length_cuts_an_epoch_into_batches_of_about_one_length():
    from llavakit.train.loop import LENGTH_WINDOW, _order

    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 300, 2000).tolist()
    batch = 16
    order = _order(len(lengths), 3, 1, lengths, batch)
    assert sorted(order) == list(range(2000)) and order == _order(len(lengths), 3, 1, lengths, batch)
    assert order != _order(len(lengths), 3, 2, lengths, batch) and _order(2000, 3, 1) != order
    full = len(lengths) // (batch * LENGTH_WINDOW) * batch * LENGTH_WINDOW  # whole windows: no leftovers
    spread = [max(lengths[i] for i in order[j:j + batch]) - min(lengths[i] for i in order[j:j + batch])
              for j in range(0, full, batch)]
    plain = _order(len(lengths), 3, 1)
    random_spread = [max(lengths[i] for i in plain[j:j + batch]) - min(lengths[i] for i in plain[j:j + batch])
                     for j in range(0, full, batch)]
    assert max(spread) <= 25 and np.median(random_spread) >= 150  # 250 values over 64 batches: about 4 each
    # batches, not the sorted windows, come in a shuffled order: consecutive batches' lengths jump about
    firsts = [lengths[order[j]] for j in range(0, full, batch)]
    assert sum(b < a for a, b in zip(firsts, firsts[1:])) >= len(firsts) // 4


def test_lora_save_merge_load_equals_the_live_adapter(base, tmp_path):
    model, data = base
    cfg = TrainConfig(stage="lora", max_steps=5, batch_size=4, lr=5e-3, lora_r=4, lora_alpha=8, seed=0)
    train(model, data, tmp_path / "adapter", cfg, log=_quiet, progress=False)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in saved
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    live = llavakit.load(model, dtype="float32")
    lora.apply_adapter(live.model, tmp_path / "adapter")
    assert main(["merge-lora", "--model", str(model), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = llavakit.load(tmp_path / "merged", dtype="float32")
    conv = [[{"role": "user", "content": [{"type": "image", "image": str(data.parent / "0.png")},
                                          {"type": "text", "text": "What colour is the picture?"}]}]]
    want, got = live.forward(live.prepare(conv)), merged.forward(merged.prepare(conv))
    plain = llavakit.load(model, dtype="float32")
    assert float((got - want).abs().max()) <= 1e-4
    assert float((plain.forward(plain.prepare(conv)) - want).abs().max()) > 1e-3  # the adapter does something


def test_peft_loads_the_adapter(base, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlavaOnevisionForConditionalGeneration

    model, data = base
    train(model, data, tmp_path / "adapter", TrainConfig(stage="lora", max_steps=3, batch_size=4, lr=5e-3, seed=0),
          log=_quiet, progress=False)
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    live = llavakit.load(model, dtype="float32")
    lora.apply_adapter(live.model, tmp_path / "adapter")
    conv = [{"role": "user", "content": [{"type": "text", "text": "What colour is the picture?"}]}]
    batch = live.prepare([conv])
    with torch.no_grad():
        want = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert float((live.forward(batch) - want).abs().max()) <= 1e-4


def test_bad_records_are_reported_by_line(base, tmp_path):
    model, data = base
    lines = data.read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = [
        json.dumps({"image": "missing.png", "conversations": json.loads(lines[0])["conversations"]}),
        "{not json",
        json.dumps({"image": str(broken), "conversations": json.loads(lines[0])["conversations"]}),
        json.dumps({"image": ["0.png", "1.png"], "conversations": json.loads(lines[0])["conversations"]}),
    ]
    path = data.parent / "mixed.jsonl"
    path.write_text("\n".join(lines[:4] + bad) + "\n")
    messages = []
    with pytest.raises(TrainError, match="4 bad record"):
        train(model, path, tmp_path / "x", TrainConfig(max_steps=1, batch_size=2), log=messages.append, progress=False)
    text = "\n".join(messages)
    assert "mixed.jsonl line 5" in text and "missing.png" in text
    assert "line 6" in text and "line 7" in text and "cannot be read" in text
    assert "line 8" in text and "1 <image> marker(s) but the record lists 2" in text
    messages.clear()
    summary = train(model, path, tmp_path / "y", TrainConfig(max_steps=1, batch_size=2, on_bad_data="skip"),
                    log=messages.append, progress=False)
    assert summary["steps"] == 1 and any("skipping 4 bad record(s), training on 4" in m for m in messages)


def test_cli_train_and_eval(base, tmp_path, capsys):
    model, data = base
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--stage", "full", "--max-steps", "2", "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["eval", "--model", str(tmp_path / "o"), "--data", str(data), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| **overall** | " in out and "/3 |" in out
    np.testing.assert_equal(main(["train", "--model", str(model), "--data", str(tmp_path / "nope.jsonl"),
                                  "--out", str(tmp_path / "z")]), 2)


def test_structured_vision_init_starts_from_colours_and_places(base, tmp_path):
    _, data = base
    out = init_checkpoint(tmp_path / "s", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300,
                          vision_init="structured")
    emb = llavakit.load(out, dtype="float32").model.vision_tower.embeddings
    w = emb.patch_embedding.weight  # (32, 3, 8, 8): 2x2 sub-blocks x 3 colours = 12 pooling channels
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[0, 0, :4, :4] = 1.0  # red in the top-left quarter of the first patch
    first = torch.nn.functional.conv2d(pixels, w, emb.patch_embedding.bias)[0, :12, 0, 0]
    assert torch.allclose(first[:12], torch.tensor([1.0] + [0.0] * 11))
    pos = emb.position_embedding.weight  # (16, 32): 4x4 patches
    assert torch.equal(pos[:, :12], torch.zeros(16, 12))
    assert not torch.equal(pos[0, 12:], pos[1, 12:]) and not torch.equal(pos[0, 12:], pos[4, 12:])
    assert torch.equal(pos[0, 12:22], pos[4, 12:22])  # the column code: patches 0 and 4 share a column
    with pytest.raises(Exception, match="vision-init must be random or structured"):
        init_checkpoint(tmp_path / "t", "llava_onevision", VISION, TEXT, corpus=[data], vision_init="nope")


# ─────────────────────────── the output folder: refused, overwritten, resumed ───────────────────────────


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: relative name -> (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--stage", "projector",
            "--max-steps", "2", "--batch-size", "2", *extra]


def test_a_non_empty_out_is_refused_before_any_work_and_left_untouched(base, tmp_path, capsys, monkeypatch):
    model, data = base
    out = tmp_path / "taken"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"a week of training")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-7" / "weights.bin").write_bytes(b"\0" * 100)
    before = _listing(out)

    def no_work(*_, **__):
        raise AssertionError("the refusal must come before the model or the data are read")

    monkeypatch.setattr("llavakit.checkpoint.open_checkpoint", no_work)
    monkeypatch.setattr("llavakit.train.loop.load_dataset", no_work)
    for extra in [(), ("--resume",), ("--overwrite", "--resume")]:
        assert main(_train_args(model, data, out, *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(out) in err and "--overwrite" in err and "--resume" in err, err
    assert _listing(out) == before
    with pytest.raises(ConfigError, match="is not empty"):
        train(model, data, out, TrainConfig(max_steps=1), log=_quiet, progress=False)
    assert _listing(out) == before
    (tmp_path / "a-file").write_text("x")
    assert main(_train_args(model, data, tmp_path / "a-file")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_overwrite_starts_a_new_run_and_resume_continues_the_run_in_out(base, tmp_path, capsys):
    model, data = base
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = out / "checkpoint-99"  # an earlier run's checkpoint: it would outrank this run's in _prune and --resume
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"old")
    assert main(_train_args(model, data, out, "--overwrite", "--save-every", "1")) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert not stale.exists() and (out / "checkpoint-1" / "trainer_state.pt").is_file()
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    # --resume continues from the newest checkpoint in --out (step 1 of 2), with the same options
    assert main(_train_args(model, data, out, "--save-every", "1", "--resume")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"] == 2 and "resuming from" in captured.err and "checkpoint-1" in captured.err
    # an empty or missing --out needs neither flag
    (tmp_path / "empty").mkdir()
    assert main(_train_args(model, data, tmp_path / "empty")) == 0
    capsys.readouterr()


def test_the_evaluations_show_progress(base, tmp_path, capsys, monkeypatch):
    model, data = base  # 12 records: 3 evaluation batches of 4
    monkeypatch.setattr("llavakit.progress.StatusLine.due", lambda self: True)  # every update, not every 10 s
    cfg = TrainConfig(stage="projector", max_steps=2, batch_size=4, eval_every=1, seed=0)
    summary = train(model, data, tmp_path / "e", cfg, eval_data=data, log=_quiet, progress=True)
    err = capsys.readouterr().err
    for done in (4, 8):
        assert f"[step 1: eval {done}/12 " in err and f"[eval {done}/12 " in err
    final = [line for line in err.splitlines() if line.startswith("[eval 12/12 100.0%]")]
    assert len(final) == 1 and f"loss {summary['eval_loss']:.4f}" in final[0]
    train(model, data, tmp_path / "quiet", cfg, eval_data=data, log=_quiet, progress=False)
    assert "eval" not in capsys.readouterr().err
