"""What a new user meets first: chat needs only the core dependencies, and a missing extra is one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules of the extras (serve, ray, video, test); chat must run with none of them importable.
EXTRA_MODULES = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "llguidance", "ray", "pyarrow", "av",
                 "transformers", "pytest", "openai", "psutil", "playwright", "peft")
BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from llavakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=set(blocked)), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_core_dependencies_hold_no_extra():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in deps}
    assert names == {"torch", "safetensors", "tokenizers", "pillow", "numpy", "jinja2", "huggingface_hub"}


def test_chat_runs_with_no_extra_installed():
    res = _run_without(EXTRA_MODULES, "chat", "--image", "examples/picture.png", "How many shapes are there?")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"


def test_serve_without_its_extra_is_one_line():
    res = _run_without(("fastapi", "uvicorn"), "serve")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "pip install 'llavakit[serve]'" in res.stderr
