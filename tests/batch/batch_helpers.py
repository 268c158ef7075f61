"""Inputs and output reading shared by the batch tests."""

import json

import numpy as np
from PIL import Image

BROKEN = ("truncated.png", "noise.jpg", "empty.png")


def make_folder(root, n=47):
    """n small PNGs of three sizes (every other one in a subfolder) and three broken files."""
    rs = np.random.RandomState(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        h, w = [(32, 32), (48, 64), (80, 40)][i % 3]
        name = f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.png"
        Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")).save(root / name)
    data = (root / "img00.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "noise.jpg").write_bytes(rs.bytes(500))
    (root / "empty.png").write_bytes(b"")
    return root


def read(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "an id appears twice"
    return by_id
