"""Open a checkpoint folder as its parts (config, model, processor) and write one back.

This is what `llavakit.load` does below the public surface: `api.load` wraps these parts in a VLM
with its engine, and training uses them as they are (DESIGN.md, "Never": Train → Engine, so training
cannot go through the Face, which imports the engine).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import original
from .config import LlavaConfig
from .errors import ConfigError
from .model.build import load_model
from .processing.processor import Processor
from .runtime import keep_freed_memory
from .weights import read_raw_config, resolve_model_dir, save_weights

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Files that describe a checkpoint besides its weights; save_checkpoint copies them.
_SIDE_FILES = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")


def resolve_dtype(dtype: torch.dtype | str | None, raw_config: dict,
                  device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a dtype, its name, or None/"auto".

    "auto" is the checkpoint's own dtype, with two exceptions: float16 runs as bfloat16 on the CPU,
    and float32 runs as bfloat16 on an accelerator (half the memory and bandwidth, as inference
    servers do by default; ask for float32 explicitly to keep it).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16.")
        return dtype
    if dtype is None or dtype == "auto":
        stored = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
        # Half-precision matmuls on CPUs are slow and overflow-prone; bfloat16 keeps the memory saving.
        on_cpu = torch.device(device).type == "cpu"
        if stored == "float16" and not on_cpu:
            return torch.float16
        return torch.bfloat16 if stored in ("float16", "bfloat16") or not on_cpu else torch.float32
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(_DTYPES))} or 'auto'.")


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it came from, its config, the model and the processor."""

    folder: Path
    config: LlavaConfig
    model: torch.nn.Module
    processor: Processor

    def save_pretrained(self, out: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
        """See save_checkpoint."""
        return save_checkpoint(self.model, self.config, self.folder, out, max_shard_bytes)


def open_checkpoint(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = "auto",
                    device: str | torch.device = "cpu",
                    revision: str | None = None, vision_tower: str | os.PathLike | None = None,
                    conv_template: str | None = None, quantize: str = "none") -> Checkpoint:
    """Config, model (on `device`) and processor of a checkpoint; the arguments are `llavakit.load`'s."""
    from .model.fused_decode import install as install_fused_decode
    from .model.linear import speed_up_linears
    from .model.quant import check_method, stored_quantization

    check_method(quantize)  # before the slow part
    keep_freed_memory()  # a quarter off a CPU prefill; see llavakit/runtime.py
    folder = resolve_model_dir(name_or_path, revision)
    raw = read_raw_config(folder)
    torch_dtype = resolve_dtype(dtype, raw, device)
    stored = stored_quantization(raw)
    if stored is not None:
        if quantize not in ("none", stored[0]):
            raise ConfigError(f"{folder} is saved quantised as {stored[0]}; load it with quantize={stored[0]!r} "
                              f"(or 'none'), or quantise the unquantised checkpoint as {quantize}.")
        quantize = stored[0]
    if original.is_original(raw):
        if stored is not None:
            raise ConfigError("quantization_config applies to llava-hf-format checkpoints only.")
        cfg, model, processor = original.load_parts(folder, raw, torch_dtype, vision_tower, conv_template, quantize)
    else:
        if vision_tower is not None or conv_template is not None:
            raise ConfigError("vision_tower and conv_template apply to original-format checkpoints only.")
        cfg = LlavaConfig.from_hf(raw)
        processor = Processor.load(folder, cfg)
        model = load_model(folder, cfg, torch_dtype, quantize=quantize,
                           stored_group_size=None if stored is None else stored[1],
                           huge_pages=torch.device(device).type == "cpu")
    model = model.to(device)
    if torch.device(device).type == "cpu":
        speed_up_linears(model)
        install_fused_decode(model)
    return Checkpoint(folder, cfg, model, processor)


def save_checkpoint(model: torch.nn.Module, cfg: LlavaConfig, folder: Path, out: str | os.PathLike,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face checkpoint folder: `model`'s weights in its dtype, plus every side file of `folder`.

    A quantised model writes its int8/int4 weights and scales and says so in config.json's
    `quantization_config`; `llavakit.load` reads such a folder back quantised, with identical logits.
    """
    from .model.quant import quantization_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != Path(folder).resolve():
        for pattern in _SIDE_FILES:
            for f in Path(folder).glob(pattern):
                if f.name != "model.safetensors.index.json":
                    shutil.copyfile(f, out / f.name)
    config = dict(cfg.source)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    quantized = quantization_config(model)
    if quantized is not None:  # transformers cannot read this layout; llavakit.load can, quantised
        config["quantization_config"] = quantized
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights(model, out, max_shard_bytes)
    return out
