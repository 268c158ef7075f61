"""LLaVA, LLaVA-NeXT and LLaVA-OneVision: tower -> projector -> features at the placeholder tokens.

Dimension letters: N tower inputs (tiles or frames), F features per tile, p patches per side,
q pooled side, B batch, T tokens, D decoder width, V vocab, R placeholder rows of a whole batch.

    pixels (N,3,S,S) ─► tower (selected layers) ─► drop CLS ("default") ─► projector ─► (N, F, D)
    LLaVA-1.5 image: one tile, its F features.
    Tiled image (NeXT, OneVision alone in its prompt): base tile, then the tile grid stitched,
      unpadded, capped (OneVision), a newline after each row.   (geometry: anyres.ImageLayout, from the processor)
    Untiled image (OneVision, several in one prompt): one square tile + one newline.
    Video (OneVision): every frame pooled to q×q, frames in order, one newline at the end.
    input_ids (B,T) ─► embed ─► image rows := image features, video rows := video features ─► decoder
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..anyres import ImageLayout, VideoLayout
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
        if cfg.video_pool_mode == "conv":  # NeXT-Video's learned frame pooling (the reference's vision_resampler)
            self.vision_resampler = nn.Module()
            stride = cfg.video_pool_stride
            self.vision_resampler.pool = nn.Conv2d(cfg.vision.hidden_size, cfg.video_pool_channels, stride, stride)

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
    def encode_tiles(self, pixels: torch.Tensor, chunk: int = 16, pool: bool = False) -> torch.Tensor:
        """Projected features (N, F, D) of tower inputs (N, 3, S, S), `chunk` tiles per tower call.

        Identical tiles go through the tower once: a square image whose best grid is a single tile
        (OneVision at 384 px) has a base view equal to its one grid tile, and the tower is most of a
        cold request's time. Chunking bounds the attention activations when a batch has many tiles.
        pool: NeXT-Video frames: the tower features are pooled (`pool_frames`) before the projector.
        """
        pixels = pixels.to(self.device)
        unique, index = unique_tiles(pixels)
        if index is not None:
            return self.encode_tiles(unique, chunk, pool)[index]
        outs = []
        for part in pixels.split(chunk):
            feats = self.vision_tower(part, self.cfg.vision_feature_layers)  # (n, L, Dv*k)
            if self.cfg.select_strategy == "default":
                feats = feats[:, 1:]  # the class token carries no spatial information
            if pool:
                feats = self.pool_frames(feats)  # (n, q*q, Dv*k)
            outs.append(self.multi_modal_projector(feats))  # (n, F, D)
        return torch.cat(outs)

    def pool_frames(self, feats: torch.Tensor) -> torch.Tensor:
        """NeXT-Video: frame features (n, p*p, C) pooled over the p x p grid by the stride: (n, q*q, C)."""
        n, _, c = feats.shape
        p, stride = self.cfg.vision.patches_per_side, self.cfg.video_pool_stride
        grid = feats.view(n, p, p, c).permute(0, 3, 1, 2)  # (n, C, p, p)
        if self.cfg.video_pool_mode == "average":
            grid = F.avg_pool2d(grid, stride, stride)
        elif self.cfg.video_pool_mode == "max":
            grid = F.max_pool2d(grid, stride, stride)
        else:
            grid = self.vision_resampler.pool(grid)
        return grid.flatten(2).transpose(1, 2)  # (n, q*q, C)

    def _newline(self, dtype: torch.dtype) -> torch.Tensor:
        return self.image_newline.to(dtype)

    def image_features(self, pixels: torch.Tensor, layouts: tuple[ImageLayout, ...]) -> torch.Tensor:
        """Features (R, D) of every image in order, ready to replace the image-token rows.

        pixels: tower inputs of all images as the processor lays them out; layouts: one per image,
        from the processor (`layout.tiles` rows of `pixels` each).
        """
        return torch.cat(self.pack_images(self.encode_tiles(pixels), layouts))

    def pack_images(self, tiles: torch.Tensor, layouts: tuple[ImageLayout, ...]) -> list[torch.Tensor]:
        """Per-image features (R_i, D) from the projected tile features (N, F, D) of those images."""
        needed = sum(x.tiles for x in layouts)
        if needed != tiles.shape[0]:
            raise TokenFeatureMismatch(
                f"{tiles.shape[0]} tiles were given for images that need {needed}; prepare inputs with vlm.prepare."
            )
        out, start = [], 0
        for layout in layouts:
            n = layout.tiles
            if layout.tiled:
                out.append(self._pack_tiled(tiles[start : start + n], layout))
            elif layout.newline:
                out.append(torch.cat([tiles[start], self._newline(tiles.dtype)[None]]))  # (F + 1, D)
            else:
                out.append(tiles[start])  # (F, D): LLaVA-1.5
            start += n
        return out

    def _pack_tiled(self, tiles: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        """One tiled image: (1 + rows*cols, F, D) tile features → (F + h*(w+1), D)."""
        p = self.cfg.vision.patches_per_side
        rows, cols = layout.grid
        top, bottom, left, right = layout.bounds
        d = tiles.shape[-1]
        grid = tiles[1:].view(rows, cols, p, p, d)  # (rows, cols, p, p, D)
        grid = grid.permute(4, 0, 2, 1, 3).reshape(d, rows * p, cols * p)  # (D, rows*p, cols*p), image order
        grid = grid[:, top:bottom, left:right]  # (D, h, w): padding cut away
        if layout.features != tuple(grid.shape[1:]):
            grid = F.interpolate(grid[None], size=list(layout.features), mode="bilinear")[0]  # anyres_max cap
        newline = self._newline(grid.dtype)[:, None, None].expand(d, grid.shape[1], 1)  # (D, h, 1)
        grid = torch.cat([grid, newline], dim=-1)  # (D, h, w+1)
        return torch.cat([tiles[0], grid.flatten(1, 2).T])  # (F + h*(w+1), D)

    def video_features(self, pixels: torch.Tensor, layouts: tuple[VideoLayout, ...]) -> torch.Tensor:
        """Features (R, D) of every video in order: each frame pooled, then one newline per video.

        pixels: (sum of frames, 3, S, S); layouts: one per video, from the processor.
        """
        frames = [x.frames for x in layouts]
        if sum(frames) != pixels.shape[0]:
            raise TokenFeatureMismatch(
                f"{pixels.shape[0]} frames were given for videos of {sum(frames)}; prepare inputs with vlm.prepare."
            )
        if self.cfg.video_pool_mode is not None:  # NeXT-Video: pooled in the tower's space; no newline
            pooled = self.encode_tiles(pixels, pool=True)  # (ΣF, q*q, D)
            return pooled.reshape(-1, pooled.shape[-1])
        p = self.cfg.vision.patches_per_side
        feats = self.encode_tiles(pixels)  # (ΣF, p*p, D)
        n, _, d = feats.shape
        grid = feats.view(n, p, p, d).permute(0, 3, 1, 2)  # (ΣF, D, p, p)
        out = []
        for layout, video in zip(layouts, grid.split(frames)):
            q = layout.side
            pooled = F.interpolate(video, size=[q, q], mode="bilinear")  # (F, D, q, q)
            rows = pooled.permute(0, 2, 3, 1).reshape(-1, d)  # (F*q*q, D)
            if layout.newline:
                rows = torch.cat([rows, self._newline(rows.dtype)[None]])
            out.append(rows)
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
                     image_layouts: tuple[ImageLayout, ...], video_pixels: torch.Tensor | None = None,
                     video_layouts: tuple[VideoLayout, ...] = ()) -> torch.Tensor:
        """Embeddings (B, T, D) of a prepared batch: tokens, with image and video features in place."""
        images = None if pixels is None else self.image_features(pixels, image_layouts)
        videos = None if video_pixels is None else self.video_features(video_pixels, video_layouts)
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
        if cache is not None and embeds.shape[1] == 1:
            # A single-token step: the native step (fused_decode.py) runs the head in its own call.
            fused = getattr(self.language_model.fused_decode, "logits", None)
            logits = None if fused is None else fused(embeds, positions, cache, self.lm_head)
            if logits is not None:
                return logits
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
