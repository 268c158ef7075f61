"""How a model splits over N tensor-parallel ranks, decided from its config alone: no weight is read.

Megatron's layout, per decoder layer (rank r of N; H query heads, Hkv key/value heads, I MLP rows):

    q_proj, k_proj, v_proj   rows      rank r computes whole heads: H/N query heads, Hkv/N kv heads
    o_proj                   columns   each rank's partial sum; one all-reduce adds them (then the bias)
    gate_proj, up_proj       rows      I/N rows each
    down_proj                columns   one all-reduce
    embed_tokens, lm_head    vocabulary rows, V padded up to a multiple of N (the padding rows are zero)

With fewer kv heads than ranks (Qwen2-0.5B: 14 heads, 2 kv heads), each kv head is repeated on the
N/Hkv ranks whose query heads read it. The vision tower and the projector split the same way when
their heads, their MLP and the decoder width divide by N; otherwise they stay whole on rank 0, the
only rank that needs their output (the others would repeat its work). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LlavaConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """The split of one model over `size` ranks: widths per rank and index ranges per rank."""

    size: int  # N, the tensor-parallel size
    head_dim: int
    heads: int  # query heads per rank
    kv_heads: int  # key/value heads per rank (1 when the model has fewer than N: repeated)
    total_kv_heads: int
    intermediate: int  # MLP rows per rank
    vocab: int  # the checkpoint's vocabulary size
    vocab_rows: int  # embedding / output-head rows per rank: ceil(vocab / N)
    vision_split: bool  # tower and projector split over the ranks; else whole on rank 0 only
    vision_head_dim: int
    vision_heads: int  # tower heads per rank (when split)
    vision_intermediate: int  # tower MLP rows per rank (when split)
    projector_rows: int  # projector hidden rows per rank (when split)

    def head_range(self, rank: int) -> tuple[int, int]:
        """Query-head rows [start, stop) of q_proj (and columns of o_proj) that `rank` holds."""
        return rank * self.heads * self.head_dim, (rank + 1) * self.heads * self.head_dim

    def kv_range(self, rank: int) -> tuple[int, int]:
        """Key/value rows [start, stop) of k_proj and v_proj that `rank` holds.

        Query head h reads kv head h // (H / Hkv); with Hkv < N, the first query head of rank r is
        r·H/N, so its kv head is r·Hkv // N, shared by N/Hkv consecutive ranks.
        """
        first = rank * self.kv_heads if self.total_kv_heads >= self.size else rank * self.total_kv_heads // self.size
        return first * self.head_dim, (first + self.kv_heads) * self.head_dim

    def mlp_range(self, rank: int) -> tuple[int, int]:
        """Rows [start, stop) of gate_proj/up_proj (and columns of down_proj) that `rank` holds."""
        return rank * self.intermediate, (rank + 1) * self.intermediate

    def vocab_range(self, rank: int) -> tuple[int, int]:
        """Vocabulary rows [start, stop) of the embedding and the head that `rank` holds; stop may pass
        `vocab` on the last ranks (padding rows, zero)."""
        return rank * self.vocab_rows, (rank + 1) * self.vocab_rows

    def vision_head_range(self, rank: int) -> tuple[int, int]:
        """Rows of the tower's q/k/v_proj (and columns of out_proj) that `rank` holds."""
        width = self.vision_heads * self.vision_head_dim
        return rank * width, (rank + 1) * width

    def vision_mlp_range(self, rank: int) -> tuple[int, int]:
        """Rows of the tower's fc1 (and columns of fc2) that `rank` holds."""
        return rank * self.vision_intermediate, (rank + 1) * self.vision_intermediate

    def projector_range(self, rank: int) -> tuple[int, int]:
        """Rows of the projector's linear_1 (and columns of linear_2) that `rank` holds."""
        return rank * self.projector_rows, (rank + 1) * self.projector_rows


def _sizes_that_fit(heads: int, kv_heads: int, intermediate: int, limit: int) -> list[int]:
    return [n for n in range(1, limit + 1)
            if heads % n == 0 and intermediate % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


def make_plan(cfg: LlavaConfig, size: int, devices: int, device_kind: str) -> Plan:
    """The split of `cfg` over `size` ranks, or ConfigError naming N and the heads when there is none.

    devices: how many devices of `device_kind` ("CPU cores", "GPUs") there are for the ranks; a
    size above it is refused too, since ranks sharing a device only wait for each other.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {size!r}.")
    t, v = cfg.text, cfg.vision
    hint = "sizes that fit this model: " + ", ".join(
        map(str, _sizes_that_fit(t.num_heads, t.num_kv_heads, t.intermediate_size, t.num_heads)))
    if t.num_heads % size:
        raise ConfigError(f"tensor_parallel_size {size} does not divide the decoder's {t.num_heads} attention "
                          f"heads ({t.num_kv_heads} key/value heads); {hint}.")
    if t.num_kv_heads % size and size % t.num_kv_heads:
        raise ConfigError(f"tensor_parallel_size {size} and the decoder's {t.num_kv_heads} key/value heads "
                          f"({t.num_heads} attention heads) do not divide one another, so the key/value heads "
                          f"cannot be split or repeated evenly; {hint}.")
    if t.intermediate_size % size:
        raise ConfigError(f"tensor_parallel_size {size} does not divide the decoder's MLP width "
                          f"{t.intermediate_size} ({t.num_heads} attention heads); {hint}.")
    if size > devices:
        raise ConfigError(f"tensor_parallel_size {size} needs {size} {device_kind}, and there are {devices}; "
                          f"use at most {devices} ({t.num_heads} attention heads; {hint}).")
    vision_split = v.num_heads % size == 0 and v.intermediate_size % size == 0 and t.hidden_size % size == 0
    return Plan(
        size=size, head_dim=t.head_dim, heads=t.num_heads // size, kv_heads=max(1, t.num_kv_heads // size),
        total_kv_heads=t.num_kv_heads, intermediate=t.intermediate_size // size, vocab=t.vocab_size,
        vocab_rows=-(-t.vocab_size // size), vision_split=vision_split,
        vision_head_dim=v.hidden_size // v.num_heads, vision_heads=v.num_heads // size if vision_split else v.num_heads,
        vision_intermediate=v.intermediate_size // size if vision_split else v.intermediate_size,
        projector_rows=t.hidden_size // size if vision_split else t.hidden_size,
    )
