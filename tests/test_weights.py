"""Weights: save/reload (single file and sharded), dtypes, key layouts, tied embeddings, hub-id loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import llavakit
from reference import load_reference

LOGITS_ATOL = 1e-4


def _image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CONVS = [
    [{"role": "user", "content": [{"type": "image", "image": _image(20, 70, 40)},
                                  {"type": "text", "text": "What is in the picture?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog."}]}],
]


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """loaded(name) -> (vlm float32, logits of CONVS), once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            vlm = llavakit.load(checkpoint(name), dtype=torch.float32)
            cache[name] = (vlm, vlm.forward(vlm.prepare(CONVS)))
        return cache[name]

    return get


def _logits(vlm) -> torch.Tensor:
    return vlm.forward(vlm.prepare(CONVS))


def _ref_logits(path) -> torch.Tensor:
    """transformers' logits for CONVS, each conversation alone, left-padded like ours for comparison."""
    ref, proc = load_reference(path)
    rows = []
    for conv in CONVS:
        inputs = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        with torch.no_grad():
            # output_hidden_states=True works around transformers 5.24 losing vision_feature_layer == 0.
            rows.append(ref(**inputs, output_hidden_states=True).logits[0].float())
    return rows


def _assert_ref_matches(vlm_logits, batch, ref_rows):
    t = batch.input_ids.shape[1]
    for i, row in enumerate(ref_rows):
        n = row.shape[0]
        assert int(batch.attention_mask[i].sum()) == n
        diff = (vlm_logits[i, t - n :] - row).abs().max().item()
        assert diff <= LOGITS_ATOL, f"row {i}: max abs diff {diff:.3g}"


def _read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


# ───────────────────────────── save and reload ─────────────────────────────


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "llama_full_list"])
def test_save_reload_llavakit_and_transformers(loaded, name, tmp_path):
    vlm, logits = loaded(name)
    out = vlm.save_pretrained(tmp_path / "saved")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / side).is_file(), side
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    again = llavakit.load(out, dtype=torch.float32)
    assert torch.equal(_logits(again), logits)
    _assert_ref_matches(logits, vlm.prepare(CONVS), _ref_logits(out))
    if vlm.config.tie_word_embeddings:
        assert not any("lm_head" in k for k in _read_all(out))
        assert again.model.lm_head.weight is again.model.language_model.embed_tokens.weight


def test_sharded_save(loaded, tmp_path):
    vlm, logits = loaded("mistral")
    out = vlm.save_pretrained(tmp_path / "sharded", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = _read_all(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Every shard but a lone oversized tensor respects the limit.
    for s in shards:
        with safe_open(str(s), framework="pt") as st:
            sizes = [st.get_tensor(k).numel() * 4 for k in st.keys()]
        assert sum(sizes) <= 50_000 or len(sizes) == 1

    assert torch.equal(_logits(llavakit.load(out, dtype=torch.float32)), logits)
    _assert_ref_matches(logits, vlm.prepare(CONVS), _ref_logits(out))

    # Saving again unsharded into the same folder removes the stale shards and index.
    vlm.save_pretrained(out)
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(llavakit.load(out, dtype=torch.float32)), logits)


def test_save_into_own_folder(loaded, tmp_path):
    """Overwriting the folder a model was loaded from (memory-mapped weights) keeps both the live model and the files right."""
    _, logits = loaded("mistral")
    folder = shutil.copytree(loaded("mistral")[0].folder, tmp_path / "own")
    vlm = llavakit.load(folder, dtype=torch.float32)
    for shard_bytes in (50_000, 5 * 2**30):
        vlm.save_pretrained(folder, max_shard_bytes=shard_bytes)
        assert torch.equal(_logits(vlm), logits)
        assert torch.equal(_logits(llavakit.load(folder, dtype=torch.float32)), logits)
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()


# ───────────────────────────── dtypes ─────────────────────────────


def test_bfloat16_load(loaded, checkpoint):
    _, logits32 = loaded("llama")
    vlm = llavakit.load(checkpoint("llama"), dtype=torch.bfloat16)
    assert vlm.dtype == torch.bfloat16
    floats = [(n, p.dtype) for n, p in vlm.model.named_parameters() if p.is_floating_point()]
    assert floats and all(d == torch.bfloat16 for _, d in floats), [n for n, d in floats if d != torch.bfloat16]
    assert not any(t.dtype == torch.float32 for t in vlm.model.state_dict().values())
    logits = _logits(vlm)
    assert logits.dtype == torch.float32  # forward returns float32 whatever the model dtype
    scale = logits32.abs().max().item()
    rel = (logits - logits32).abs().max().item() / scale
    assert 0 < rel < 0.1, rel  # loose sanity only; a bfloat16 model is not bit-identical


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bf16", torch.bfloat16),
                                             ("float32", torch.float32)])
