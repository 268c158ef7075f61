"""Draw the example media in examples/ (the README's questions are about them): shapes-world scenes
chosen by hand, drawn by the same code as the training data.

    python scripts/make_examples.py [OUT_DIR]      (default: examples/)
"""

from __future__ import annotations

import sys
from pathlib import Path

from llavakit.train.shapes import FRAMES, Scene, Shape, render_motion, render_scene

SIZE, CELL, SIDE = 96, 32, 24


def in_cell(color: str, kind: str, row: int, col: int) -> Shape:
    """A shape of side SIDE centred in grid cell (row, col)."""
    x0, y0 = col * CELL + (CELL - SIDE) // 2, row * CELL + (CELL - SIDE) // 2
    return Shape(color, kind, (x0, y0, x0 + SIDE, y0 + SIDE))


def main(out: Path) -> None:
    """Write picture.png, two-shapes.png and clip.mkv under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    picture = Scene("white", (in_cell("red", "circle", 0, 0), in_cell("green", "triangle", 0, 2),
                              in_cell("blue", "square", 2, 1)))
    render_scene(picture, SIZE, noise_seed=1).save(out / "picture.png")
    two = Scene("beige", (in_cell("purple", "triangle", 1, 0), in_cell("orange", "circle", 1, 2)))
    render_scene(two, SIZE, noise_seed=2).save(out / "two-shapes.png")
    # A yellow square crossing the middle row from the left cell into the right one, 58 px in all
    # (training clips travel 44 to 62 px).
    track = []
    for t in range(FRAMES):
        x0 = 4 + round(58 * t / (FRAMES - 1))
        track.append(Shape("yellow", "square", (x0, CELL + 4, x0 + SIDE, CELL + 4 + SIDE)))
    render_motion(out / "clip.mkv", "black", track, SIZE, noise_seed=3)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "examples")
