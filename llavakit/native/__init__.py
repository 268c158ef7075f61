"""llavakit's CPU decode kernels (kernels.c), compiled once per machine and called through ctypes.

Why a kernel of our own: one decoded token reads every decoder weight once, so decoding is a
memory-bandwidth problem. PyTorch's CPU kernels for a single row (bfloat16 `F.linear`,
`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) stream well below the machine's read
bandwidth, and none reads blocks of int8 or int4 with per-group scales against int8 activations,
the scheme CPU inference engines use. kernels.c is portable C with AVX2 and AVX-512 paths.

The library is built the first time it is needed, with the C compiler found on the machine
(`$CC`, else `cc`, `gcc` or `clang`) and `-march=native`, into the user's cache folder
(`$LLAVAKIT_CACHE`, else `$XDG_CACHE_HOME/llavakit`, else `~/.cache/llavakit`), keyed by the
source, the compiler and the CPU. Without a compiler, or with LLAVAKIT_NATIVE=0, `library()`
returns None and callers use PyTorch's own kernels: slower decoding, same results within
rounding. The library links the OpenMP runtime PyTorch has already loaded (same soname), so
both share one thread pool and `torch.set_num_threads` governs both.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..runtime import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
OPT_OUT = "LLAVAKIT_NATIVE"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_VP, _INT = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lk_linear_bf16": (_VP, _INT, _VP, _VP, _VP, _INT, _INT, _INT, _INT),
    "lk_linear_int8": (_VP, _INT, _VP, _VP, _INT, _VP, _VP, _INT, _INT, _INT, _INT),
    "lk_linear_int4": (_VP, _INT, _VP, _VP, _INT, _VP, _VP, _INT, _INT, _INT, _INT),
    "lk_dequant_tiles": (_INT, _VP, _VP, _INT, _INT, _INT, _VP),
    "lk_argmax": (_VP, _INT, _INT, _INT, _VP, _VP),
    "lk_decode_layers": (_VP, _INT, _VP, _VP, _INT, _INT, _INT, _INT, _INT, _INT, ctypes.c_float, _VP, _VP, _VP, _VP,
                         _VP, _INT, _INT, _INT, _VP, _VP),
}


def cache_dir() -> Path:
    """Where built libraries are kept."""
    return cache_root() / "native"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """The CPU's model and flags: a library built with -march=native is only valid on the same kind."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [l for l in text.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _build(cc: str, target: Path) -> None:
    """Compile kernels.c into `target` atomically (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it cannot be had here.

    Never raises: a failed build is logged once and the callers fall back to PyTorch.
    """
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get(OPT_OUT, "1") == "0":
            return None
        import torch  # noqa: F401  (its OpenMP runtime must be loaded first, so that ours is the same one)

        cc = _compiler()
        if cc is None:
            log.warning("no C compiler found: decoding uses PyTorch's kernels (slower). Install gcc to speed it up.")
            return None
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _cpu_signature().encode()).hexdigest()[:16]
            target = cache_dir() / f"llavakit_kernels_{key}.so"
            if not target.is_file():
                _build(cc, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("could not build llavakit's CPU kernels (%s %s): decoding uses PyTorch's kernels (slower).",
                        e, detail.decode(errors="replace")[-500:])
            return None
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        _lib = lib
        return _lib
