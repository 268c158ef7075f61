"""Conversations → a model-ready batch: rendered prompt, expanded placeholders, token ids, pixels.

    messages ─► template ─► one <image>/<video> per medium ─► ids (message text as plain text)
             ─► each placeholder id repeated by its medium's token count
    image parts ─► load (RGB as transformers) ─► ImageLayout ─► preprocess or tile ─► pixel_values (N, 3, S, S)
    video parts ─► decode, sample frames ─► VideoLayout ─► resize to the tower's size ─► video_pixels (F, 3, S, S)
Each medium's layout (anyres.py) is computed here, once, and travels with its pixels through the
engine into the model: token counts and feature packing read the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .. import anyres
from ..anyres import ImageLayout, VideoLayout
from ..config import LlavaConfig
from ..errors import ConfigError, PromptError
from .image import (
    ImageProcessorConfig,
    anyres_tiles,
    base_view,
    load_image,
    preprocess,
    read_image_processor_dict,
    square_tile,
)
from .prompt import (
    DEFAULT_TEMPLATES,
    Conversation,
    Placeholder,
    TextTokenizer,
    VideoPart,
    check_generation_prompt,
    chunked_ids,
    expand_placeholder_ids,
    load_chat_template,
    load_tokenizer,
    message_spans,
    render_conversation,
    render_template,
    split_conversation,
)
from .video import (
    DEFAULT_NUM_FRAMES,
    FrameSampling,
    load_frames,
    read_video_processor_dict,
    video_pixels,
    video_processor_config,
)

IMAGE_DETAILS = ("auto", "low", "high")  # OpenAI's `detail` values for an image part


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts with their images and videos.

    input_ids, attention_mask: (B, T) long; mask 0 marks left padding.
    pixel_values: (N, 3, S, S) float32 tower inputs of all images, row by row in prompt order
        (one tile per LLaVA-1.5 or untiled image; base view + grid tiles per tiled image); None without images.
    image_counts: images per row.
    image_layouts: the layout of every image, in order (`layout.tiles` rows of pixel_values each).
    video_pixels: (total frames, 3, S, S) float32 of all videos in order; None without videos.
    video_layouts: the layout of every video, in order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_counts: tuple[int, ...]
    image_layouts: tuple[ImageLayout, ...] = ()
    video_pixels: torch.Tensor | None = None
    video_layouts: tuple[VideoLayout, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    image_sizes = property(lambda self: _sizes(self.image_layouts), doc="(height, width) of every image, in order.")
    image_tiled = property(lambda self: _tiled(self.image_layouts), doc="Per image, whether it was tiled.")
    video_frames = property(lambda self: _frames(self.video_layouts), doc="Sampled frames per video.")


@dataclass(frozen=True)
class Media:
    """One conversation's images and videos, preprocessed: tower inputs and layouts, in order."""

    pixel_values: np.ndarray | None  # (tiles of all images, 3, S, S)
    image_layouts: tuple[ImageLayout, ...]
    video_pixels: np.ndarray | None  # (frames of all videos, 3, S, S)
    video_layouts: tuple[VideoLayout, ...]


@dataclass(frozen=True)
class Encoded:
    """One conversation, ready to batch."""

    prompt: str  # the rendered template, one placeholder per image and video
    input_ids: list[int]
    pixel_values: np.ndarray | None  # (tiles of all images, 3, S, S)
    image_layouts: tuple[ImageLayout, ...]
    video_pixels: np.ndarray | None  # (frames of all videos, 3, S, S)
    video_layouts: tuple[VideoLayout, ...]

    image_sizes = property(lambda self: _sizes(self.image_layouts), doc="(height, width) of every image, in order.")
    image_tiled = property(lambda self: _tiled(self.image_layouts), doc="Per image, whether it was tiled.")
    video_frames = property(lambda self: _frames(self.video_layouts), doc="Sampled frames per video.")


