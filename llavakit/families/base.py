"""The two record types of the registry: `Family` (a model_type) and `Tower` (a vision model_type).

Standard library only: config.py (torch-free) and everything above it read these facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How a family lays out one image's projected tile features (F per tile) before they replace its tokens.
#   flat                    one tile, its F features (LLaVA-1.5)
#   anyres_unpad            base tile, then the tile grid stitched, unpadded, a newline per row (NeXT)
#   anyres_unpad_max_tiles  as anyres_unpad, scaled down past `vision_aspect_ratio`'s N tiles (OneVision)
PACKINGS = ("flat", "anyres_unpad", "anyres_unpad_max_tiles")
# How a family lays out a video's frame features; None for families without video.
#   pool_bilinear_newline   each frame bilinearly pooled to ceil(p/2)², frames in order, one newline (OneVision)
#   pool_stride             each frame's tower features pooled by `spatial_pool_stride` (average, max or a
#                           learned conv) to (p // stride)², before the projector; no newline (NeXT-Video)
VIDEO_PACKINGS = ("pool_bilinear_newline", "pool_stride")
MEDIA = ("image", "video")
# How a tiled family encodes an image as one tile (OneVision's several-image prompts, `detail: low`):
#   pad_square  padded to a square with the mean colour, then resized (OneVision's multi-image tile)
#   squash      the any-res base view alone: the whole image resized to the tile (LLaVA-NeXT)
UNTILED_VIEWS = ("pad_square", "squash")

# LlavaConfig's and LlavaNextConfig's tower when `vision_config` is absent: CLIP ViT-L/14-336.
CLIP_L14_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)


@dataclass(frozen=True)
class Family:
    """Everything that differs between LLaVA model families; all else is shared code.

    The `default_*` fields are the defaults of transformers' own config class for this model_type,
    used for every key a config.json omits.
    """

    model_type: str  # config.json "model_type", the registry key
    display_name: str  # "LLaVA-1.5"
    architecture: str  # config.json "architectures"[0]: transformers' model class
    processor_class: str  # processor_config.json "processor_class"
    image_processor_type: str  # this family's own image processor (pads, tiles); preprocessor_config.json
    media: tuple[str, ...]  # what prompts may hold: ("image",) or ("image", "video")
    packing: str  # one of PACKINGS: how image features are laid out (the model and anyres.py follow it)
    video_packing: str | None  # one of VIDEO_PACKINGS when the family takes video, else None
    default_text_model_type: str  # text_config.model_type when text_config is absent
    default_vision_config: dict[str, Any] = field(hash=False)  # vision_config when absent
    default_vision_feature_layer: int = -2
    default_select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    default_image_token_id: int = 32000
    default_video_token_id: int | None = None
    default_pinpoints: tuple[tuple[int, int], ...] = ()  # (h, w) any-resolution candidates; () when flat
    default_vision_aspect_ratio: str | None = None  # "anyres_max_N" for anyres_unpad_max_tiles, else None
    # Whether the top-level tie_word_embeddings also follows text_config's (LlavaConfig and
    # LlavaOnevisionConfig forward a tied text config; LlavaNextConfig does not).
    forwards_text_tie: bool = True
    # A key of processing.prompt.DEFAULT_TEMPLATES for checkpoints without a chat template;
    # None: the text model's default.
    chat_template: str | None = None
    # The original (haotian-liu / LLaVA-VL) format: the `image_aspect_ratio` values it writes, as a
    # regular expression, and its `mm_patch_merge_type` prefix; original_aspect None = no original format.
    original_aspect: str | None = None
    mm_patch_merge_type: str = "flat"
    # transformers' video processor class of this family (its defaults fill what the checkpoint's video
    # processor file omits); None for families without video, and for video read the original way.
    video_processor_type: str | None = None
    untiled_view: str = "pad_square"  # one of UNTILED_VIEWS: how an image becomes one tile

    def __post_init__(self) -> None:
        # A wrong entry is a programming error in a family module, caught at import.
        assert self.packing in PACKINGS, self.packing
        assert self.untiled_view in UNTILED_VIEWS, self.untiled_view
        assert set(self.media) <= set(MEDIA) and "image" in self.media, self.media
        assert (self.video_packing in VIDEO_PACKINGS) == self.takes_video, (self.media, self.video_packing)
        assert (self.default_video_token_id is not None) == self.takes_video, self.default_video_token_id
        assert bool(self.default_pinpoints) == self.tiled, "tiled families need default pinpoints"
        assert (self.default_vision_aspect_ratio is not None) == self.caps_tiles, self.default_vision_aspect_ratio

    @property
    def tiled(self) -> bool:
        """Images may be cut into any-resolution tiles (pinpoints, image_newline, unpadding)."""
        return self.packing != "flat"

    @property
    def caps_tiles(self) -> bool:
        """Tiled features are scaled down past N tiles' worth (`vision_aspect_ratio: anyres_max_N`)."""
        return self.packing == "anyres_unpad_max_tiles"

    @property
    def takes_video(self) -> bool:
        return "video" in self.media


@dataclass(frozen=True)
class Tower:
    """Facts of one vision tower type, keyed by its vision_config.model_type."""

    model_type: str  # "clip_vision_model"
    parent_model_type: str  # "clip": the model_type of a full (image + text) checkpoint holding this tower
    architecture: str  # transformers' vision-only model class
    image_processor_type: str  # the tower's own preprocessor_config.json type
    mean: tuple[float, float, float]  # per-channel normalisation its checkpoints were trained with
    std: tuple[float, float, float]
    has_class_token: bool  # CLIP prepends a class token (and has a pre-layernorm); SigLIP has neither
    # The original LLaVA code's SigLIP wrapper deletes the last layer and takes the last hidden state.
    original_drops_last_layer: bool
    config_defaults: dict[str, Any] = field(hash=False)  # transformers' <Tower>VisionConfig defaults
