"""Image geometry shared by the processor (how many `<image>` tokens) and the model (how many features).

Pure Python on ints and floats, torch-free, so the two sides can never round differently: the
reference's own token/feature mismatches (transformers #34625, #35775) came from doing this
arithmetic once on tensors and once on Python numbers. Sizes are always (height, width);
grids are (rows, cols).

LLaVA-NeXT any-resolution, for an H×W image and tiles of side P:

    best (bh, bw) among pinpoints ─► resize inside it keeping aspect ─► pad centred to bh×bw
    ─► rows×cols tiles of P×P (row-major), plus the whole image squashed to P×P first
    features: base tile, then the tile grid stitched to (rows·p)×(cols·p), padding cut away
    ("unpad"), one newline feature after every row

LLaVA-OneVision adds a cap (`anyres_max_N`): when the unpadded grid holds clearly more than N
tiles' worth of features it is scaled down (bilinear) to about N tiles; a conversation with
several images encodes each as one padded square tile (base + one newline); a video's frames
are pooled to ceil(p/2) x ceil(p/2) and the video ends with one newline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]
Bounds = tuple[int, int, int, int]  # (top, bottom, left, right)


def tile_feature_count(image_size: int, patch_size: int, has_class_token: bool, strategy: str) -> int:
    """Features one square tower input yields after selection.

    CLIP-L/14 at 336 px: 24*24 patches + 1 class token, minus the class token for "default" = 576.
    """
    n = (image_size // patch_size) ** 2 + (1 if has_class_token else 0)
    return n - 1 if strategy == "default" else n


def select_best_resolution(size: Size, pinpoints: tuple[Size, ...]) -> Size:
    """The pinpoint (h, w) that keeps the most of the image's pixels, then wastes the least.

    Ties keep the earlier pinpoint (strict comparisons), as the reference does.
    """
    h, w = size
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def resize_within(size: Size, target: Size) -> Size:
    """(h, w) the image is resized to inside `target`, keeping its aspect ratio (ceil, capped)."""
    h, w = size
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def centre_padding(size: Size, target: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that centres `size` in `target`; the odd pixel goes bottom/right."""
    top, extra_h = divmod(target[0] - size[0], 2)
    left, extra_w = divmod(target[1] - size[1], 2)
    return top, top + extra_h, left, left + extra_w


def grid_shape(size: Size, pinpoints: tuple[Size, ...], tile: int) -> Size:
    """(rows, cols) of tiles an image of `size` is cut into."""
    bh, bw = select_best_resolution(size, pinpoints)
    return bh // tile, bw // tile


def num_tiles(size: Size, pinpoints: tuple[Size, ...], tile: int) -> int:
    """Tower inputs for one image: the grid plus the base view."""
    rows, cols = grid_shape(size, pinpoints, tile)
    return rows * cols + 1