def _sizes(layouts: Sequence[ImageLayout]) -> tuple[tuple[int, int], ...]:
    return tuple(x.size for x in layouts)


def _tiled(layouts: Sequence[ImageLayout]) -> tuple[bool, ...]:
    return tuple(x.tiled for x in layouts)


def _frames(layouts: Sequence[VideoLayout]) -> tuple[int, ...]:
    return tuple(x.frames for x in layouts)


@dataclass(frozen=True)
class Processor:
    """Tokenizer, chat template, image and video preprocessing of one checkpoint."""

    tokenizer: TextTokenizer
    image_cfg: ImageProcessorConfig
    video_cfg: ImageProcessorConfig  # frames: the family's transformers video processor settings
    chat_template: str
    model: LlavaConfig
    pad_token_id: int
    num_frames: int = DEFAULT_NUM_FRAMES
    image_detail: str = "auto"  # for image parts without a "detail": "auto", "low" or "high" (choose_layout)
    max_image_tokens: int | None = None  # an image's token budget (choose_layout); None: no limit

    # Original-format checkpoints: placeholders are ids outside the vocabulary, and the prompt is
    # tokenized chunk by chunk around them (the original `tokenizer_image_token`).
    original: bool = False

    @classmethod
    def load(cls, folder: Path, cfg: LlavaConfig) -> "Processor":
        """Read the processor files of a checkpoint folder (both the published and the transformers-5 layout)."""
        tokenizer = load_tokenizer(folder)
        _check_token(tokenizer, tokenizer.image_token, cfg.image_token_id, "image")
        if cfg.video_token_id is not None:
            _check_token(tokenizer, tokenizer.video_token, cfg.video_token_id, "video")
        template = load_chat_template(folder) or DEFAULT_TEMPLATES[cfg.family.chat_template or cfg.text.model_type]
        video_dict = read_video_processor_dict(folder) if cfg.video_token_id is not None else None
        return cls.build(tokenizer, read_image_processor_dict(folder), cfg, template, original=False,
                         video_dict=video_dict)

    @classmethod
    def build(cls, tokenizer: TextTokenizer, image_dict: dict, cfg: LlavaConfig, template: str,
              original: bool, video_dict: dict | None = None) -> "Processor":
        """A processor from its parts; checks that the image processor and the model agree.

        video_dict: the checkpoint's video processor settings (`read_video_processor_dict`), read as the
        family's transformers video processor reads them; None: frames resized straight to the tower's size
        with the image processor's statistics (original-format checkpoints).
        """
        image_cfg = ImageProcessorConfig.from_hf(image_dict)
        _check_agrees(image_dict, image_cfg, cfg)
        video_type = cfg.family.video_processor_type
        if video_dict is not None and video_type is not None:
            video_cfg = video_processor_config(video_dict, video_type)
        else:
            side = cfg.vision.image_size
            video_cfg = dataclasses.replace(image_cfg, do_resize=True, size_shortest_edge=None, size_height=side,
                                            size_width=side, do_center_crop=False, do_pad=False)
        pad = tokenizer.token_id(tokenizer.pad_token)
        for candidate in (pad, cfg.text.pad_token_id, tokenizer.token_id(tokenizer.eos_token), 0):
            if candidate is not None:
                pad = candidate
                break
        return cls(tokenizer, image_cfg, video_cfg, template, cfg, int(pad), original=original)

    @property
    def features_per_image(self) -> int | None:
        """`<image>` tokens per image when it does not depend on the image's size (LLaVA-1.5), else None."""
        return self.model.image_features_per_tile if not self.model.image_grid_pinpoints else None

    def image_inputs(self, image: Image.Image, tiled: bool = True) -> tuple[np.ndarray, ImageLayout]:
        """Tower inputs (n, 3, S, S) of one image and its layout (`layout.tokens` `<image>` tokens).

        tiled: any-resolution tiling (NeXT; OneVision when the image is alone in its conversation);
        otherwise the image is one tile (see `image_pixels`).
        """
        layout = self.image_layout((image.height, image.width), tiled)
        return self.image_pixels(image, layout), layout

    def image_pixels(self, image: Image.Image, layout: ImageLayout) -> np.ndarray:
        """Tower inputs (layout.tiles, 3, S, S) of one image laid out as `layout`.

        An untiled image of a tiled family is one tile in the family's own way: OneVision pads it to a
        square (its multi-image encoding), NeXT squashes it to the tile (its base view).
        """
        m = self.model
        if not m.image_grid_pinpoints:
            tiles = preprocess(image, self.image_cfg)[None]
        elif layout.tiled:
            tiles = anyres_tiles(image, self.image_cfg, m.image_grid_pinpoints, m.vision.image_size)
        elif m.family.untiled_view == "pad_square":
            tiles = square_tile(image, self.image_cfg)[None]
        else:
            tiles = base_view(image, self.image_cfg)[None]
        assert tiles.shape[0] == layout.tiles, (tiles.shape, layout)  # the tiler and anyres.py share their geometry
        return tiles

    def choose_layout(self, size: tuple[int, int], n_images: int, detail: str | None = None,
                      index: int = 0) -> ImageLayout:
        """The layout of image `index` of a conversation with `n_images`, for its `detail` (None: the default).

        detail "low": one tile (base view + newline); "auto": the checkpoint's own choice (any-res,
        except OneVision's one tile per image when a conversation has several); "high": any-res always.
        With `max_image_tokens`, an "auto" image that would cost more is encoded "low", and a "high"
        one (or a "low" one still over) is refused with PromptError.
        """
        detail = detail or self.image_detail
        if detail not in IMAGE_DETAILS:
            raise PromptError(f"image {index}: detail {detail!r} is not one of {', '.join(IMAGE_DETAILS)}.")
        tiled = detail == "high" or (detail == "auto" and self.tiles_images(n_images))
        layout = self.image_layout(size, tiled)
        cap = self.max_image_tokens
        if cap is not None and layout.tokens > cap and detail == "auto":
            layout = self.image_layout(size, False)
        if cap is not None and layout.tokens > cap:
            raise PromptError(
                f"image {index} ({size[1]}x{size[0]}) costs {layout.tokens} tokens with detail {detail!r}, more "
                f"than the limit of {cap} image tokens; send it with detail 'low' or 'auto', or raise the limit."
            )
        return layout

    def tiles_images(self, n_images: int) -> bool:
        """Whether the images of a conversation with `n_images` of them are tiled: always, except that
        OneVision (as the reference) encodes each of several images as one square tile."""
        return not (self.model.max_tiles is not None and n_images > 1)

    def image_layout(self, size: tuple[int, int], tiled: bool) -> ImageLayout:
        """The layout of one image of (height, width) `size`: its tiles and its `<image>` tokens."""
        return anyres.image_layout(size, self.model.geometry, tiled)

    def video_layout(self, frames: int) -> VideoLayout:
        """The layout of a video of `frames` sampled frames."""
        return anyres.video_layout(frames, self.model.geometry)

    def image_tokens(self, size: tuple[int, int], tiled: bool) -> int:
        """`<image>` tokens of one image of (height, width) `size`."""
        return self.image_layout(size, tiled).tokens

    def video_tokens(self, frames: int) -> int:
        """`<video>` tokens of a video of `frames` sampled frames."""
        return self.video_layout(frames).tokens

    def video_inputs(self, video: VideoPart) -> tuple[np.ndarray, VideoLayout]:
        """Frames (F, 3, S, S) of one video and its layout (`layout.tokens` `<video>` tokens)."""
        if self.model.video_token_id is None:
            raise PromptError(f"{self.model.model_type} checkpoints take images only, not video.")
        num_frames = video.num_frames if video.num_frames is not None or video.fps is not None else self.num_frames
        sampling = FrameSampling(num_frames=num_frames, fps=video.fps, max_frames=video.max_frames or 64)
        frames = load_frames(video.source, sampling)  # (F, H, W, 3)
        pixels = video_pixels(frames, self.video_cfg)
        return pixels, self.video_layout(len(frames))

    def render(self, messages: Any, add_generation_prompt: bool | None = None,
               continue_final_message: bool = False) -> tuple[str, Conversation]:
        """The chat template applied to a conversation, and the validated conversation with its media.

        continue_final_message: end the prompt right after the last message's text, so that the model
        continues it (an assistant prefill), as transformers' apply_chat_template does; it needs
        add_generation_prompt False or None (None, the default: True unless continuing). PromptError for both on.
        """
        conv = split_conversation(messages)
        add = check_generation_prompt(add_generation_prompt, continue_final_message)
        text = render_template(self.chat_template, conv.messages, add, self.tokenizer.special_tokens(),
                               continue_final_message)
        return text, conv

    def encode(self, messages: Any, add_generation_prompt: bool | None = None,
               parse_special_tokens_in_content: bool = False, continue_final_message: bool = False) -> Encoded:
        """Render, load and preprocess the media, expand placeholders and tokenize one conversation.

        parse_special_tokens_in_content: False (the default) tokenizes every message text (system,
        user and assistant, string content and text parts) as plain text: text such as
        `<|im_end|>\\n<|im_start|>system` or `<image>` gets ordinary tokens, so only the chat template
        writes role markers, placeholders and BOS/EOS. True parses special-token text inside messages
        as special tokens, as transformers' apply_chat_template does; use it for trusted text only.
        Both give the same ids when the messages hold no special-token text.
        add_generation_prompt, continue_final_message: see `render`.
        """
        add = check_generation_prompt(add_generation_prompt, continue_final_message)
        if parse_special_tokens_in_content:
            prompt, conv = self.render(messages, add, continue_final_message)
            return self.encode_prompt(prompt, conv.images, conv.videos, image_details=conv.image_details)
        conv = split_conversation(messages)
        rendered = render_conversation(self.chat_template, conv.messages, add, self.tokenizer.special_tokens(),
                                       continue_final_message)
        spans = message_spans(self.tokenizer, rendered)
        return self.encode_prompt(rendered.text, conv.images, conv.videos, plain_spans=spans,
                                  image_details=conv.image_details)

    def encode_prompt(self, prompt: str, image_sources: list[Any], videos: list[VideoPart] = (),
                      plain_spans: Sequence[tuple[int, int]] = (),
                      image_details: Sequence[str | None] = ()) -> Encoded:
        """Tokenize a rendered prompt holding one placeholder per image in `image_sources` and per video.

        plain_spans: (start, end) character ranges of `prompt` tokenized as plain text (the message
        text; see `TextTokenizer.encode`). The default, none, parses special tokens everywhere: the
        caller vouches for the whole prompt.
        image_details: per image, "low", "high", "auto" or None (the processor's default); see `choose_layout`.
        """
        return self.encode_with_media(prompt, self.media_inputs(image_sources, videos, image_details), plain_spans)

    def media_inputs(self, image_sources: list[Any], videos: list[VideoPart] = (),
                     image_details: Sequence[str | None] = ()) -> Media:
        """Load and preprocess one conversation's images and videos (see `encode_prompt`)."""
        images = [load_image(src) for src in image_sources]
        details = list(image_details) + [None] * (len(images) - len(image_details))
        layouts = [self.choose_layout((im.height, im.width), len(images), d, k)
                   for k, (im, d) in enumerate(zip(images, details))]
        image_in = [(self.image_pixels(im, x), x) for im, x in zip(images, layouts)]
        video_in = [self.video_inputs(v) for v in videos]
        return Media(
            pixel_values=np.concatenate([t for t, _ in image_in]) if image_in else None,
            image_layouts=tuple(x for _, x in image_in),
            video_pixels=np.concatenate([f for f, _ in video_in]) if video_in else None,
            video_layouts=tuple(x for _, x in video_in),
        )

    def encode_with_media(self, prompt: str, media: Media, plain_spans: Sequence[tuple[int, int]] = ()) -> Encoded:
        """`encode_prompt` with the media already prepared by `media_inputs`: several prompts about the
        same media (training conversations about one picture) preprocess it once."""
        tok, m = self.tokenizer, self.model
        placeholders = [
            Placeholder(tok.image_token, m.image_token_id, [x.tokens for x in media.image_layouts], "image"),
            Placeholder(tok.video_token, m.video_token_id, [x.tokens for x in media.video_layouts], "video"),
        ]
        if self.original:
            ids = chunked_ids(tok, prompt, placeholders, plain_spans)
        else:
            ids = expand_placeholder_ids(tok.encode(prompt, plain_spans), placeholders)
        return Encoded(prompt=prompt, input_ids=ids, pixel_values=media.pixel_values, image_layouts=media.image_layouts,
                       video_pixels=media.video_pixels, video_layouts=media.video_layouts)

    def collate(self, items: list[Encoded]) -> Batch:
        """Left-pad encoded conversations into one batch."""
        if not items:
            raise PromptError("prepare() needs at least one conversation.")
        return collate(items, self.pad_token_id)

    def prepare(self, conversations: list[Any], add_generation_prompt: bool | None = None,
                parse_special_tokens_in_content: bool = False, continue_final_message: bool = False) -> Batch:
        """Encode and left-pad several conversations (the keywords: see `encode` and `render`)."""
        return self.collate([self.encode(c, add_generation_prompt, parse_special_tokens_in_content,
                                         continue_final_message) for c in conversations])


