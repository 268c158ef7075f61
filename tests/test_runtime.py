"""keep_freed_memory: large blocks come from malloc's heap, where freed ones are reused, not fresh mappings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A fresh process: glibc serves a first 24 MB block with its own mmap (its threshold starts at 128 KB),
# and hands it back on free; once the setting is in force the block comes from the heap instead.
SNIPPET = r"""
import json, torch
from llavakit.runtime import keep_freed_memory
applied = keep_freed_memory()
t = torch.empty(6 * 2**20)
t.fill_(1.0)
ptr, in_heap = t.data_ptr(), None
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        in_heap = lo <= ptr < hi
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "in_heap": in_heap}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")


def _run(code: str, keep: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAVAKIT_KEEP_FREED_MEMORY": keep})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


@linux_only
def test_large_blocks_come_from_the_heap():
    res = json.loads(_run(SNIPPET, "1")[-1])
    assert res == {"applied": True, "again": True, "in_heap": True}


@linux_only
def test_opt_out_leaves_glibc_alone():
    res = json.loads(_run(SNIPPET, "0")[-1])
    assert res == {"applied": False, "again": False, "in_heap": False}


def test_load_applies_it():
    code = ("import llavakit, llavakit.runtime as r; from llavakit.cli import SHIPPED_MODEL; "
            "llavakit.load(SHIPPED_MODEL); print(r._applied)")
    assert _run(code, "1")[-1] == str(sys.platform.startswith("linux"))


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


@linux_only
def test_release_pages_drops_a_file_mappings_pages_and_they_read_back(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llavakit.runtime import release_pages

    save_file({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))  # 64 MB
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        w = f.get_tensor("w")
    total = float(w.sum())  # every page read: resident
    before = _rss_file_kb()
    assert release_pages(w.data_ptr(), w.numel() * 4)
    assert before - _rss_file_kb() >= 50 * 1024
    assert float(w.sum()) == total  # faulted back in from the file


@linux_only
def test_release_pages_leaves_anonymous_memory_alone():
    import torch

    from llavakit.runtime import release_pages

    t = torch.ones(4 * 2**20)
    assert not release_pages(t.data_ptr(), t.numel() * 4)
    assert float(t.sum()) == 4 * 2**20


# ---- huge pages -----------------------------------------------------------------------------

def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding `address` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux_only
def test_arena_copies_values_packs_small_tensors_and_advises_huge_pages():
    import torch

    from llavakit.runtime import HUGE_PAGE, HugePageArena

    arena = HugePageArena()
    arena.CHUNK = 4 * HUGE_PAGE
    small = [torch.randn(300, 7), torch.arange(1000, dtype=torch.int64), torch.randn(5).bfloat16()]
    big = torch.randn(3 * 2**20)  # 12 MB: more than a chunk, a mapping of its own
    copies = [arena.copy(t) for t in small + [big]]
    for t, c in zip(small + [big], copies):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.shape == t.shape and c.data_ptr() % 64 == 0
    starts = [c.data_ptr() for c in copies]
    assert starts[0] % HUGE_PAGE == 0 and starts[1] - starts[0] == 300 * 7 * 4 + 48  # packed, 64-byte aligned
    assert starts[3] % HUGE_PAGE == 0 and arena.nbytes == sum(t.numel() * t.element_size() for t in small + [big])
    if "hg" not in _vm_flags(starts[0]):
        pytest.fail("madvise(MADV_HUGEPAGE) was not applied to the arena")


def test_load_places_decoder_weights_in_huge_pages_with_identical_logits(checkpoint, monkeypatch):
    import torch

    import llavakit
    from llavakit.model import build
    from llavakit.runtime import huge_pages_available

    monkeypatch.setattr(build, "HUGE_MIN_NUMEL", 1)  # the tiny checkpoint's weights are all small
    monkeypatch.setenv("LLAVAKIT_HUGE_PAGES", "1")
    path = checkpoint("qwen2")
    placed = llavakit.load(path, dtype=torch.float32)
    monkeypatch.setenv("LLAVAKIT_HUGE_PAGES", "0")
    mapped = llavakit.load(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        a = placed.model.decode(placed.model.embed(ids, None, None), torch.arange(5)[None], None, None, False)
        b = mapped.model.decode(mapped.model.embed(ids, None, None), torch.arange(5)[None], None, None, False)
    assert torch.equal(a, b)
    down = lambda vlm: vlm.model.language_model.layers[0].mlp.down_proj.weight  # noqa: E731
    vision = lambda vlm: next(vlm.model.vision_tower.parameters())  # noqa: E731
    monkeypatch.setenv("LLAVAKIT_HUGE_PAGES", "1")
    if huge_pages_available():
        assert "hg" in _vm_flags(down(placed).data_ptr())  # decoder weights in the arena
        assert "hg" not in _vm_flags(vision(placed).data_ptr())  # the tower stays where it was read
    assert "hg" not in _vm_flags(down(mapped).data_ptr())
