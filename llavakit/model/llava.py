"""LLaVA and LLaVA-NeXT: vision tower -> projector -> image features at the `<image>` token positions.

Dimension letters: N tower inputs (tiles), F features per tile, p patches per side, B batch,
T tokens, D decoder width, V vocab, R image-token rows of a whole batch.

    pixels (N,3,S,S) ─► tower (selected layers) ─► drop CLS ("default") ─► projector ─► (N, F, D)
    LLaVA-1.5: each image is one tile, its F features in order.
    NeXT: base tile, then the tile grid stitched, unpadded, a newline after each row (anyres.py).
    input_ids (B,T) ─► embed ─► rows where id == image_token_id := features, in order ─► decoder
"""

from __future__ import annotations

import torch
from torch import nn

from .. import anyres
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
        if cfg.has_image_newline:
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    def tie_weights(self) -> None:
        """Share the output projection with the input embeddings when the config says so."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def encode_tiles(self, pixels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Projected features (N, F, D) of tower inputs (N, 3, S, S), `chunk` tiles per tower call.

        Chunking bounds the attention activations of the tower when a batch has many tiles.
        """
        outs = []
        for part in pixels.split(chunk):
            feats = self.vision_tower(part, self.cfg.vision_feature_layers)  # (n, L, Dv*k)
            if self.cfg.select_strategy == "default":
                feats = feats[:, 1:]  # the class token carries no spatial information
            outs.append(self.multi_modal_projector(feats))  # (n, F, D)
        return torch.cat(outs)

    def image_features(self, pixels: torch.Tensor, image_sizes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Features (R, D) of every image in order, ready to replace the image-token rows.

        pixels: the tower inputs of all images, as the processor lays them out (one tile per
        LLaVA-1.5 image; base + grid tiles per NeXT image). image_sizes: (h, w) per image.
        """
        tiles = self.encode_tiles(pixels)  # (N, F, D)
        cfg = self.cfg
        if not cfg.image_grid_pinpoints:
            return tiles.flatten(0, 1)
        out, start = [], 0
        for size in image_sizes:
            n = anyres.num_tiles(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
            out.append(self._pack_next(tiles[start : start + n], size))
            start += n
        if start != tiles.shape[0]:
            raise TokenFeatureMismatch(
                f"{tiles.shape[0]} tiles were given for images that need {start}; prepare inputs with vlm.prepare."
            )
        return torch.cat(out)

    def _pack_next(self, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One NeXT image: (1 + rows*cols, F, D) tile features → (base F + h'*(w'+1), D)."""
        cfg = self.cfg
        p = cfg.vision.patches_per_side
        rows, cols = anyres.grid_shape(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
        (gh, gw), (top, bottom, left, right) = anyres.next_layout(
            size, cfg.image_grid_pinpoints, cfg.vision.image_size, p)
        d = tiles.shape[-1]
        grid = tiles[1:].view(rows, cols, p, p, d)  # (rows, cols, p, p, D)
        grid = grid.permute(4, 0, 2, 1, 3).reshape(d, gh, gw)  # (D, rows*p, cols*p), row-major over the image
        grid = grid[:, top:bottom, left:right]  # (D, h', w'): padding cut away
        newline = self.image_newline.to(grid.dtype)[:, None, None].expand(d, grid.shape[1], 1)  # (D, h', 1)
        grid = torch.cat([grid, newline], dim=-1)  # (D, h', w'+1)
        return torch.cat([tiles[0], grid.flatten(1, 2).T])  # (F + h'*(w'+1), D)

    def embed_inputs(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
                     image_sizes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Embeddings (B, T, D) of a prepared batch: tokens, with image features where the image tokens are."""
        feats = None
        if pixels is not None:
            feats = self.image_features(pixels.to(self.lm_head.weight.device), image_sizes)
        return self.embed(input_ids.to(self.lm_head.weight.device), feats)

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
