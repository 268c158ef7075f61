"""LLaVA, LLaVA-NeXT and LLaVA-OneVision: tower -> projector -> features at the placeholder tokens.

Dimension letters: N tower inputs (tiles or frames), F features per tile, p patches per side,
q pooled side, B batch, T tokens, D decoder width, V vocab, R placeholder rows of a whole batch.

    pixels (N,3,S,S) ─► tower (selected layers) ─► drop CLS ("default") ─► projector ─► (N, F, D)
    LLaVA-1.5 image: one tile, its F features.
    Tiled image (NeXT, OneVision alone in its prompt): base tile, then the tile grid stitched,
      unpadded, capped (OneVision), a newline after each row.            (geometry: anyres.py)
    Untiled image (OneVision, several in one prompt): one square tile + one newline.
    Video (OneVision): every frame pooled to q×q, frames in order, one newline at the end.
    input_ids (B,T) ─► embed ─► image rows := image features, video rows := video features ─► decoder
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import anyres
from ..config import LlavaConfig
from ..errors import TokenFeatureMismatch
from .projector import Projector
from .text import PagedStep, TextModel
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
        if self.cfg.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # a quantised head is its own copy
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the output head may be stored quantised; the embeddings never are)."""
        return self.language_model.embed_tokens.weight.dtype

    # -- vision ---------------------------------------------------------------------------------
    def encode_tiles(self, pixels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Projected features (N, F, D) of tower inputs (N, 3, S, S), `chunk` tiles per tower call.

        Identical tiles go through the tower once: a square image whose best grid is a single tile
        (OneVision at 384 px) has a base view equal to its one grid tile, and the tower is most of a
        cold request's time. Chunking bounds the attention activations when a batch has many tiles.
        """
        pixels = pixels.to(self.device)
        unique, index = unique_tiles(pixels)
        if index is not None:
            return self.encode_tiles(unique, chunk)[index]
        outs = []
        for part in pixels.split(chunk):
            feats = self.vision_tower(part, self.cfg.vision_feature_layers)  # (n, L, Dv*k)
            if self.cfg.select_strategy == "default":
                feats = feats[:, 1:]  # the class token carries no spatial information
            outs.append(self.multi_modal_projector(feats))  # (n, F, D)
        return torch.cat(outs)

    def _newline(self, dtype: torch.dtype) -> torch.Tensor:
        return self.image_newline.to(dtype)

    def image_features(self, pixels: torch.Tensor, image_sizes: tuple[tuple[int, int], ...],
                       image_tiled: tuple[bool, ...]) -> torch.Tensor:
        """Features (R, D) of every image in order, ready to replace the image-token rows.

        pixels: tower inputs of all images as the processor lays them out. image_sizes: (h, w)
        per image. image_tiled: per image, whether it was cut into any-resolution tiles.
        """
        return torch.cat(self.pack_images(self.encode_tiles(pixels), image_sizes, image_tiled))

    def tiles_per_image(self, size: tuple[int, int], tiled: bool) -> int:
        """Tower inputs the processor made for one image."""
        if tiled and self.cfg.image_grid_pinpoints:
            return anyres.num_tiles(size, self.cfg.image_grid_pinpoints, self.cfg.vision.image_size)
        return 1

    def pack_images(self, tiles: torch.Tensor, image_sizes: tuple[tuple[int, int], ...],
                    image_tiled: tuple[bool, ...]) -> list[torch.Tensor]:
        """Per-image features (R_i, D) from the projected tile features (N, F, D) of those images."""
        out, start = [], 0
        for size, tiled in zip(image_sizes, image_tiled):
            n = self.tiles_per_image(size, tiled)
            if start + n > tiles.shape[0]:
                break
            if not self.cfg.image_grid_pinpoints:
                out.append(tiles[start])  # (F, D)
            elif tiled:
                out.append(self._pack_tiled(tiles[start : start + n], size))
            else:
                out.append(torch.cat([tiles[start], self._newline(tiles.dtype)[None]]))  # (F + 1, D)
            start += n
        if start != tiles.shape[0] or len(out) != len(image_sizes):
            needed = sum(self.tiles_per_image(s, t) for s, t in zip(image_sizes, image_tiled))
            raise TokenFeatureMismatch(
                f"{tiles.shape[0]} tiles were given for images that need {needed}; prepare inputs with vlm.prepare."
            )
        return out

    def _pack_tiled(self, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One tiled image: (1 + rows*cols, F, D) tile features → (F + h*(w+1), D)."""
        cfg = self.cfg
        p = cfg.vision.patches_per_side
        rows, cols = anyres.grid_shape(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
        (top, bottom, left, right), final = anyres.image_feature_shape(
            size, cfg.image_grid_pinpoints, cfg.vision.image_size, p, cfg.max_tiles)
        d = tiles.shape[-1]
        grid = tiles[1:].view(rows, cols, p, p, d)  # (rows, cols, p, p, D)
        grid = grid.permute(4, 0, 2, 1, 3).reshape(d, rows * p, cols * p)  # (D, rows*p, cols*p), image order
        grid = grid[:, top:bottom, left:right]  # (D, h, w): padding cut away
        if final != tuple(grid.shape[1:]):
            grid = F.interpolate(grid[None], size=list(final), mode="bilinear")[0]  # anyres_max cap
        newline = self._newline(grid.dtype)[:, None, None].expand(d, grid.shape[1], 1)  # (D, h, 1)
        grid = torch.cat([grid, newline], dim=-1)  # (D, h, w+1)
        return torch.cat([tiles[0], grid.flatten(1, 2).T])  # (F + h*(w+1), D)

    def video_features(self, pixels: torch.Tensor, video_frames: tuple[int, ...]) -> torch.Tensor:
        """Features (R, D) of every video in order: pooled frames, then one newline per video.

        pixels: (sum of frames, 3, S, S). video_frames: frames per video.
        """
        if sum(video_frames) != pixels.shape[0]:
            raise TokenFeatureMismatch(
                f"{pixels.shape[0]} frames were given for videos of {sum(video_frames)}; prepare inputs with vlm.prepare."
            )
        p = self.cfg.vision.patches_per_side
        q = anyres.pooled_side(p)
        feats = self.encode_tiles(pixels)  # (ΣF, p*p, D)
        n, _, d = feats.shape
        grid = feats.view(n, p, p, d).permute(0, 3, 1, 2)  # (ΣF, D, p, p)
        pooled = F.interpolate(grid, size=[q, q], mode="bilinear")  # (ΣF, D, q, q)
        pooled = pooled.permute(0, 2, 3, 1).reshape(n, q * q, d)  # (ΣF, q*q, D)
        newline = self._newline(pooled.dtype)[None]  # (1, D)
        out = [torch.cat([v.flatten(0, 1), newline]) for v in pooled.split(list(video_frames))]
        return torch.cat(out)

    # -- merging ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None,
              video_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with features written over the placeholder rows.

        image_features / video_features: (R, D), rows in prompt order (batch row, then position).
        R must equal the number of placeholder tokens, else TokenFeatureMismatch gives both counts.
        """
        placeholders = [("Image", self.cfg.image_token_id, image_features)]
        if self.cfg.video_token_id is not None:
            placeholders.append(("Video", self.cfg.video_token_id, video_features))
        elif video_features is not None:
            raise TokenFeatureMismatch(f"{self.cfg.model_type} checkpoints take no video; send images instead.")
        # Original-format checkpoints mark placeholders with ids outside the vocabulary (-200):
        # look those rows up as id 0, they are overwritten below anyway.
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for _, token_id, _ in placeholders:
            is_placeholder |= input_ids == token_id
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_placeholder, 0))  # (B, T, D)
        for kind, token_id, feats in placeholders:
            mask = input_ids == token_id  # (B, T)
            n_tokens = int(mask.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_tokens != n_feats:
                raise TokenFeatureMismatch(
                    f"{kind} features and {kind.lower()} tokens do not match: tokens: {n_tokens}, features: "
                    f"{n_feats}. Each {kind.lower()} needs exactly as many placeholder tokens as it has features; "
                    "build prompts with the processor (vlm.prepare) rather than by hand."
                )
            if n_tokens:
                embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))
        return embeds

    def embed_inputs(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
                     image_sizes: tuple[tuple[int, int], ...], image_tiled: tuple[bool, ...],
                     video_pixels: torch.Tensor | None = None, video_frames: tuple[int, ...] = ()) -> torch.Tensor:
        """Embeddings (B, T, D) of a prepared batch: tokens, with image and video features in place."""
        images = None if pixels is None else self.image_features(pixels, image_sizes, image_tiled)
        videos = None if video_pixels is None else self.video_features(video_pixels, video_frames)
        return self.embed(input_ids.to(self.device), images, videos)

    # -- language ---------------------------------------------------------------------------------
    def decode(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: PagedStep | None,
        last_only: bool,
    ) -> torch.Tensor:
        """Run the decoder and the head; logits (B, T or 1, V) in the model dtype."""
        hidden = self.language_model(embeds, positions, valid, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)


def unique_tiles(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(unique tiles, index) with unique[index] == pixels; index is None when no tile repeats.

    Tiles are grouped by their sum, then compared exactly, so equal sums by chance cost one compare.
    """
    sums = pixels.flatten(1).double().sum(1).tolist()
    seen: dict[float, list[int]] = {}  # sum -> positions in `keep`
    keep: list[int] = []
    index: list[int] = []
    for i, key in enumerate(sums):
        match = next((u for u in seen.get(key, ()) if torch.equal(pixels[keep[u]], pixels[i])), None)
        if match is None:
            match = len(keep)
            keep.append(i)
            seen.setdefault(key, []).append(match)
        index.append(match)
    if len(keep) == len(index):
        return pixels, None
    return pixels[keep], torch.tensor(index, device=pixels.device)
