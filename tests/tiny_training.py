"""What the training tests share: the tiny tower and decoder they assemble, the plain colours their
pictures are painted in, and the JSONL file their records go to."""

from __future__ import annotations

import json
from pathlib import Path

VISION = "siglip:image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
TEXT = ("qwen2:hidden_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
        "intermediate_size=128,max_position_embeddings=1024")
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}


def write_records(folder: Path, lines: list[dict]) -> Path:
    """`lines` as folder/data.jsonl, one record a line; the path."""
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
