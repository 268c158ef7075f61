"""Frozen, typed model configs parsed once from a Hugging Face `config.json`.

`LlavaConfig.from_hf(dict)` reads named keys, fills the defaults transformers would fill
(published configs often omit them: llava-1.5-7b-hf's `text_config` lists only seven keys),
accepts both the transformers 4.x and 5.x spellings, and raises `ConfigError` on anything
llavakit does not support. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .anyres import Geometry, pooled_side, tile_feature_count
from .errors import ConfigError
from .families import FAMILIES, TOWERS, Family, family, tower

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)  # the registry's, at import; family() reads the live registry
SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_TYPES = tuple(TOWERS)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_STRATEGIES = ("default", "full")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu")

# The defaults of transformers' own config classes, used for every key a config omits.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, attention_bias=False, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, bos_token_id=None, eos_token_id=None),
}
# Per-family defaults (tower, text model, tokens, pinpoints) live in llavakit.families; these names stay for importers.
ONEVISION_PINPOINTS = family("llava_onevision").default_pinpoints
NEXT_PINPOINTS = family("llava_next").default_pinpoints


def _get(d: dict, key: str, defaults: dict, fallback: Any = None) -> Any:
    """`d[key]` when present and not None, else the family default, else `fallback`."""
    value = d.get(key)
    if value is None:
        value = defaults.get(key, fallback)
    return value


def _check_act(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where} = {name!r} is not supported; supported activations: {', '.join(ACTIVATIONS)}.")
    return name


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (transformers 5 `rope_parameters`, 4.x `rope_theta`+`rope_scaling`)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0  # linear and llama3: how much longer the context became
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    @classmethod
    def from_hf(cls, d: dict) -> "RopeConfig":
        """Read either spelling; `rope_parameters` (5.x) wins over `rope_theta`/`rope_scaling` (4.x)."""
        params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        merged = {**scaling, **params}
        theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = merged.get("rope_type", merged.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {kind!r} is not supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        return cls(
            theta=float(theta),
            kind=kind,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower. CLIP: class token, pre-layernorm, quick_gelu."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # square input side in pixels
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def has_class_token(self) -> bool:
        """CLIP prepends a class token (and has a pre-layernorm); SigLIP has neither."""
        return tower(self.model_type).has_class_token

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a tile (24 for CLIP-L/14 at 336 px, 27 for SigLIP at 384)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """Parse a `vision_config` dict, filling CLIPVisionConfig's defaults."""
        model_type = d.get("model_type", "clip_vision_model")
        defaults = tower(model_type).config_defaults  # raises ConfigError naming the supported towers
        g = lambda k: _get(d, k, defaults)  # noqa: E731
        cfg = cls(
            model_type=model_type,
            hidden_size=int(g("hidden_size")),
            intermediate_size=int(g("intermediate_size")),
            num_layers=int(g("num_hidden_layers")),
            num_heads=int(g("num_attention_heads")),
            image_size=int(g("image_size")),
            patch_size=int(g("patch_size")),
            num_channels=int(g("num_channels")),
            layer_norm_eps=float(g("layer_norm_eps")),
            hidden_act=_check_act(g("hidden_act"), "vision_config.hidden_act"),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"vision hidden_size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads.")
        return cfg


