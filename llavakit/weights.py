"""Find a checkpoint folder, read its weights into a model, write them back.

Weights load from safetensors (single file or sharded), memory-mapped, each tensor converted
once to the requested dtype; a legacy `pytorch_model*.bin` only through
`torch.load(weights_only=True)`. Both key layouts of published checkpoints map onto llavakit's
module names, which are Hugging Face's own names without the wrapper prefixes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LlavaConfig
from .errors import ConfigError, WeightsError
from .jsonfile import read_json_object
from .runtime import release_pages

KeyMap = Callable[[str], "str | None"]  # checkpoint key -> llavakit name, or None to skip
# (llavakit name, tensor as stored) -> the state entries that replace it, or None to keep it as usual
Convert = Callable[[str, torch.Tensor], "dict[str, torch.Tensor] | None"]
# llavakit name -> how to read it: None for the whole tensor, SKIP to leave it unread, or a function of the
# stored tensor's lazy view (safetensors' get_slice: shape by get_shape(), indexing reads only the part
# asked for; a plain tensor for .bin files) that returns the part to keep. Tensor parallelism's use.
Take = Callable[[str], "Callable | str | None"]
SKIP = "skip"

# (checkpoint prefix, llavakit prefix); the first match wins, so longer prefixes come first.
_KEY_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("model.vision_resampler.", "vision_resampler."),
)
# Buffers that older checkpoints saved and that llavakit recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# SigLIP's pooling head: saved when `vision_use_head` is on, never used by LLaVA.
_IGNORED_PREFIXES = ("vision_tower.head.",)
# Files a hub download fetches: everything but weights in other formats.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def canonical_key(key: str) -> str:
    """Map a checkpoint key of any published layout onto llavakit's parameter name."""
    for old, new in _KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def published_key(name: str) -> str:
    """The layout llava-hf checkpoints use on the hub, which transformers 4.x and 5.x both read."""
    for prefix, out in (
        ("language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("vision_tower.", "vision_tower.vision_model."),
    ):
        if name.startswith(prefix):
            return out + name[len(prefix) :]
    return name


# Checkpoints shipped inside the package, by the name load() and every --model accept.
# (llavakit/cli.py names the same folder without importing this module: it must start without torch.)
SHIPPED_MODELS = {"llava-shapes": Path(__file__).parent / "assets" / "llava-shapes"}


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder, a model shipped with llavakit by name (`llava-shapes`), or a hub id
    fetched (or found in the local cache) with huggingface_hub, in that order.

    An existing folder wins, as it does over a hub id: with a folder called llava-shapes in the working
    directory, "llava-shapes" means that folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if text in SHIPPED_MODELS:
        return SHIPPED_MODELS[text]
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ConfigError(f"{text!r} is not a checkpoint folder; pass a folder with config.json, a hub id like "
                          f"org/name, or {', '.join(SHIPPED_MODELS)} (shipped with llavakit).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ConfigError(
            f"{text!r} is not a local folder and is not in the hub cache, and it could not be downloaded "
            f"({e.__class__.__name__}). Check the id and your connection, or unset HF_HUB_OFFLINE."
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"could not fetch {text!r} from the hub: {e}") from e


def read_raw_config(folder: Path) -> dict:
    """`folder/config.json` as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    return read_json_object(path)


def read_config(folder: Path) -> LlavaConfig:
    """Parse `folder/config.json` into a LlavaConfig."""
    return LlavaConfig.from_hf(read_raw_config(folder))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, shards in index order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid shard index: {e}") from e
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index.name} lists shards that are not in {folder}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    legacy = sorted(folder.glob("pytorch_model*.bin"))
    if legacy:
        return legacy
    raise WeightsError(
        f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json with its shards."
    )


def _read_tensors(path: Path, take: Callable[[str], "Callable | str | None"] | None = None):
    """Yield (key, tensor) from one weight file; corrupt or truncated files raise WeightsError.

    take: checkpoint key -> None (read it whole), SKIP (leave it out) or a reader of its lazy view
    (see `Take`), so that a tensor-parallel rank reads only its slices.
    """
    if path.suffix == ".bin":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise WeightsError(f"cannot read {path.name}: {e}. Convert it to safetensors or download it again.") from e
        for key, tensor in state.items():
            how = take(key) if take is not None else None
            if how != SKIP:
                yield key, tensor if how is None else how(tensor)
        return
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                how = take(key) if take is not None else None
                if how == SKIP:
                    continue
                yield key, f.get_tensor(key) if how is None else how(f.get_slice(key))
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{path.name} is corrupt or truncated ({e}); download it again or re-save the checkpoint."
        ) from e


def load_state(folder: Path, model: torch.nn.Module, dtype: torch.dtype,
               sources: list[tuple[Path, KeyMap]] | None = None,
               convert: Convert | None = None, take: Take | None = None) -> dict[str, torch.Tensor]:
    """Read every weight of `folder` under llavakit names, floats converted to `dtype`.

    sources: (folder, key map) pairs to read instead, for checkpoints whose weights are split over
    folders or named otherwise; a key map returns None for a weight to skip. convert: called with
    each (name, tensor as stored) before anything else; it returns the state entries to keep in
    its place (quantisation: `X.weight` becomes `X.qweight` and `X.scales`), or None for the usual
    handling. The pages of a converted tensor's file mapping are dropped afterwards, so a model
    quantised while loading never holds the file's bytes. take: per llavakit name, which part of the
    stored tensor to read (see `Take`; a tensor-parallel rank's slices), before `convert` sees it.
    Raises WeightsError listing missing and unexpected keys against `model`'s parameters.
    """
    tied = bool(getattr(model.cfg, "tie_word_embeddings", False))
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for src, key_map in sources or [(folder, canonical_key)]:
        for path in weight_files(src):
            _read_file(path, key_map, expected, tied, dtype, state, unexpected, convert, take)
    missing = sorted(expected - state.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} weight(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise WeightsError(
            f"weights in {folder} do not match the architecture in config.json: " + "; ".join(parts) + "."
        )
    return state


def _read_file(path: Path, key_map, expected: set, tied: bool, dtype: torch.dtype, state: dict, unexpected: list,
               convert: Convert | None, take: Take | None = None):
    def ignored(name: str | None) -> bool:
        return name is None or name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES) or (
            tied and name == "lm_head.weight")

    def by_key(key: str):
        name = key_map(key)
        return SKIP if ignored(name) else take(name)

    for key, tensor in _read_tensors(path, None if take is None else by_key):
        name = key_map(key)
        if ignored(name):
            continue
        converted = convert(name, tensor) if convert is not None else None
        if converted is not None:
            release_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())
            state.update(converted)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `state` into a model built on the meta device, checking every shape first."""
    params = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(params[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(params[k].shape)]
    if bad:
        raise WeightsError("weight shapes do not match config.json: " + "; ".join(bad[:6]))
    model.load_state_dict(state, strict=False, assign=True)


def save_weights(model: torch.nn.Module, folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model's weights in the published layout, sharded above `max_shard_bytes`."""
    tied = bool(getattr(model.cfg, "tie_word_embeddings", False))
    tensors = {published_key(name): t for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    write_tensors(tensors, folder, max_shard_bytes)


def write_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write named tensors as model.safetensors, or as shards plus an index above `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous()
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_tensors(folder: Path):
    """Yield (key, tensor) of every weight of a checkpoint folder, as stored (no dtype change)."""
    for path in weight_files(folder):
        yield from _read_tensors(path)


# load_model (build the architecture, then fill it) lives in llavakit/model/build.py: the weight reader
# knows nothing of the model (DESIGN.md, "Never": Load → Model).
