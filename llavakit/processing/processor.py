"""Conversations → a model-ready batch: rendered prompt, expanded `<image>` runs, token ids, pixels.

    messages ─► template ─► text with one <image> per image ─► <image> × features_per_image ─► ids
    image parts ─► load (RGB as transformers) ─► preprocess ─► pixel_values (N, 3, S, S)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import anyres
from ..config import LlavaConfig
from ..errors import ConfigError, PromptError
from .image import ImageProcessorConfig, anyres_tiles, load_image, preprocess, read_image_processor_dict
from .prompt import (
    DEFAULT_TEMPLATES,
    TextTokenizer,
    expand_image_tokens,
    load_chat_template,
    load_tokenizer,
    render_template,
    split_conversation,
)


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of prompts with their images.

    input_ids, attention_mask: (B, T) long; mask 0 marks left padding.
    pixel_values: (N, 3, S, S) float32 tower inputs of all images, row by row in prompt order
        (one per LLaVA image; base view + tiles per NeXT image); None without images.
    image_counts: images per row.
    image_sizes: (height, width) of every image after RGB conversion, in the same order.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_counts: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Encoded:
    """One conversation, ready to batch."""

    prompt: str  # the rendered template, one placeholder per image
    input_ids: list[int]
    pixel_values: np.ndarray | None  # (tiles of all images, 3, S, S)
    image_sizes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Processor:
    """Tokenizer, chat template and image preprocessing of one checkpoint."""

    tokenizer: TextTokenizer
    image_cfg: ImageProcessorConfig
    chat_template: str
    model: LlavaConfig
    pad_token_id: int

    @classmethod
    def load(cls, folder: Path, cfg: LlavaConfig) -> "Processor":
        """Read the processor files of a checkpoint folder (both the published and the transformers-5 layout)."""
        tokenizer = load_tokenizer(folder)
        image_id = tokenizer.image_token_id
        if image_id != cfg.image_token_id:
            raise ConfigError(
                f"the tokenizer maps {tokenizer.image_token!r} to id {image_id}, but config.json says the image "
                f"token id is {cfg.image_token_id}; the tokenizer does not belong to this model."
            )
        image_dict = read_image_processor_dict(folder)
        image_cfg = ImageProcessorConfig.from_hf(image_dict)
        _check_agrees(image_dict, image_cfg, cfg)
        template = load_chat_template(folder) or DEFAULT_TEMPLATES[cfg.text.model_type]
        pad = tokenizer.token_id(tokenizer.pad_token)
        for candidate in (pad, cfg.text.pad_token_id, tokenizer.token_id(tokenizer.eos_token), 0):
            if candidate is not None:
                pad = candidate
                break
        return cls(tokenizer, image_cfg, template, cfg, int(pad))

    @property
    def features_per_image(self) -> int | None:
        """`<image>` tokens per image when it does not depend on the image's size (LLaVA-1.5), else None."""
        return self.model.image_features_per_tile if not self.model.image_grid_pinpoints else None

    def image_inputs(self, image: Image.Image) -> tuple[np.ndarray, int]:
        """Tower inputs (n, 3, S, S) of one RGB-convertible image and its number of `<image>` tokens."""
        m = self.model
        if not m.image_grid_pinpoints:
            return preprocess(image, self.image_cfg)[None], m.image_features_per_tile
        size = (image.height, image.width)
        tiles = anyres_tiles(image, self.image_cfg, m.image_grid_pinpoints, m.vision.image_size)
        count = anyres.next_feature_count(size, m.image_grid_pinpoints, m.vision.image_size,
                                          m.vision.patches_per_side, m.image_features_per_tile)
        return tiles, count

    def render(self, messages: Any, add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
        """The chat template applied to a conversation, and the conversation's image sources in order."""
        template_messages, images = split_conversation(messages)
        text = render_template(self.chat_template, template_messages, add_generation_prompt,
                               self.tokenizer.special_tokens())
        return text, images

    def encode(self, messages: Any, add_generation_prompt: bool = True) -> Encoded:
        """Render, load and preprocess the images, expand placeholders and tokenize one conversation."""
        prompt, sources = self.render(messages, add_generation_prompt)
        return self.encode_prompt(prompt, sources)

    def encode_prompt(self, prompt: str, sources: list[Any]) -> Encoded:
        """Tokenize an already rendered prompt holding one image placeholder per image in `sources`."""
        token = self.tokenizer.image_token
        images = [load_image(src) for src in sources]
        inputs = [self.image_inputs(im) for im in images]
        counts = [n for _, n in inputs]
        expanded = expand_image_tokens(prompt, token, counts)
        ids = self.tokenizer.encode(expanded)
        image_id = self.tokenizer.image_token_id
        n_tokens = sum(1 for i in ids if i == image_id)
        if n_tokens != sum(counts):
            raise PromptError(
                f"after tokenization the prompt holds {n_tokens} image tokens, expected {sum(counts)} for "
                f"{len(sources)} image(s); the text itself must not contain {token!r}."
            )
        pixels = np.concatenate([t for t, _ in inputs]) if inputs else None
        sizes = tuple((im.height, im.width) for im in images)
        return Encoded(prompt=prompt, input_ids=ids, pixel_values=pixels, image_sizes=sizes)

    def collate(self, items: list[Encoded]) -> Batch:
        """Left-pad encoded conversations into one batch."""
        if not items:
            raise PromptError("prepare() needs at least one conversation.")
        t = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), t), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), t), dtype=torch.long)
        for i, e in enumerate(items):
            n = len(e.input_ids)
            ids[i, t - n :] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[i, t - n :] = 1
        arrays = [e.pixel_values for e in items if e.pixel_values is not None]
        pixels = torch.from_numpy(np.concatenate(arrays)) if arrays else None
        counts = tuple(len(e.image_sizes) for e in items)
        sizes = tuple(s for e in items for s in e.image_sizes)
        return Batch(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_counts=counts, image_sizes=sizes)

    def prepare(self, conversations: list[Any], add_generation_prompt: bool = True) -> Batch:
        """Encode and left-pad several conversations."""
        return self.collate([self.encode(c, add_generation_prompt) for c in conversations])


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
