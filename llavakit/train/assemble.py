"""`llavakit init`: a new LLaVA checkpoint from a vision tower and a language model, plus a fresh projector.

    vision: a CLIP/SigLIP folder (CLIPVisionModel, CLIPModel, SiglipModel...) or a spec "siglip:hidden_size=128,..."
    text:   a Llama/Mistral/Qwen2 folder (…ForCausalLM with its tokenizer) or a spec "qwen2:hidden_size=256,..."
      ─► config.json of the family (llava, llava_next, llava_onevision), <image>/<video> added to the tokenizer,
         embeddings grown for them (new rows = mean of the old), random projector and image newline,
         processor files and chat template ─► an HF checkpoint folder that llavakit and transformers load.

A spec gives HF config keys (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
num_key_value_heads, image_size, patch_size...); its weights are random (normal, std 0.02) and a spec
language model gets a byte-level BPE tokenizer trained on `corpus` (JSONL training files or text files).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ..config import LlavaConfig
from ..errors import ConfigError
from ..model.llava import LlavaModel
from ..families import FAMILIES as _REGISTRY
from ..families import family as _family
from ..processing.prompt import DEFAULT_TEMPLATES, load_chat_template
from ..random_init import _write, _write_processor
from ..weights import read_tensors, save_weights

FAMILIES = tuple(_REGISTRY)  # the model types `init --family` takes
_VISION = {
    "clip": dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3),
    "siglip": dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   num_channels=3, vision_use_head=False),
}
_TEXT = {
    "llama": dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0,
                    max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=32768, tie_word_embeddings=True, use_sliding_window=False),
}
VISION_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                    "patch_size")  # what a vision spec must give
_INT_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_key_value_heads",
             "image_size", "patch_size", "max_position_embeddings", "head_dim", "sliding_window"}


def parse_spec(spec: str, kinds: dict) -> dict:
    """"siglip:hidden_size=128,num_hidden_layers=4" → a config dict on top of the kind's defaults."""
    kind, _, rest = spec.partition(":")
    if kind not in kinds:
        raise ConfigError(f"unknown model spec kind {kind!r} in {spec!r}; expected a folder or one of "
                          f"{', '.join(kinds)} followed by ':key=value,...'.")
    out = dict(kinds[kind])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"spec item {item!r} must be key=value.")
        key = key.strip()
        if key in _INT_KEYS:
            try:
                out[key] = int(value)
            except ValueError:
                raise ConfigError(f"spec item {item!r}: {key} must be an integer.") from None
        elif value in ("true", "false"):
            out[key] = value == "true"
        else:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def _is_folder(value: str) -> bool:
    return Path(value).is_dir()


