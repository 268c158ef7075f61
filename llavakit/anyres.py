"""Image geometry shared by the processor (how many `<image>` tokens) and the model (how many features).

Pure Python on ints, torch-free, so the two sides can never round differently.
"""

from __future__ import annotations


def tile_feature_count(image_size: int, patch_size: int, has_class_token: bool, strategy: str) -> int:
    """Features one square tower input yields after selection.

    CLIP-L/14 at 336 px: 24*24 patches + 1 class token, minus the class token for "default" = 576.
    """
    n = (image_size // patch_size) ** 2 + (1 if has_class_token else 0)
    return n - 1 if strategy == "default" else n
