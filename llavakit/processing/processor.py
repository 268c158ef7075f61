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

from ..config import LlavaConfig
from ..errors import ConfigError, PromptError
from .image import ImageProcessorConfig, load_image, preprocess, read_image_processor_dict
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
    pixel_values: (N, 3, S, S) float32 of all images, row by row in prompt order; None without images.
    image_counts: images per row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_counts: tuple[int, ...]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class Encoded:
    """One conversation, ready to batch."""

    prompt: str  # the rendered template, one placeholder per image
    input_ids: list[int]
    pixel_values: np.ndarray | None  # (n, 3, S, S)


@dataclass(frozen=True)
class Processor:
    """Tokenizer, chat template and image preprocessing of one checkpoint."""

    tokenizer: TextTokenizer
    image_cfg: ImageProcessorConfig
    chat_template: str
    features_per_image: int
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
        image_cfg = ImageProcessorConfig.from_hf(read_image_processor_dict(folder))
        template = load_chat_template(folder) or DEFAULT_TEMPLATES[cfg.text.model_type]
        pad = tokenizer.token_id(tokenizer.pad_token)
        for candidate in (pad, cfg.text.pad_token_id, tokenizer.token_id(tokenizer.eos_token), 0):
            if candidate is not None:
                pad = candidate
                break
        return cls(tokenizer, image_cfg, template, cfg.image_features_per_tile, int(pad))

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
        expanded = expand_image_tokens(prompt, token, [self.features_per_image] * len(sources))
        ids = self.tokenizer.encode(expanded)
        image_id = self.tokenizer.image_token_id
        n_tokens = sum(1 for i in ids if i == image_id)
        if n_tokens != self.features_per_image * len(sources):
            raise PromptError(
                f"after tokenization the prompt holds {n_tokens} image tokens, expected "
                f"{self.features_per_image * len(sources)} for {len(sources)} image(s); the text itself must "
                f"not contain {token!r}."
            )
        pixels = None
        if sources:
            pixels = np.stack([preprocess(load_image(s), self.image_cfg) for s in sources])
        return Encoded(prompt=prompt, input_ids=ids, pixel_values=pixels)

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
        counts = tuple(0 if e.pixel_values is None else len(e.pixel_values) for e in items)
        return Batch(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_counts=counts)

    def prepare(self, conversations: list[Any], add_generation_prompt: bool = True) -> Batch:
        """Encode and left-pad several conversations."""
        return self.collate([self.encode(c, add_generation_prompt) for c in conversations])