def unpad_bounds(size: Size, grid: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature grid (gh, gw) that covers the image, padding removed.

    The reference computes the kept extent with `int(round(x, 7))` on Python floats, then removes
    the same number of rows (or columns) on both sides.
    """
    h, w = size
    gh, gw = grid
    if w / h > gw / gh:
        new_h = int(round(h * (gw / w), 7))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = int(round(w * (gh / h), 7))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad


def next_layout(size: Size, pinpoints: tuple[Size, ...], tile: int, patches_per_side: int) -> tuple[Size, tuple[int, int, int, int]]:
    """The stitched feature grid of a NeXT image and its unpadded bounds."""
    rows, cols = grid_shape(size, pinpoints, tile)
    grid = (rows * patches_per_side, cols * patches_per_side)
    return grid, unpad_bounds(size, grid)


def capped_shape(rows: int, cols: int, max_tiles: int | None, patches_per_side: int) -> Size:
    """OneVision's anyres_max rule: the (rows, cols) a feature grid is interpolated to, or unchanged.

    ratio = sqrt(rows*cols / (max_tiles * p^2)); only above 1.1 is the grid scaled, to
    int(rows // ratio) x int(cols // ratio) (float floor division, as the reference).
    """
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * patches_per_side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def image_feature_shape(size: Size, pinpoints: tuple[Size, ...], tile: int, patches_per_side: int,
                        max_tiles: int | None) -> tuple[tuple[int, int, int, int], Size]:
    """For a tiled image: the unpadded bounds on the stitched grid and the final (rows, cols) of features."""
    _, bounds = next_layout(size, pinpoints, tile, patches_per_side)
    top, bottom, left, right = bounds
    return bounds, capped_shape(bottom - top, right - left, max_tiles, patches_per_side)


def image_token_count(size: Size, pinpoints: tuple[Size, ...], tile: int, patches_per_side: int,
                      base_features: int, max_tiles: int | None, tiled: bool) -> int:
    """`<image>` tokens of one image (see `image_layout`, which this reads)."""
    geom = Geometry(tile, patches_per_side, base_features, pinpoints, max_tiles, newline=bool(pinpoints))
    return image_layout(size, geom, tiled).tokens


def next_feature_count(size: Size, pinpoints: tuple[Size, ...], tile: int, patches_per_side: int,
                       base_features: int) -> int:
    """`<image>` tokens of one LLaVA-NeXT image: base tile + unpadded grid + one newline per row."""
    return image_token_count(size, pinpoints, tile, patches_per_side, base_features, None, True)


def pooled_side(patches_per_side: int) -> int:
    """Side of a video frame's feature grid after OneVision's 2x bilinear pooling (27 -> 14)."""
    return math.ceil(patches_per_side / 2)


def video_token_count(frames: int, patches_per_side: int) -> int:
    """`<video>` tokens of one OneVision video: every frame's pooled grid, then one newline."""
    return frames * pooled_side(patches_per_side) ** 2 + 1


# -- layouts: every geometric fact of one image or video, computed once -------------------------------

@dataclass(frozen=True)
class Geometry:
    """The facts of a checkpoint that decide every layout (LlavaConfig.geometry builds it)."""

    tile: int  # side of one tower input, pixels
    patches_per_side: int  # p: a tile's feature grid is p x p
    base_features: int  # features of one tile after the select strategy
    pinpoints: tuple[Size, ...] = ()  # any-resolution candidates (h, w); () = one tile per image
    max_tiles: int | None = None  # OneVision's anyres_max_N cap; None = no cap
    newline: bool = False  # a learned newline ends feature rows (and follows an untiled image's base view)
    video_side: int | None = None  # side of a frame's grid after pooling; None = the family takes no video
    video_newline: bool = False  # one newline after a video's frames


@dataclass(frozen=True)
class ImageLayout:
    """One image: its tower inputs and how its features are laid out in the prompt.

    Decided once by the processor when it prepares the image; the engine and the model read it.
    Untiled (LLaVA-1.5, a OneVision image among several, `detail: low`): one square tile, its base
    features, then one newline when the family has one. Tiled: the base view, then `grid` tiles whose
    stitched features are cut to `bounds` (padding removed), scaled to `features` (the anyres_max cap)
    and end each row with a newline.
    """

    size: Size  # (h, w) of the image after RGB conversion
    tiled: bool
    base: int  # features of the base view
    newline: bool = False  # untiled: a newline after the base view
    grid: Size = (0, 0)  # tiled: (rows, cols) of tiles
    bounds: Bounds = (0, 0, 0, 0)  # tiled: the image's part of the stitched (rows*p, cols*p) feature grid
    features: Size = (0, 0)  # tiled: (rows, cols) of grid features after the cap

    @property
    def tiles(self) -> int:
        """Tower inputs: the base view, plus the grid when tiled."""
        return self.grid[0] * self.grid[1] + 1 if self.tiled else 1

    @property
    def tokens(self) -> int:
        """`<image>` tokens = features the model emits for this image."""
        if self.tiled:
            rows, cols = self.features
            return self.base + rows * (cols + 1)
        return self.base + int(self.newline)


@dataclass(frozen=True)
class VideoLayout:
    """One video: its sampled frames, each frame's pooled grid side, and a closing newline or not."""

    frames: int
    side: int
    newline: bool

    @property
    def tiles(self) -> int:
        """Tower inputs: one per frame."""
        return self.frames

    @property
    def tokens(self) -> int:
        """`<video>` tokens = features the model emits for this video."""
        return self.frames * self.side**2 + int(self.newline)


def image_layout(size: Size, geom: Geometry, tiled: bool) -> ImageLayout:
    """The layout of one (h, w) image; `tiled` is ignored (False) for checkpoints without pinpoints."""
    if not geom.pinpoints or not tiled:
        return ImageLayout(size, False, geom.base_features, newline=geom.newline)
    grid = grid_shape(size, geom.pinpoints, geom.tile)
    bounds, features = image_feature_shape(size, geom.pinpoints, geom.tile, geom.patches_per_side, geom.max_tiles)
    return ImageLayout(size, True, geom.base_features, geom.newline, grid, bounds, features)


def video_layout(frames: int, geom: Geometry) -> VideoLayout:
    """The layout of a video of `frames` sampled frames."""
    if geom.video_side is None:
        raise ValueError("this checkpoint takes no video")
    return VideoLayout(frames, geom.video_side, geom.video_newline)
