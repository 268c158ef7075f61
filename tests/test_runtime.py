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