def _vision_part(value: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Vision config and weights under llavakit names (empty for a spec)."""
    if not _is_folder(value):
        cfg = parse_spec(value, _VISION)
        for key in VISION_SIZE_KEYS:
            if key not in cfg:
                raise ConfigError(f"the vision spec needs {key}=...")
        return cfg, {}
    folder = Path(value)
    raw = json.loads((folder / "config.json").read_text())
    cfg = {k: v for k, v in raw.get("vision_config", raw).items() if k not in ("architectures", "dtype", "torch_dtype")}
    if cfg.get("model_type") in ("clip", "siglip", None):
        cfg["model_type"] = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(
            raw.get("model_type"), cfg.get("model_type"))
    if cfg.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        raise ConfigError(f"{folder} is not a CLIP or SigLIP checkpoint (model_type {raw.get('model_type')!r}).")
    weights = {"vision_tower." + k[len("vision_model."):]: t for k, t in read_tensors(folder)
               if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    return cfg, weights


def _text_part(value: str) -> tuple[dict, dict[str, torch.Tensor], Path | None]:
    """Text config, weights under llavakit names, and the folder holding its tokenizer (None for a spec)."""
    if not _is_folder(value):
        cfg = parse_spec(value, _TEXT)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in cfg:
                raise ConfigError(f"the text spec needs {key}=...")
        return cfg, {}, None
    folder = Path(value)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") not in _TEXT:
        raise ConfigError(f"{folder} is not a Llama, Mistral or Qwen2 checkpoint (model_type {cfg.get('model_type')!r}).")
    weights = {}
    for k, t in read_tensors(folder):
        if k.startswith("model."):
            weights["language_model." + k[len("model."):]] = t
        elif k.startswith("lm_head."):
            weights[k] = t
    return cfg, weights, folder


def _corpus_texts(paths: list[Path]) -> list[str]:
    """Every string value of JSONL records (questions, answers), or the lines of a text file."""
    texts = [string.printable]

    def walk(x):
        if isinstance(x, str):
            texts.append(x)
        elif isinstance(x, list):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for k, y in x.items():
                if k in ("value", "text", "content", "conversations", "messages"):
                    walk(y)

    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if path.suffix == ".jsonl" and line.strip():
                walk(json.loads(line))
            else:
                texts.append(line)
    return texts


def _new_tokenizer(kind: str, corpus: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer learned from the corpus; special tokens first, as the family has them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "qwen2":
        specials, tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(
            eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    else:
        specials, tokens = ["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                                          pad_token=None)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_texts(corpus), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tokens["bos_token"]:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    return tok, tokens


MAX_GRID_SIDE = 6  # OneVision's published grids go up to 6x6 tiles


def check_grids(family: str, min_tiles: int, max_grid: int = MAX_GRID_SIDE) -> None:
    """Refuse a smallest or largest grid side that `_pinpoints` cannot honour, with what to pass instead."""
    custom = min_tiles != 1 or max_grid != MAX_GRID_SIDE
    if custom and family in FAMILIES and not _family(family).caps_tiles:
        flag = "--min-tiles" if min_tiles != 1 else "--max-grid"
        raise ConfigError(f"{flag} is for llava_onevision, whose grids llavakit chooses; {family} uses the "
                          f"published grids. Leave {flag} out.")
    if not 1 <= min_tiles <= MAX_GRID_SIDE:
        raise ConfigError(f"--min-tiles must be 1 to {MAX_GRID_SIDE} (tiles a side), got {min_tiles}.")
    if not min_tiles <= max_grid <= MAX_GRID_SIDE:
        raise ConfigError(f"--max-grid must be from --min-tiles ({min_tiles}) to {MAX_GRID_SIDE} (tiles a side), "
                          f"got {max_grid}.")


def _pinpoints(family: str, side: int, min_tiles: int = 1, max_grid: int = MAX_GRID_SIDE) -> list[list[int]] | None:
    fam = _family(family)
    if not fam.tiled:
        return None
    if not fam.caps_tiles:  # the published NeXT grids: 2x1, 1x2, 2x2, 3x1, 1x3 tiles
        grids = [(2, 1), (1, 2), (2, 2), (3, 1), (1, 3)]
    else:  # OneVision: every grid from min_tiles x min_tiles up to max_grid x max_grid (published: 1 to 6)
        grids = [(r, c) for r in range(min_tiles, max_grid + 1) for c in range(min_tiles, max_grid + 1)]
    return [[side * r, side * c] for r, c in grids]


def init_checkpoint(out: Path, family: str, vision: str, text: str, corpus: list[Path] = (),
                    vocab_size: int = 1000, seed: int = 0, max_tiles: int = 9, vision_init: str = "random",
                    min_tiles: int = 1, max_grid: int = MAX_GRID_SIDE) -> Path:
    """Assemble a new checkpoint folder (see the module docstring); returns `out`.

    vision_init: for a vision spec, "random" (normal 0.02) or "structured" (see `_structured_vision_init`).
    min_tiles: OneVision only: the grids start at min_tiles x min_tiles tiles, so a small picture is
    scaled up onto at least that grid (the published grids start at 1x1, which keeps a small picture
    at its own size, on few patches).
    max_grid: OneVision only: the grids end at max_grid x max_grid tiles (published: 6). A larger tile
    with a smaller largest grid covers the same pixels with fewer, bigger tiles, and its base view
    (the whole picture in one tile) gets more patches.
    """
    if vision_init not in ("random", "structured"):
        raise ConfigError(f"--vision-init must be random or structured, got {vision_init!r}.")
    check_grids(family, min_tiles, max_grid)
    from tokenizers import AddedToken, Tokenizer

    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}.")
    vision_cfg, vision_w = _vision_part(vision)
    text_cfg, text_w, text_dir = _text_part(text)
    kind = text_cfg["model_type"]
    if text_dir is None:
        if not corpus:
            raise ConfigError("a text spec needs --tokenizer-corpus (JSONL or text files) to learn a vocabulary from.")
        tok, tokens = _new_tokenizer(kind, list(corpus), vocab_size)
        template = DEFAULT_TEMPLATES[kind]
    else:
        tok = Tokenizer.from_file(str(text_dir / "tokenizer.json"))
        tk_cfg = json.loads((text_dir / "tokenizer_config.json").read_text())
        tokens = {k: tk_cfg.get(k) if isinstance(tk_cfg.get(k), (str, type(None))) else tk_cfg[k].get("content")
                  for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = load_chat_template(text_dir) or DEFAULT_TEMPLATES[kind]
    fam = _family(family)
    placeholders = ["<image>"] + (["<video>"] if fam.takes_video else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in placeholders])
    old_vocab = text_cfg.get("vocab_size", 0)
    text_cfg["vocab_size"] = max(tok.get_vocab_size(), old_vocab)
    ids = {t: tok.token_to_id(t) for t in placeholders}
    for name in ("bos", "eos", "pad"):
        token = tokens.get(f"{name}_token")
        text_cfg[f"{name}_token_id"] = tok.token_to_id(token) if token else None
    if text_cfg.get("pad_token_id") is None:
        text_cfg["pad_token_id"] = text_cfg["eos_token_id"]
        tokens["pad_token"] = tokens["eos_token"]

    siglip = vision_cfg["model_type"] == "siglip_vision_model"
    side = int(vision_cfg["image_size"])
    config = {
        "architectures": [fam.architecture], "model_type": family, "dtype": "float32",
        "image_token_index": ids["<image>"], "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings", False)),
        "vision_feature_layer": -1 if siglip else -2, "vision_feature_select_strategy": "full" if siglip else "default",
        "text_config": text_cfg, "vision_config": vision_cfg,
    }
    pins = _pinpoints(family, side, min_tiles, max_grid)
    if pins:
        config["image_grid_pinpoints"] = pins
    if fam.caps_tiles:
        config["vision_aspect_ratio"] = f"anyres_max_{max_tiles}"
    if fam.takes_video:
        config["video_token_index"] = ids["<video>"]
    cfg = LlavaConfig.from_hf(config)

    torch.manual_seed(seed)
    model = LlavaModel(cfg)
    _init_random(model, text_cfg["hidden_size"])
    if vision_init == "structured" and not vision_w:
        _structured_vision_init(model)
    state = model.state_dict()
    for name, t in {**vision_w, **text_w}.items():
        if name not in state:
            continue  # e.g. CLIP's post_layernorm when the tower does not keep it
        if name in ("language_model.embed_tokens.weight", "lm_head.weight") and t.shape[0] < state[name].shape[0]:
            grown = t.float().mean(0, keepdim=True).expand(state[name].shape[0] - t.shape[0], -1)
            t = torch.cat([t.float(), grown])  # new tokens start at the mean embedding
        if tuple(t.shape) != tuple(state[name].shape):
            raise ConfigError(f"{name}: the source has shape {tuple(t.shape)}, the assembled model {tuple(state[name].shape)}.")
        state[name].copy_(t.float())
    model.tie_weights()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    tok.save(str(out / "tokenizer.json"))
    _write(out / "config.json", config)
    _write(out / "generation_config.json", {k: text_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                            if text_cfg.get(k) is not None})
    _write(out / "tokenizer_config.json", {**{k: v for k, v in tokens.items() if v}, "padding_side": "left",
                                           "tokenizer_class": "PreTrainedTokenizerFast",
                                           "model_max_length": text_cfg.get("max_position_embeddings", 4096)})
    _write_processor(out, family, vision_cfg, siglip, pins)
    if fam.caps_tiles:
        proc = json.loads((out / "processor_config.json").read_text())
        _write(out / "processor_config.json", {**proc, "vision_aspect_ratio": f"anyres_max_{max_tiles}"})
    _write(out / "chat_template.json", {"chat_template": template})
    return out


def _init_random(model: torch.nn.Module, width: int) -> None:
    """transformers' initialisation: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "image_newline":
                p.normal_(0.0, width**-0.5)  # as LLaVA-NeXT: a random direction of the embedding's scale
            elif name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def _structured_vision_init(model: LlavaModel) -> None:
    """Start a tower from the pixels and their places instead of from noise.

    The first channels of each patch embedding average the colours of its sub-blocks (4×4 per
    patch where the width allows); the position embeddings of the remaining channels are 2-D
    sine-cosine codes of the patch's column and row (as in MAE). A tower trained from scratch
    through a language model's loss learns slowly while its features are random projections: with
    colours and coordinates in the residual stream from the first step, the decoder can read what
    is where at once, and training refines both.
    """
    emb = model.vision_tower.embeddings
    conv, pos = emb.patch_embedding, emb.position_embedding.weight  # (D, 3, p, p), (P*P [+1], D)
    hidden, channels, p, _ = conv.weight.shape
    grid = next(g for g in (4, 2, 1) if p % g == 0 and g * g * channels <= hidden // 2)
    s = p // grid
    side = model.cfg.vision.patches_per_side
    with torch.no_grad():
        k = 0
        for c in range(channels):
            for i in range(grid):
                for j in range(grid):
                    conv.weight[k].zero_()
                    conv.weight[k, c, i * s:(i + 1) * s, j * s:(j + 1) * s] = 1.0 / (s * s)
                    k += 1
        if conv.bias is not None:
            conv.bias[:k].zero_()
        conv.weight[k:].mul_(0.1)  # the other channels: random, but quiet next to the codes
        half = (hidden - k) // 2
        freqs = 1.0 / (100.0 ** (torch.arange(half // 2, dtype=torch.float32) / max(1, half // 2)))
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

        def code(x: torch.Tensor) -> torch.Tensor:  # (P*P,) → (P*P, half)
            angles = x.flatten()[:, None].float() * freqs[None]
            return torch.cat([angles.sin(), angles.cos()], dim=1)

        first = pos.shape[0] - side * side  # CLIP's class position comes first
        pos[first:].zero_()
        pos[first:, k:k + 2 * (half // 2)] = code(cols)
        pos[first:, k + 2 * (half // 2):k + 4 * (half // 2)] = code(rows)
