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

Size = tuple[int, int]


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
    """`<image>` tokens of one image.

    No pinpoints (LLaVA-1.5): the base tile only. Untiled (a OneVision image among several):
    base + one newline. Tiled: base + final feature grid + one newline per row.
    """
    if not pinpoints:
        return base_features
    if not tiled:
        return base_features + 1
    _, (rows, cols) = image_feature_shape(size, pinpoints, tile, patches_per_side, max_tiles)
    return base_features + rows * (cols + 1)


def next_feature_count(size: Size, pinpoints: tuple[Size, ...], tile: int, patches_per_side: int,
                       base_features: int) -> int:
    """`<image>` tokens of one LLaVA-NeXT image: base tile + unpadded grid + one newline per row."""
    return image_token_count(size, pinpoints, tile, patches_per_side, base_features, None, True)


def pooled_side(patches_per_side: int) -> int:
    """Side of a video frame's feature grid after OneVision's 2x bilinear pooling (27 -> 14)."""
    return math.ceil(patches_per_side / 2)


def video_token_count(frames: int, patches_per_side: int) -> int:
    """`<video>` tokens of one video: every frame's pooled grid, then one newline."""
    return frames * pooled_side(patches_per_side) ** 2 + 1
