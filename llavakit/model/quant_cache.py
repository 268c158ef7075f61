"""A disk cache of quantised decoder weights, memory-mapped at load (as CPU engines map GGUF files).

`load(..., quantize="int8" | "int4")` of an unquantised checkpoint quantises the decoder's linear
layers and the output head as they are read. Held in anonymous memory, those bytes are resident
for the life of the process and private to it. Written once to a file under the llavakit cache and
mapped from there, they are page cache instead: resident only once read, shared by every process
on the machine that loads the same checkpoint the same way (server replicas, batch workers), and
reclaimable by the kernel. A later load finds them and skips the quantisation.

An entry is keyed by what decides its bytes: the source weight files (path, size, modification
time), the method, the group size, the tile layout and the set of quantised layers. It is written
to a temporary folder and renamed into place, so a load that is interrupted leaves no half entry;
an entry that cannot be read is deleted and rebuilt. Any failure to write (read-only or full disk)
leaves the weights in memory, as without the cache. LLAVAKIT_QUANTIZED_CACHE=0 turns it off; set to
a folder, it keeps the entries there instead of under the llavakit cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import WeightsError
from ..runtime import cache_root, trim_freed_memory
from ..weights import read_tensors, weight_files, write_tensors

log = logging.getLogger(__name__)

OPT_OUT = "LLAVAKIT_QUANTIZED_CACHE"
FORMAT = "llavakit-quantized-1"  # bump when the stored layout changes: old entries are then never matched
KEEP_ENTRIES = 4  # the most recently used entries kept; older ones are deleted when a new one is written
STALE_SECONDS = 3600  # a temporary folder this old belongs to a load that was killed
SHARD_BYTES = 64 * 2**20  # safetensors copies a shard's bytes while writing it: keep that copy small


def cache_folder() -> Path | None:
    """Where the entries live: $LLAVAKIT_QUANTIZED_CACHE when it names a folder, None when it is 0 (the
    cache is off), else the llavakit cache's `quantized` folder."""
    where = os.environ.get(OPT_OUT, "")
    if where == "0":
        return None
    return Path(where) if where else cache_root() / "quantized"


def entry_key(source_folders: list[Path], method: str, group_size: int, tile: int, names: list[str]) -> str:
    """The cache key of quantising the weights in `source_folders` with this method and layout."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "method": method, "group_size": group_size, "tile": tile,
                         "names": sorted(names)}).encode())
    for folder in source_folders:
        for path in weight_files(folder):
            st = path.stat()  # a replaced or re-downloaded file changes size or time, and so the key
            h.update(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:32]


class QuantizedCache:
    """One entry: the quantised tensors (llavakit names, `X.qweight` and `X.scales`) of one checkpoint."""

    def __init__(self, folder: Path, expected: set[str]):
        self.folder, self.expected = folder, expected

    @classmethod
    def for_load(cls, source_folders: list[Path], method: str, group_size: int, tile: int,
                 names: list[str]) -> QuantizedCache | None:
        """The entry for this load, or None when the cache is off."""
        where = cache_folder()
        if where is None:
            return None
        key = entry_key(source_folders, method, group_size, tile, names)
        expected = {f"{n}.{leaf}" for n in names for leaf in ("qweight", "scales")}
        return cls(where / key, expected)

    def ready(self) -> bool:
        """Whether the entry exists and holds exactly the expected tensors; a broken one is deleted."""
        if not self.folder.is_dir():
            return False
        try:
            keys = set()
            for path in weight_files(self.folder):
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    keys.update(f.keys())
            if keys == self.expected:
                os.utime(self.folder)  # most recently used: kept longest
                return True
            problem = f"it holds {len(keys)} tensors where {len(self.expected)} were expected"
        except (SafetensorError, WeightsError, OSError, ValueError) as e:
            problem = str(e)
        log.warning("quantised-weight cache %s is unusable (%s); it is deleted and rebuilt", self.folder, problem)
        shutil.rmtree(self.folder, ignore_errors=True)
        return False

    def store(self, state: dict[str, torch.Tensor]) -> bool:
        """Write the quantised entries of `state` as this entry, then put memory-mapped views of the
        written files in their place (the in-memory copies are freed). Returns whether the entry is
        in use; on a failure to write, `state` is left as it was and a warning says why."""
        tensors = {k: state[k] for k in self.expected if k in state}
        if set(tensors) != self.expected:
            return False
        tmp = self.folder.parent / f".{self.folder.name}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            write_tensors(tensors, tmp, SHARD_BYTES)
            try:
                tmp.rename(self.folder)
            except OSError:  # another process wrote the same entry first: use that one
                shutil.rmtree(tmp, ignore_errors=True)
                if not self.ready():
                    return False
            mapped = dict(read_tensors(self.folder))
        except (OSError, SafetensorError, WeightsError) as e:  # safetensors reports a full disk as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not write the quantised-weight cache under %s (%s); the quantised weights stay "
                        "in memory. Set %s=0 to skip the cache.", self.folder.parent, e, OPT_OUT)
            return False
        del tensors
        state.update(mapped)
        trim_freed_memory()  # the in-memory copies came from the heap, which would otherwise keep them
        self._evict()
        return True

    def _evict(self) -> None:
        """Keep the KEEP_ENTRIES most recently used entries, and drop temporary folders a killed load left."""
        entries, now = [], time.time()
        for p in self.folder.parent.iterdir():
            try:
                mtime = p.stat().st_mtime
            except OSError:  # removed by another process meanwhile
                continue
            if p.name.startswith("."):
                if now - mtime > STALE_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir():
                entries.append((mtime, p))
        for _, old in sorted(entries, reverse=True)[KEEP_ENTRIES:]:
            if old != self.folder:
                shutil.rmtree(old, ignore_errors=True)