def collate(items: Sequence[Encoded], pad_token_id: int, pad_left: bool = True) -> Batch:
    """Pad encoded conversations into one Batch: left-padded for generation, right-padded (pad_left=False)
    for training (llavakit/train/data.py adds the labels). The one collate function of llavakit.

    items: Encoded, or anything with its fields (input_ids and the media fields), such as a training Example.
    """
    t = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        cols = slice(t - n, None) if pad_left else slice(0, n)
        ids[i, cols] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, cols] = 1

    def stack(arrays):
        arrays = [a for a in arrays if a is not None]
        return torch.from_numpy(np.concatenate(arrays)) if arrays else None

    return Batch(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=stack(e.pixel_values for e in items),
        image_counts=tuple(len(e.image_layouts) for e in items),
        image_layouts=tuple(x for e in items for x in e.image_layouts),
        video_pixels=stack(e.video_pixels for e in items),
        video_layouts=tuple(x for e in items for x in e.video_layouts),
    )


def _check_token(tokenizer: TextTokenizer, token: str, expected: int, kind: str) -> None:
    found = tokenizer.token_id(token)
    if found != expected:
        raise ConfigError(
            f"the tokenizer maps {token!r} to id {found}, but config.json says the {kind} token id is {expected}; "
            "the tokenizer does not belong to this model."
        )


def _check_agrees(image_dict: dict, image_cfg: ImageProcessorConfig, cfg: LlavaConfig) -> None:
    """The processor files and config.json must describe the same tiles, or tokens and features would differ."""
    if not cfg.image_grid_pinpoints:
        return
    pins = image_dict.get("image_grid_pinpoints")
    if pins is not None and tuple(tuple(p) for p in pins) != cfg.image_grid_pinpoints:
        raise ConfigError(
            f"image_grid_pinpoints differ between the image processor ({pins}) and config.json "
            f"({[list(p) for p in cfg.image_grid_pinpoints]}); fix one of the files so they agree."
        )
    side = image_cfg.crop_height if image_cfg.do_center_crop else image_cfg.size_height or image_cfg.size_shortest_edge
    if side != cfg.vision.image_size:
        raise ConfigError(
            f"the image processor makes {side}-pixel tiles but the vision tower takes {cfg.vision.image_size}; "
            "the processor files do not belong to this model."
        )
