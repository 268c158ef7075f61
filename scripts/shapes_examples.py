"""A grid of free-world pictures with a model's answers, as one PNG (for the README).

    python scripts/shapes_examples.py --model DIR|llava-shapes --out docs/shapes-examples.png [--n 12] [--seed 3]

Draws `n` pictures of the free shapes world (llavakit.train.scenes: every size and aspect), asks
each one question of a different type in turn (describe, count, colour, position, where), answers
greedily with the model, and lays the pictures out as thumbnails with the question, the answer and
whether it is right (scored by meaning, llavakit/train/scoring.py) under each.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB = 240  # thumbnail box, px
CAPTION = 78  # px of text under each thumbnail
COLS = 4


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def examples(n: int, seed: int) -> list[tuple[Image.Image, str, str, str]]:
    """(picture, type, question, reference answer) for `n` pictures, the picture types in turn."""
    from llavakit.train import scene_questions as Q
    from llavakit.train import scenes

    out = []
    rng = random.Random(f"examples/{seed}")
    while len(out) < n:
        qtype = Q.PICTURE_TYPES[len(out) % len(Q.PICTURE_TYPES)]
        image, scene = scenes.sample_picture(rng)
        asks = [a for a in Q.asks_for(scene) if a.qtype == qtype]
        if not asks:
            continue
        ask = rng.choice(asks)
        out.append((image, qtype, Q.question(rng, ask, False), ask.answer))
    return out


def main(argv: list[str] | None = None) -> int:
    """Answer the examples with the model and write the grid."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava-shapes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)

    import llavakit
    from llavakit.train.scoring import is_right

    vlm = llavakit.load(args.model)
    items = examples(args.n, args.seed)
    params = vlm.sampling_params(max_new_tokens=48, temperature=0.0)
    convs = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
             for image, _, question, _ in items]
    answers = [o.text.strip() for o in vlm.generate(convs, params)]
    rows = -(-len(items) // COLS)
    sheet = Image.new("RGB", (COLS * (THUMB + 16) + 16, rows * (THUMB + CAPTION + 16) + 16), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font, bold = _font(13), _font(14)
    right = 0
    for k, ((image, qtype, question, reference), answer) in enumerate(zip(items, answers)):
        ok = is_right(qtype, answer, reference)
        right += ok
        x, y = 16 + (k % COLS) * (THUMB + 16), 16 + (k // COLS) * (THUMB + CAPTION + 16)
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        px, py = x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2
        sheet.paste(thumb, (px, py))
        draw.rectangle((px - 1, py - 1, px + thumb.width, py + thumb.height), outline=(150, 150, 150))  # white on white
        w, h = image.size
        draw.text((x, y + THUMB - 14), f"{w}x{h}", fill=(120, 120, 120), font=font)
        ty = y + THUMB + 4
        for line in _wrap(draw, question, font, THUMB)[:2]:
            draw.text((x, ty), line, fill=(60, 60, 60), font=font)
            ty += 16
        for line in _wrap(draw, answer, bold, THUMB)[:2]:
            draw.text((x, ty), line, fill=(20, 120, 40) if ok else (190, 30, 30), font=bold)
            ty += 17
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"{args.out}: {right}/{len(items)} right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
