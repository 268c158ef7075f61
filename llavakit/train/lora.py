"""LoRA on the language model's linear layers, saved in the PEFT format, and merged into full weights.

    y = W x + (alpha / r) · B (A dropout(x))          A: (r, in) random, B: (out, r) zeros at the start

Adapters live outside the model (a post-hoc transform): forward hooks add the low-rank term to the
outputs of the wrapped nn.Linear modules, so the model's parameter names and files stay untouched.
The PEFT files (adapter_config.json, adapter_model.safetensors) name each module by its path in
transformers' LlavaForConditionalGeneration-style classes (`model.language_model.layers.0.self_attn.q_proj`),
so `peft.PeftModel.from_pretrained` finds them; the projector, trained fully alongside, is saved as
a module to save.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import WeightsError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scale numerator and dropout of the adapters, and which linear layers get them."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class Adapters(nn.Module):
    """The A and B matrices of every adapted layer, keyed by the layer's name ('.' → '/' for ModuleDict)."""

    def __init__(self, cfg: LoraConfig):
        super().__init__()
        self.cfg = cfg
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.hooks = []

    def names(self) -> list[str]:
        return [k.replace("/", ".") for k in self.a.keys()]


def hf_module_path(name: str) -> str:
    """llavakit module name → its path in transformers 5's Llava*ForConditionalGeneration."""
    if name.startswith("lm_head"):
        return name
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    return "model." + name


def add_adapters(model: nn.Module, cfg: LoraConfig) -> Adapters:
    """Attach LoRA to every target linear layer of the language model; returns the adapter parameters."""
    adapters = Adapters(cfg)
    for name, module in model.language_model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in cfg.targets:
            full = f"language_model.{name}"
            key = full.replace(".", "/")
            a = torch.empty(cfg.r, module.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for A; B starts at zero
            adapters.a[key] = nn.Parameter(a.to(module.weight.device))
            adapters.b[key] = nn.Parameter(torch.zeros(module.out_features, cfg.r, device=module.weight.device))
            adapters.hooks.append(module.register_forward_hook(_hook(adapters, key)))
    if not adapters.a:
        raise WeightsError(f"no linear layer named {', '.join(cfg.targets)} in the language model.")
    return adapters


def _hook(adapters: Adapters, key: str):
    drop = nn.Dropout(adapters.cfg.dropout) if adapters.cfg.dropout else None

    def hook(module, inputs, output):
        x = inputs[0]
        if drop is not None and module.training:
            x = drop(x)
        a, b = adapters.a[key], adapters.b[key]
        return output + (x.to(a.dtype) @ a.T @ b.T).to(output.dtype) * adapters.cfg.scale

    return hook


def remove_adapters(adapters: Adapters) -> None:
    """Detach the hooks (the model computes without the adapters again)."""
    for h in adapters.hooks:
        h.remove()
    adapters.hooks.clear()


def merge(model: nn.Module, adapters: Adapters) -> None:
    """Fold every adapter into its layer's weight (W += scale · B A) and detach the hooks."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in adapters.names():
            key = name.replace(".", "/")
            w = modules[name].weight
            w += (adapters.b[key] @ adapters.a[key] * adapters.cfg.scale).to(w.dtype)
    remove_adapters(adapters)


def _saved_modules(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fully trained modules saved beside the adapters: the projector and the image newline."""
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("multi_modal_projector.") or name == "image_newline":
            out[name] = p.detach()
    return out


def save_adapter(adapters: Adapters, model: nn.Module, folder: Path, base_model: str | Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors in the PEFT layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in adapters.names():
        key = name.replace(".", "/")
        prefix = "base_model.model." + hf_module_path(name)
        tensors[f"{prefix}.lora_A.weight"] = adapters.a[key].detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = adapters.b[key].detach().contiguous()
    saved = _saved_modules(model)
    for name, t in saved.items():
        tensors["base_model.model." + hf_module_path(name)] = t.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = adapters.cfg
    targets = sorted({n.split(".")[-1] for n in adapters.names()})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_model),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        # A regex over module paths: only the language model's layers (the tower has q_proj too).
        "target_modules": r".*language_model.*\.(" + "|".join(targets) + ")$",
        "modules_to_save": sorted({"multi_modal_projector"} | ({"image_newline"} if "image_newline" in saved else set())),
        "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(folder: Path) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(config, {llavakit layer name: (A, B)}, {llavakit parameter name: fully saved tensor}) of a PEFT adapter."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise WeightsError(f"{folder} is not a LoRA adapter: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
        raise WeightsError(f"{folder}: only plain LoRA adapters are supported (peft_type LORA, no DoRA/rsLoRA).")
    cfg = LoraConfig(r=int(raw["r"]), alpha=int(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)))
    from ..weights import canonical_key

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full = {}
    for key, t in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        path = key.removeprefix("base_model.model.")
        if ".lora_A." in path or ".lora_B." in path:
            module, which = path.rsplit(".lora_", 1)
            pairs.setdefault(canonical_key(module + ".weight").removesuffix(".weight"), {})[which[0]] = t
        else:
            full[canonical_key(path.replace(".modules_to_save.default", ""))] = t
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise WeightsError(f"{folder}: layer {name} has only lora_{''.join(ab)}.")
        out[name] = (ab["A"], ab["B"])
    return cfg, out, full


def load_adapter_weights(adapters: Adapters, model: nn.Module, folder: Path) -> None:
    """Put a saved adapter's values into attached adapters (resuming a LoRA run)."""
    _, pairs, full = read_adapter(folder)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            key = name.replace(".", "/")
            adapters.a[key].copy_(a)
            adapters.b[key].copy_(b)
        params = dict(model.named_parameters())
        for name, t in full.items():
            params[name].copy_(t)


def apply_adapter(model: nn.Module, folder: Path) -> Adapters:
    """Attach a saved PEFT adapter to a loaded model (live, unmerged) and load its saved modules."""
    cfg, pairs, _ = read_adapter(folder)
    layers = {n.split(".")[-1] for n in pairs}
    adapters = add_adapters(model, LoraConfig(cfg.r, cfg.alpha, 0.0, tuple(sorted(layers))))
    missing = set(adapters.names()) ^ set(pairs)
    if missing:
        remove_adapters(adapters)
        raise WeightsError(f"the adapter does not match this model's layers: {sorted(missing)[:4]} ...")
    load_adapter_weights(adapters, model, folder)
    return adapters


def merge_lora(base: str | Path, adapter: Path, out: Path) -> Path:
    """`llavakit merge-lora`: base checkpoint + PEFT adapter → a full checkpoint folder."""
    from ..checkpoint import open_checkpoint

    vlm = open_checkpoint(base, dtype="float32")
    adapters = apply_adapter(vlm.model, Path(adapter))
    merge(vlm.model, adapters)
    return vlm.save_pretrained(out)
