"""The quantised-weight cache: written on the first quantised load, mapped from disk on every later one."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

import llavakit
from llavakit.model import quant, quant_cache
from llavakit.runtime import _in_private_file_mapping

NAME = "onevision_cap4_list"  # tied embeddings: the head is quantised from the input embeddings


def _logits(vlm) -> torch.Tensor:
    batch = vlm.prepare([[{"role": "user", "content": "Say something."}]])
    return vlm.forward(batch)


def _mapped(vlm) -> list[bool]:
    """Per quantised layer: whether its packed weight lies in a file mapping (not in anonymous memory)."""
    out = []
    for m in vlm.model.modules():
        if isinstance(m, quant.QuantLinear):
            t = m.qweight
            out.append(_in_private_file_mapping(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    return out


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_first_load_writes_the_entry_and_later_loads_map_it(checkpoint, tmp_path, monkeypatch, method):
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", "0")
    plain = llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize=method)
    assert _entries(tmp_path / "qc") == [] and not any(_mapped(plain))
    want = _logits(plain)

    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", str(tmp_path / "qc"))
    first = llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize=method)
    assert len(_entries(tmp_path / "qc")) == 1
    assert all(_mapped(first))  # the in-memory copies were swapped for the written files
    assert torch.equal(_logits(first), want)

    def no_quantising(*args, **kwargs):
        raise AssertionError("a cached load quantised again")

    monkeypatch.setattr(quant, "quantize_tiles", no_quantising)
    again = llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize=method)
    assert all(_mapped(again)) and torch.equal(_logits(again), want)
    out = again.generate([[{"role": "user", "content": "Hi"}]], llavakit.SamplingParams(max_new_tokens=6))[0]
    ref = plain.generate([[{"role": "user", "content": "Hi"}]], llavakit.SamplingParams(max_new_tokens=6))[0]
    assert out.token_ids == ref.token_ids


def test_each_method_and_each_version_of_the_weights_has_its_own_entry(checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint(NAME), folder)
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", str(tmp_path / "qc"))
    llavakit.load(folder, quantize="int8")
    llavakit.load(folder, quantize="int4")
    assert len(_entries(tmp_path / "qc")) == 2
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced: a new entry
    llavakit.load(folder, quantize="int8")
    assert len(_entries(tmp_path / "qc")) == 3
    monkeypatch.setattr(quant_cache, "KEEP_ENTRIES", 2)
    llavakit.load(folder, quantize="int4")  # a fourth entry: only the two most recently used stay
    assert len(_entries(tmp_path / "qc")) == 2


def test_a_broken_entry_is_deleted_and_rebuilt(checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", str(tmp_path / "qc"))
    want = _logits(llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize="int8"))
    (entry,) = (tmp_path / "qc").iterdir()
    shard = next(entry.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated file
    with caplog.at_level(logging.WARNING, logger="llavakit.model.quant_cache"):
        vlm = llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize="int8")
    assert "is unusable" in caplog.text and "deleted and rebuilt" in caplog.text
    assert torch.equal(_logits(vlm), want) and all(_mapped(vlm))


def test_a_cache_that_cannot_be_written_leaves_the_weights_in_memory(checkpoint, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", str(blocker / "qc"))  # mkdir fails under a file, even as root
    with caplog.at_level(logging.WARNING, logger="llavakit.model.quant_cache"):
        vlm = llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize="int4")
    assert "could not write the quantised-weight cache" in caplog.text and "LLAVAKIT_QUANTIZED_CACHE=0" in caplog.text
    assert not any(_mapped(vlm))
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", "0")
    assert torch.equal(_logits(vlm), _logits(llavakit.load(checkpoint(NAME), dtype=torch.float32, quantize="int4")))


def test_a_checkpoint_saved_quantised_needs_no_cache(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", "0")
    out = llavakit.load(checkpoint(NAME), quantize="int8").save_pretrained(tmp_path / "q")
    monkeypatch.setenv("LLAVAKIT_QUANTIZED_CACHE", str(tmp_path / "qc"))
    vlm = llavakit.load(out)
    assert _entries(tmp_path / "qc") == [] and all(_mapped(vlm))  # mapped from its own files
