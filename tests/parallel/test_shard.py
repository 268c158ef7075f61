"""Each rank reads only its slices of the checkpoint (safetensors get_slice), and they are the right ones."""

from __future__ import annotations

import pytest
import torch

from llavakit import weights
from llavakit.config import LlavaConfig
from llavakit.model.build import load_model
from llavakit.parallel.plan import make_plan
from llavakit.parallel.shard import Split
from llavakit.weights import read_raw_config


class _Counting:
    """safe_open, counting the bytes each rank takes out of the file, and how."""

    def __init__(self):
        self.whole = self.sliced = 0

    def __call__(self, *args, **kwargs):
        counter = self

        class File:
            def __init__(self):
                self.f = real_safe_open(*args, **kwargs)

            def __enter__(self):
                self.inner = self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                t = self.inner.get_tensor(key)
                counter.whole += t.numel() * t.element_size()
                return t

            def get_slice(self, key):
                view = self.inner.get_slice(key)

                class Slice:
                    def get_shape(self):
                        return view.get_shape()

                    def __getitem__(self, index):
                        t = view[index]
                        counter.sliced += t.numel() * t.element_size()
                        return t

                return Slice()

        return File()


real_safe_open = weights.safe_open


@pytest.mark.parametrize("name", ["onevision", "llama"])
def test_each_rank_reads_about_half_and_holds_its_rows(checkpoint, monkeypatch, name):
    path = checkpoint(name)
    cfg = LlavaConfig.from_hf(read_raw_config(path))
    full = load_model(path, cfg, torch.float32).state_dict()
    total = sum(t.numel() * t.element_size() for k, t in full.items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    plan = make_plan(cfg, 2, 2, "CPU cores")
    parts, reads = [], []
    for rank in range(2):
        counting = _Counting()
        monkeypatch.setattr(weights, "safe_open", counting)
        parts.append(load_model(path, cfg, torch.float32, split=Split(plan, rank)).state_dict())
        reads.append(counting)
    for rank, read in enumerate(reads):
        # Split layers are sliced; only norms, biases added after a reduction, the tower's patch and
        # position embeddings (and image_newline) are read whole. A tiny model has relatively many of those.
        assert read.sliced > read.whole and read.sliced + read.whole < 0.6 * total, (rank, read.__dict__, total)
    hd = cfg.text.head_dim
    q, o = "language_model.layers.1.self_attn.q_proj.weight", "language_model.layers.1.self_attn.o_proj.weight"
    down, k = "language_model.layers.0.mlp.down_proj.weight", "language_model.layers.0.self_attn.k_proj.bias"
    for rank, part in enumerate(parts):
        heads = slice(rank * cfg.text.num_heads // 2 * hd, (rank + 1) * cfg.text.num_heads // 2 * hd)
        assert torch.equal(part[q], full[q][heads]) and torch.equal(part[o], full[o][:, heads])
        mlp = slice(rank * cfg.text.intermediate_size // 2, (rank + 1) * cfg.text.intermediate_size // 2)
        assert torch.equal(part[down], full[down][:, mlp])
        if k in full:  # Qwen2's biases
            kv = slice(rank * cfg.text.num_kv_heads // 2 * hd, (rank + 1) * cfg.text.num_kv_heads // 2 * hd)
            assert torch.equal(part[k], full[k][kv])
        rows = -(-cfg.text.vocab_size // 2)
        emb = part["language_model.embed_tokens.weight"]
        want = full["language_model.embed_tokens.weight"][rank * rows : (rank + 1) * rows]
        assert torch.equal(emb[: want.shape[0]], want) and not emb[want.shape[0]:].any()  # padding rows are zero
        fc1 = "vision_tower.encoder.layers.0.mlp.fc1.weight"
        width = cfg.vision.intermediate_size // 2
        assert torch.equal(part[fc1], full[fc1][rank * width : (rank + 1) * width])
        assert torch.equal(part["language_model.norm.weight"], full["language_model.norm.weight"])
