"""LLaVA: vision tower -> projector -> image features placed at the `<image>` token positions.

Dimension letters: N images, F features per image, B batch, T tokens, D decoder width, V vocab.

    pixels (N,3,S,S) ─► tower (selected layers) ─► drop CLS ("default") ─► projector ─► (N, F, D)
    input_ids (B,T) ─► embed ─► rows where id == image_token_id := features, in order ─► decoder
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LlavaConfig
from ..errors import TokenFeatureMismatch
from .projector import Projector
from .text import KVCache, TextModel
from .vision import VisionTower


class LlavaModel(nn.Module):
    """The architecture only: no tokenizer, no sampling, no batching policy."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Share the output projection with the input embeddings when the config says so."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected features (N, F, D) for preprocessed images (N, 3, S, S)."""
        feats = self.vision_tower(pixels, self.cfg.vision_feature_layers)  # (N, L, Dv*k)
        if self.cfg.select_strategy == "default":
            feats = feats[:, 1:]  # the class token carries no spatial information
        return self.multi_modal_projector(feats)  # (N, F, D)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written over the image-token rows.

        image_features: (R, D), rows in prompt order (batch row, then position). R must equal
        the number of image tokens in `input_ids`, else TokenFeatureMismatch gives both counts.
        """
        embeds = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        n_tokens = int(is_image.sum())
        n_feats = 0 if image_features is None else image_features.shape[0]
        if n_tokens != n_feats:
            raise TokenFeatureMismatch(
                f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_feats}. "
                "Each image needs exactly as many image tokens as it has features; build prompts with "
                "the processor (vlm.prepare) rather than by hand."
            )
        if n_tokens == 0:
            return embeds
        feats = image_features.to(embeds.dtype)
        return embeds.masked_scatter(is_image[..., None].expand_as(embeds), feats)

    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: KVCache | None,
        last_only: bool,
    ) -> torch.Tensor:
        """Run the decoder and the head; logits (B, T or 1, V) in the model dtype."""
        hidden = self.language_model(embeds, positions, valid, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)
