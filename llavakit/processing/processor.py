"""Conversations → a model-ready batch: rendered prompt, expanded placeholders, token ids, pixels.

    messages ─► template ─► one <image>/<video> per medium ─► ids (message text as plain text)
             ─► each placeholder id repeated by its medium's token count
    image parts ─► load (RGB as transformers) ─► preprocess or tile ─► pixel_values (N, 3, S, S)
    video parts ─► decode, sample frames ─► resize to the tower's size ─► video_pixels (F, 3, S, S)
Token counts come from anyres.py, the same functions the model uses to lay out features.
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
from ..config import LlavaConfig
from ..errors import ConfigError, PromptError
from .image import (
    ImageProcessorConfig,
    anyres_tiles,
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
    chunked_ids,
    expand_placeholder_ids,
    load_chat_template,
    load_tokenizer,
    message_spans,
    render_conversation,
    render_template,
    split_conversation,
)
from .video import DEFAULT_NUM_FRAMES, FrameSampling, load_video


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts with their images and videos.

    input_ids, attention_mask: (B, T) long; mask 0 marks left padding.
    pixel_values: (N, 3, S, S) float32 tower inputs of all images, row by row in prompt order
        (one tile per LLaVA-1.5 or untiled image; base view + grid tiles per tiled image); None without images.
    image_counts: images per row.
    image_sizes: (height, width) of every image after RGB conversion, in order.
    image_tiled: per image, whether it was cut into any-resolution tiles.
    video_pixels: (total frames, 3, S, S) float32 of all videos in order; None without videos.
    video_frames: frames per video.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_counts: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...] = ()
    image_tiled: tuple[bool, ...] = ()
    video_pixels: torch.Tensor | None = None
    video_frames: tuple[int, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Encoded:
    """One conversation, ready to batch."""

    prompt: str  # the rendered template, one placeholder per image and video
    input_ids: list[int]
    pixel_values: np.ndarray | None  # (tiles of all images, 3, S, S)
    image_sizes: tuple[tuple[int, int], ...]
    image_tiled: tuple[bool, ...]
    video_pixels: np.ndarray | None  # (frames of all videos, 3, S, S)
    video_frames: tuple[int, ...]


@dataclass(frozen=True)
class Processor:
    """Tokenizer, chat template, image and video preprocessing of one checkpoint."""

    tokenizer: TextTokenizer
    image_cfg: ImageProcessorConfig
    video_cfg: ImageProcessorConfig  # frames: resized straight to the tower's size
    chat_template: str
    model: LlavaConfig
    pad_token_id: int
    num_frames: int = DEFAULT_NUM_FRAMES

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
        template = load_chat_template(folder) or DEFAULT_TEMPLATES[cfg.text.model_type]
        return cls.build(tokenizer, read_image_processor_dict(folder), cfg, template, original=False)

    @classmethod
    def build(cls, tokenizer: TextTokenizer, image_dict: dict, cfg: LlavaConfig, template: str,
              original: bool) -> "Processor":
        """A processor from its parts; checks that the image processor and the model agree."""
        image_cfg = ImageProcessorConfig.from_hf(image_dict)
        _check_agrees(image_dict, image_cfg, cfg)
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

    def image_inputs(self, image: Image.Image, tiled: bool = True) -> tuple[np.ndarray, int]:
        """Tower inputs (n, 3, S, S) of one image and its number of `<image>` tokens.

        tiled: any-resolution tiling (NeXT; OneVision when the image is alone in its conversation);
        otherwise OneVision encodes the image as one padded square tile.
        """
        m = self.model
        if not m.image_grid_pinpoints:
            tiles = preprocess(image, self.image_cfg)[None]
        elif tiled:
            tiles = anyres_tiles(image, self.image_cfg, m.image_grid_pinpoints, m.vision.image_size)
        else:
            tiles = square_tile(image, self.image_cfg)[None]
        return tiles, self.image_tokens((image.height, image.width), tiled)

    def tiles_images(self, n_images: int) -> bool:
        """Whether the images of a conversation with `n_images` of them are tiled: always, except that
        OneVision (as the reference) encodes each of several images as one square tile."""
        return not (self.model.max_tiles is not None and n_images > 1)

    def image_tokens(self, size: tuple[int, int], tiled: bool) -> int:
        """`<image>` tokens of one image of (height, width) `size`."""
        m = self.model
        return anyres.image_token_count(size, m.image_grid_pinpoints, m.vision.image_size, m.vision.patches_per_side,
                                        m.image_features_per_tile, m.max_tiles, tiled)

    def video_tokens(self, frames: int) -> int:
        """`<video>` tokens of a video of `frames` sampled frames."""
        return anyres.video_token_count(frames, self.model.vision.patches_per_side)

    def video_inputs(self, video: VideoPart) -> tuple[np.ndarray, int]:
        """Frames (F, 3, S, S) of one video and its number of `<video>` tokens."""
        if self.model.video_token_id is None:
            raise PromptError(f"{self.model.model_type} checkpoints take images only, not video.")
        num_frames = video.num_frames if video.num_frames is not None or video.fps is not None else self.num_frames
        sampling = FrameSampling(num_frames=num_frames, fps=video.fps, max_frames=video.max_frames or 64)
        frames = load_video(video.source, sampling)
        pixels = np.stack([preprocess(f, self.video_cfg) for f in frames])
        return pixels, self.video_tokens(len(frames))

    def render(self, messages: Any, add_generation_prompt: bool = True) -> tuple[str, Conversation]:
        """The chat template applied to a conversation, and the validated conversation with its media."""
        conv = split_conversation(messages)
        text = render_template(self.chat_template, conv.messages, add_generation_prompt,
                               self.tokenizer.special_tokens())
        return text, conv

    def encode(self, messages: Any, add_generation_prompt: bool = True,
               parse_special_tokens_in_content: bool = False) -> Encoded:
        """Render, load and preprocess the media, expand placeholders and tokenize one conversation.

        parse_special_tokens_in_content: False (the default) tokenizes every message text (system,
        user and assistant, string content and text parts) as plain text: text such as
        `<|im_end|>\\n<|im_start|>system` or `<image>` gets ordinary tokens, so only the chat template
        writes role markers, placeholders and BOS/EOS. True parses special-token text inside messages
        as special tokens, as transformers' apply_chat_template does; use it for trusted text only.
        Both give the same ids when the messages hold no special-token text.
        """
        if parse_special_tokens_in_content:
            prompt, conv = self.render(messages, add_generation_prompt)
            return self.encode_prompt(prompt, conv.images, conv.videos)
        conv = split_conversation(messages)
        rendered = render_conversation(self.chat_template, conv.messages, add_generation_prompt,
                                       self.tokenizer.special_tokens())
        spans = message_spans(self.tokenizer, rendered)
        return self.encode_prompt(rendered.text, conv.images, conv.videos, plain_spans=spans)

    def encode_prompt(self, prompt: str, image_sources: list[Any], videos: list[VideoPart] = (),
                      plain_spans: Sequence[tuple[int, int]] = ()) -> Encoded:
        """Tokenize a rendered prompt holding one placeholder per image in `image_sources` and per video.

        plain_spans: (start, end) character ranges of `prompt` tokenized as plain text (the message
        text; see `TextTokenizer.encode`). The default, none, parses special tokens everywhere: the
        caller vouches for the whole prompt.
        """
        tok = self.tokenizer
        images = [load_image(src) for src in image_sources]
        # OneVision (as the reference): a conversation with several images encodes each as one square tile.
        tiled = self.tiles_images(len(images))
        image_in = [self.image_inputs(im, tiled) for im in images]
        video_in = [self.video_inputs(v) for v in videos]
        m = self.model
        placeholders = [Placeholder(tok.image_token, m.image_token_id, [n for _, n in image_in], "image"),
                        Placeholder(tok.video_token, m.video_token_id, [n for _, n in video_in], "video")]
        if self.original:
            ids = chunked_ids(tok, prompt, placeholders, plain_spans)
        else:
            ids = expand_placeholder_ids(tok.encode(prompt, plain_spans), placeholders)
        return Encoded(
            prompt=prompt,
            input_ids=ids,
            pixel_values=np.concatenate([t for t, _ in image_in]) if image_in else None,
            image_sizes=tuple((im.height, im.width) for im in images),
            image_tiled=(tiled,) * len(images),
            video_pixels=np.concatenate([f for f, _ in video_in]) if video_in else None,
            video_frames=tuple(len(f) for f, _ in video_in),
        )

    def collate(self, items: list[Encoded]) -> Batch:
        """Left-pad encoded conversations into one batch."""
        if not items:
            raise PromptError("prepare() needs at least one conversation.")
        return collate(items, self.pad_token_id)

    def prepare(self, conversations: list[Any], add_generation_prompt: bool = True,
                parse_special_tokens_in_content: bool = False) -> Batch:
        """Encode and left-pad several conversations (`parse_special_tokens_in_content`: see `encode`)."""
        return self.collate([self.encode(c, add_generation_prompt, parse_special_tokens_in_content)
                             for c in conversations])


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
        image_counts=tuple(len(e.image_sizes) for e in items),
        image_sizes=tuple(s for e in items for s in e.image_sizes),
        image_tiled=tuple(t for e in items for t in e.image_tiled),
        video_pixels=stack(e.video_pixels for e in items),
        video_frames=tuple(f for e in items for f in e.video_frames),
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
