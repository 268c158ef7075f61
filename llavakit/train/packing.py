"""Conversations about the same media, trained as one sequence (`train --share-media`).

A picture of the shapes world comes with two or three conversations. Trained apart, each one pays
for the picture: its preprocessing, the tower, and its tokens (about 150 of 200) in every decoder
layer. Packed, the shared prefix (system prompt, the picture's tokens) comes once and each
conversation follows it as a segment that sees the prefix and itself only, at the positions it
would have alone, so the loss is the one of the separate sequences:

    tokens     [system, <image> x N, ...][rest of conversation 1][rest of conversation 2]
    segments    0 ...                     1 ...                   2 ...
    positions   0 .. P-1                  P .. P+n1-1             P .. P+n2-1

The prefix must hold every media token and no target, so a later segment starts with a token
that is not a target (the one before it in the row, another conversation's last, predicts nothing
that counts). Conversations that do not meet this stay apart. Records come together in a
micro-batch because `media_groups` makes the training order keep each medium's records adjacent.
"""

from __future__ import annotations

import json

from .data import IGNORE, Example, Record

MEDIA_TYPES = ("image", "video")


def media_key(rec: Record) -> str | None:
    """What a record shows, as a string equal for records of the same media in the same order; None
    for a text-only record."""
    parts = [json.dumps(part, sort_keys=True, default=str)
             for message in rec.messages if isinstance(message.get("content"), list)
             for part in message["content"] if isinstance(part, dict) and part.get("type") in MEDIA_TYPES]
    return "\n".join(parts) if parts else None


def media_groups(keys: list[str | None]) -> list[list[int]]:
    """Record indices grouped by media key, in order of first appearance; a text-only record alone."""
    groups: dict[str | int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key if key is not None else i, []).append(i)
    return list(groups.values())


def pack_batch(examples: list[Example], keys: list[str | None], media_ids: set[int]) -> list[Example]:
    """A micro-batch's examples with those of equal media key packed (`pack`), in first-seen order."""
    return [packed for group in media_groups(keys) for packed in pack([examples[i] for i in group], media_ids)]


def pack(members: list[Example], media_ids: set[int]) -> list[Example]:
    """One Example for conversations that share a prefix holding all their media tokens and no
    target; the members unchanged when they do not (or there is one)."""
    if len(members) < 2:
        return members
    first = members[0].input_ids
    common = min(len(m.input_ids) for m in members)
    for m in members[1:]:
        same = next((j for j, (a, b) in enumerate(zip(first, m.input_ids)) if a != b), len(m.input_ids))
        common = min(common, same)
    # ids[p] begins each segment, so labels[:p + 1] must hold no target
    p = min([common] + [next((j for j, v in enumerate(m.labels) if v != IGNORE), len(m.labels)) - 1
                          for m in members])
    if p < 1 or any(t in media_ids for m in members for t in m.input_ids[p:]):
        return members
    ids, labels, positions, segments = list(first[:p]), list(members[0].labels[:p]), list(range(p)), [0] * p
    for k, m in enumerate(members, start=1):
        n = len(m.input_ids)
        ids += m.input_ids[p:]
        labels += m.labels[p:]
        positions += range(p, n)
        segments += [k] * (n - p)
    head = members[0]
    return [Example(ids, labels, head.pixel_values, head.image_layouts, head.video_pixels, head.video_layouts,
                    positions=positions, segments=segments)]