@dataclass(frozen=True)
class TextConfig:
    """A decoder-only language model: Llama (also Vicuna, Llama-3, Yi), Mistral or Qwen2."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention: each kv head serves num_heads // num_kv_heads query heads
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool  # Qwen2: always; Llama: when attention_bias
    o_bias: bool  # Llama with attention_bias only
    mlp_bias: bool
    # One entry per layer: the attention window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...]
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def from_hf(cls, d: dict) -> "TextConfig":
        """Parse a `text_config` dict, filling the family's transformers defaults."""
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_TEXT_TYPES:
            raise ConfigError(
                f"text_config.model_type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_TEXT_TYPES)}."
            )
        defaults = _TEXT_DEFAULTS[model_type]
        g = lambda k, fb=None: _get(d, k, defaults, fb)  # noqa: E731
        hidden, heads = int(g("hidden_size")), int(g("num_attention_heads"))
        layers = int(g("num_hidden_layers"))
        attention_bias = bool(g("attention_bias", False))
        eos = g("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(g("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(g("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(g("num_key_value_heads", heads)),
            head_dim=int(g("head_dim", hidden // heads)),
            rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
            hidden_act=_check_act(g("hidden_act", "silu"), "text_config.hidden_act"),
            max_position_embeddings=int(g("max_position_embeddings")),
            rope=RopeConfig.from_hf(d),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(g("mlp_bias", False)),
            sliding_windows=_sliding_windows(model_type, d, defaults, layers),
            tie_word_embeddings=bool(g("tie_word_embeddings", False)),
            bos_token_id=g("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=g("pad_token_id"),
        )


def _sliding_windows(model_type: str, d: dict, defaults: dict, layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window, as transformers decides it for each family."""
    # An explicit null means "no window" (Mistral v0.2); only a missing key takes the default.
    window = d["sliding_window"] if "sliding_window" in d else defaults.get("sliding_window")
    if model_type == "llama":
        return (None,) * layers
    if model_type == "mistral":
        return (int(window) if window else None,) * layers
    # qwen2: windows only when use_sliding_window, on layers from max_window_layers on (or as layer_types says).
    if not d.get("use_sliding_window", False) or not window:
        return (None,) * layers
    types = d.get("layer_types")
    if types is None:
        first = int(_get(d, "max_window_layers", defaults))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True)
class LlavaConfig:
    """The whole vision-language model: tower, projector, decoder and how they meet."""

    model_type: str
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    vision_feature_layers: tuple[int, ...]  # hidden-state indices, concatenated along features when > 1
    select_strategy: str  # "default" drops the class token, "full" keeps every token
    projector_act: str
    projector_bias: bool
    tie_word_embeddings: bool
    # OneVision: the token that stands for video features; None for models without video.
    video_token_id: int | None = None
    # OneVision's `anyres_max_N`: image features are scaled down past about N tiles' worth; None = no cap.
    max_tiles: int | None = None
    # Any-resolution candidates (h, w) in pixels, in the checkpoint's order; empty for plain LLaVA.
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # NeXT-Video: how frame features are pooled before the projector ("average", "max", "conv"), the
    # pooling's stride, and the conv's output channels; mode None for families that pool otherwise.
    video_pool_mode: str | None = None
    video_pool_stride: int = 2
    video_pool_channels: int = 0
    # The dict this config came from, written back unchanged by save_pretrained.
    source: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> Family:
        """What this model_type's family does differently (packing, media, file formats)."""
        return family(self.model_type)

    @property
    def has_image_newline(self) -> bool:
        """Tiled families (NeXT, OneVision) learn a vector that ends every row of image features."""
        return self.family.tiled

    @cached_property
    def geometry(self) -> Geometry:
        """The facts every image and video layout is computed from (anyres.image_layout, video_layout)."""
        v = self.vision
        video_side, video_newline = None, False
        if self.family.video_packing == "pool_bilinear_newline":
            video_side, video_newline = pooled_side(v.patches_per_side), True
        elif self.family.video_packing == "pool_stride":
            video_side = v.patches_per_side // self.video_pool_stride
        return Geometry(tile=v.image_size, patches_per_side=v.patches_per_side,
                        base_features=self.image_features_per_tile, pinpoints=self.image_grid_pinpoints,
                        max_tiles=self.max_tiles, newline=self.has_image_newline,
                        video_side=video_side, video_newline=video_newline)

    @property
    def image_features_per_tile(self) -> int:
        """Number of projected features one tower input yields (576 for CLIP-L/14-336 with `default`)."""
        v = self.vision
        return tile_feature_count(v.image_size, v.patch_size, v.has_class_token, self.select_strategy)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        """Parse a top-level `config.json` dict; raises ConfigError naming what is supported."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, found {type(d).__name__}.")
        fam = family(d.get("model_type"))  # raises ConfigError naming the supported model types
        model_type = fam.model_type
        vision = VisionConfig.from_hf(d.get("vision_config") or fam.default_vision_config)
        text = TextConfig.from_hf(d.get("text_config") or {"model_type": fam.default_text_model_type})
        layer = d.get("vision_feature_layer", fam.default_vision_feature_layer)
        layers = tuple(int(x) for x in layer) if isinstance(layer, (list, tuple)) else (int(layer),)
        n_states = vision.num_layers + 1
        for x in layers:
            if not -n_states <= x < n_states:
                raise ConfigError(
                    f"vision_feature_layer {x} is out of range for a tower with {vision.num_layers} layers "
                    f"(valid: {-n_states}..{n_states - 1})."
                )
        strategy = d.get("vision_feature_select_strategy", fam.default_select_strategy)
        if strategy not in SUPPORTED_STRATEGIES:
            raise ConfigError(
                f"vision_feature_select_strategy {strategy!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_STRATEGIES)}."
            )
        image_token = d.get("image_token_id", d.get("image_token_index", fam.default_image_token_id))
        video_token = d.get("video_token_id", d.get("video_token_index", fam.default_video_token_id))
        tie = bool(d.get("tie_word_embeddings", False))
        if fam.forwards_text_tie:  # Llava and OneVision forward a tied text config; LlavaNextConfig does not
            tie = tie or text.tie_word_embeddings
        pinpoints = _pinpoints(d, fam, vision)
        if fam.tiled and (strategy == "full") == vision.has_class_token:
            want = "default" if vision.has_class_token else "full"
            raise ConfigError(
                f"{model_type} with a {vision.model_type} tower needs vision_feature_select_strategy {want!r}: "
                f"with {strategy!r} the tile features cannot be laid out on the patch grid."
            )
        return cls(
            model_type=model_type,
            vision=vision,
            text=text,
            image_token_id=int(image_token),
            vision_feature_layers=layers,
            select_strategy=strategy,
            projector_act=_check_act(d.get("projector_hidden_act", "gelu"), "projector_hidden_act"),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            tie_word_embeddings=tie,
            video_token_id=None if video_token is None else int(video_token),
            max_tiles=_max_tiles(d, fam),
            image_grid_pinpoints=pinpoints,
            **_video_pool(d, fam, vision, layers),
            source=d,
        )


def _pinpoints(d: dict, fam: Family, vision: VisionConfig) -> tuple[tuple[int, int], ...]:
    """`image_grid_pinpoints` as (h, w) tuples, each a whole number of tower tiles; () for untiled families."""
    if not fam.tiled:
        return ()
    raw = d.get("image_grid_pinpoints") or fam.default_pinpoints
    try:
        pins = tuple((int(h), int(w)) for h, w in raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {raw!r}.") from e
    tile = vision.image_size
    bad = [p for p in pins if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if bad:
        raise ConfigError(
            f"image_grid_pinpoints {bad} are not positive multiples of the vision tower's {tile}-pixel tile."
        )
    return pins


def _video_pool(d: dict, fam: Family, vision: VisionConfig, layers: tuple[int, ...]) -> dict:
    """NeXT-Video's `spatial_pool_mode` / `spatial_pool_stride` (LlavaNextVideoConfig's defaults: average, 2)."""
    if fam.video_packing != "pool_stride":
        return {}
    mode = d.get("spatial_pool_mode", "average")
    if mode not in ("average", "max", "conv"):
        raise ConfigError(f"spatial_pool_mode {mode!r} is not supported; expected 'average', 'max' or 'conv'.")
    stride = d.get("spatial_pool_stride", 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= vision.patches_per_side:
        raise ConfigError(f"spatial_pool_stride must be an integer from 1 to the tower's "
                          f"{vision.patches_per_side} patches per side, got {stride!r}.")
    channels = int(d.get("spatial_pool_out_channels", vision.hidden_size))
    if mode == "conv" and (len(layers) != 1 or channels != vision.hidden_size):
        # The reference's conv takes the tower's width and feeds the projector: other shapes cannot run there.
        raise ConfigError("spatial_pool_mode 'conv' needs one vision_feature_layer and spatial_pool_out_channels "
                          f"equal to the tower's hidden_size ({vision.hidden_size}).")
    return dict(video_pool_mode=mode, video_pool_stride=stride, video_pool_channels=channels)


def _max_tiles(d: dict, fam: Family) -> int | None:
    """Parse OneVision's `vision_aspect_ratio: "anyres_max_N"` once, into N; None for families without the cap."""
    if not fam.caps_tiles:
        return None
    value = d.get("vision_aspect_ratio", fam.default_vision_aspect_ratio)
    match = re.fullmatch(r"anyres_max_(\d+)", str(value))
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"vision_aspect_ratio {value!r} is not supported; expected 'anyres_max_N' with N >= 1.")
    return int(match.group(1))