def test_dtype_names(checkpoint, dtype, expected):
    assert llavakit.load(checkpoint("qwen2"), dtype=dtype).dtype == expected


def test_auto_dtype_of_bfloat16_checkpoint(loaded, tmp_path):
    vlm, _ = loaded("qwen2")
    bf = llavakit.load(vlm.folder, dtype=torch.bfloat16)
    out = bf.save_pretrained(tmp_path / "bf16")
    tensors = _read_all(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    assert llavakit.load(out).dtype == torch.bfloat16  # "auto" keeps the checkpoint's half precision
    assert torch.equal(_logits(llavakit.load(out)), _logits(bf))


# ───────────────────────────── key layouts ─────────────────────────────


def _rename(key: str, layout: str) -> str:
    """A key of the fixture (transformers' published layout) in another layout."""
    tables = {
        "transformers5": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                          ("vision_tower.", "model.vision_tower.vision_model."),
                          ("multi_modal_projector.", "model.multi_modal_projector.")],
        "transformers5_flat_vision": [("language_model.model.", "model.language_model."),
                                      ("language_model.lm_head.", "lm_head."),
                                      ("vision_tower.", "model.vision_tower."),
                                      ("multi_modal_projector.", "model.multi_modal_projector.")],
        "legacy_vision_model": [("vision_tower.", "vision_tower.vision_model.")],
    }
    for old, new in tables[layout]:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _rewrite(src, dst, transform) -> None:
    shutil.copytree(src, dst)
    tensors = _read_all(dst)
    (dst / "model.safetensors").unlink()
    save_file(transform(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["transformers5", "transformers5_flat_vision", "legacy_vision_model"])
def test_key_layouts_load_identically(loaded, tmp_path, layout):
    vlm, logits = loaded("llama")
    dst = tmp_path / layout
    _rewrite(vlm.folder, dst, lambda ts: {_rename(k, layout): v for k, v in ts.items()})
    keys = set(_read_all(dst))
    if layout.startswith("transformers5"):
        assert "lm_head.weight" in keys and any(k.startswith("model.language_model.") for k in keys)
        assert any(k.startswith("model.multi_modal_projector.") for k in keys)
    assert torch.equal(_logits(llavakit.load(dst, dtype=torch.float32)), logits)
    if layout == "transformers5":  # the layout transformers 5 itself reads
        _assert_ref_matches(logits, vlm.prepare(CONVS), _ref_logits(dst))


def test_legacy_buffers_are_ignored(loaded, tmp_path):
    """Old checkpoints carry rotary inv_freq and CLIP position_ids buffers; loading skips them."""
    vlm, logits = loaded("llama")
    dst = tmp_path / "buffers"

    def add(ts):
        ts = dict(ts)
        ts["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.full((8,), 123.0)
        ts["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        return ts

    _rewrite(vlm.folder, dst, add)
    assert torch.equal(_logits(llavakit.load(dst, dtype=torch.float32)), logits)


# ───────────────────────────── tied embeddings ─────────────────────────────


def test_tied_embeddings_share_one_tensor(loaded):
    vlm, _ = loaded("qwen2_tied")
    assert vlm.config.tie_word_embeddings
    assert not any("lm_head" in k for k in _read_all(vlm.folder))
    assert vlm.model.lm_head.weight is vlm.model.language_model.embed_tokens.weight
    untied, _ = loaded("qwen2")
    assert untied.model.lm_head.weight is not untied.model.language_model.embed_tokens.weight


def test_tied_checkpoint_ignores_stray_lm_head(loaded, tmp_path):
    vlm, logits = loaded("qwen2_tied")
    dst = tmp_path / "stray_head"
    _rewrite(vlm.folder, dst, lambda ts: {**ts, "lm_head.weight": torch.randn_like(
        ts["language_model.model.embed_tokens.weight"])})
    again = llavakit.load(dst, dtype=torch.float32)
    assert again.model.lm_head.weight is again.model.language_model.embed_tokens.weight
    assert torch.equal(_logits(again), logits)


# ───────────────────────────── hub ids ─────────────────────────────


def test_load_hub_id_from_offline_cache(loaded, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    vlm, logits = loaded("llama")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(vlm.folder, repo / "snapshots" / commit)

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    hub = llavakit.load("org/tiny", dtype=torch.float32)
    assert hub.folder.resolve() == (repo / "snapshots" / commit).resolve()
    assert torch.equal(_logits(hub), logits)

    with pytest.raises(llavakit.ConfigError, match="org/missing"):
        llavakit.load("org/missing", dtype=torch.float32)
