"""llavakit: LLaVA, LLaVA-NeXT and LLaVA-OneVision from Hugging Face checkpoints, in plain PyTorch.

`import llavakit` loads no torch: each public name is imported from its module on first use
(PEP 562), so `llavakit --help` and torch-free modules (anyres, config, errors) start fast.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type checkers and IDEs see the names; at run time __getattr__ imports them
    from .api import VLM, ChatOutput, load
    from .engine.sampling import SamplingParams
    from .errors import (ConfigError, GenerationError, ImageError, LlavakitError, ParallelError, PromptError,
                         TokenFeatureMismatch, VideoError, WeightsError)
    from .processing.processor import Batch

# The version's one literal, for a source tree that was never installed; an installed package
# reports its metadata (pyproject's `version`), and a test keeps the two equal.
_VERSION = "0.1.0"


def _read_version() -> str:
    # importlib.metadata costs ~0.1 s to import, so __version__ is read on first use, not at import.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llavakit")
    except PackageNotFoundError:
        return _VERSION


# public name -> the module that defines it (relative to this package)
_LAZY = {
    "load": ".api",
    "VLM": ".api",
    "ChatOutput": ".api",
    "Batch": ".processing.processor",
    "SamplingParams": ".engine.sampling",
    "LlavakitError": ".errors",
    "ConfigError": ".errors",
    "WeightsError": ".errors",
    "ImageError": ".errors",
    "VideoError": ".errors",
    "PromptError": ".errors",
    "TokenFeatureMismatch": ".errors",
    "GenerationError": ".errors",
    "ParallelError": ".errors",
}

__all__ = [
    "load", "VLM", "ChatOutput", "Batch", "SamplingParams", "LlavakitError", "ConfigError", "WeightsError",
    "ImageError", "VideoError", "PromptError", "TokenFeatureMismatch", "GenerationError", "ParallelError",
    "__version__",
]


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = _read_version()
        return globals()[name]
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llavakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
