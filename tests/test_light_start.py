"""A light start: `import llavakit`, the torch-free modules and every `--help` load no torch.

Each check runs in a fresh interpreter, since this test process has long imported torch. Times are
not asserted (they depend on the machine); what is asserted is which modules got imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import llavakit
from llavakit.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages that `--help` and the torch-free modules must not import: torch and the heavy
# numeric, serving and reference stacks (FastAPI is an optional extra, transformers test-only).
HEAVY = ("torch", "numpy", "PIL", "safetensors", "tokenizers", "huggingface_hub", "jinja2", "fastapi", "uvicorn",
         "pydantic", "transformers")
REPORT = f"""
import json, sys
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"torch": "torch" in sys.modules, "heavy": heavy}}), file=sys.stderr)
"""
COMMANDS = sorted(next(a for a in _parser()._actions if a.dest == "command").choices)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _loaded(res: subprocess.CompletedProcess) -> tuple[bool, list[str]]:
    """(torch imported?, heavy packages imported) as the child reported them on its last stderr line."""
    report = json.loads(res.stderr.strip().splitlines()[-1])
    return report["torch"], report["heavy"]


@pytest.mark.parametrize("module", ["llavakit", "llavakit.anyres", "llavakit.config", "llavakit.errors",
                                    "llavakit.cli"])
def test_torch_free_modules_import_no_torch(module):
    res = _run(f"import {module}\n{REPORT}")
    assert res.returncode == 0, res.stderr
    torch_loaded, heavy = _loaded(res)
    assert torch_loaded is False
    assert heavy == []


@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help_and_version_import_no_torch(argv):
    code = f"""
from llavakit.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code in (0, None), e.code
{REPORT}"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "usage: llavakit" in res.stdout or res.stdout.startswith("llavakit ")
    torch_loaded, heavy = _loaded(res)
    assert torch_loaded is False
    assert heavy == []


def test_every_command_is_checked():
    # The list above comes from the parser, so a new command is covered without editing this file.
    assert {"chat", "serve", "batch", "eval", "train", "convert", "info"} <= set(COMMANDS)


def test_version_prints_the_package_version():
    res = subprocess.run([sys.executable, "-m", "llavakit", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"llavakit {llavakit.__version__}\n"


def test_version_has_one_value():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert llavakit._VERSION == project["version"]  # the literal a source tree falls back on
    assert llavakit.__version__ == project["version"]  # what an install reports (its metadata)


def test_public_names_resolve_lazily():
    code = f"""
import sys
import llavakit
assert "torch" not in sys.modules
assert set(llavakit.__all__) <= set(dir(llavakit)), set(llavakit.__all__) - set(dir(llavakit))
from llavakit import load, SamplingParams, VLM, ChatOutput, Batch, ConfigError, LlavakitError, __version__
from llavakit.api import load as api_load
from llavakit.errors import ConfigError as Err
assert load is api_load and ConfigError is Err and issubclass(ConfigError, LlavakitError)
assert SamplingParams().max_new_tokens > 0 and __version__
for name in llavakit.__all__:
    getattr(llavakit, name)
try:
    llavakit.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
{REPORT}"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert _loaded(res)[0] is True  # load() and VLM do need torch, once asked for
