"""Weight-only int8 and int4 quantisation of the language model (`--quantize int8|int4`).

Decoding one token reads every decoder weight once, so on a CPU its speed is set by memory
bandwidth: int8 weights are about half the bytes of bfloat16 ones, int4 about a quarter. Weights
are cut into groups of GROUP_SIZE values along each row, with one float16 scale per group:

- int8: q = round(w / s), s = max|w| / 127 over the group (symmetric, q in [-127, 127]);
- int4: s = m / -8 where m is the group's value of largest magnitude, q = round(w / s) + 8 clamped
  to [0, 15], two values per byte (in each block of 32, byte j holds value j in its low nibble and
  value j + 16 in its high one): the block layout CPU inference engines call Q4_0.

Per phase: a few rows at a time (decode) run llavakit's native kernels, which quantise the
activations to int8 in blocks of 32 and take exact integer dot products against the stored
blocks; many rows at once (prefill) dequantise the weight once (natively: one threaded pass) and
run the ordinary matmul, which is compute-bound. Without the native library every product takes
the dequantised route, unpacked by PyTorch operators.

The vision tower, the projector and the input embeddings stay unquantised (they run once per image,
or read one row per token).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import native
from ..errors import ConfigError
from .linear import bias32_ptr, dense, dtype_code, kernel_for, native_out, widens_product

QUANTIZE_CHOICES = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
GROUP_SIZE = 32  # values per scale; the kernels need a multiple of 32
QUANT_METHOD = "llavakit"  # config.json's quantization_config.quant_method for checkpoints saved quantised

# Rows up to which products run natively. A decode step of a full batch is far cheaper there than
# dequantising: the 0.5B preset's output head, 16 rows, 2-core AVX2 CPU: 0.11 s (int8) / 0.07 s
# (int4) against 0.89 / 0.95 s; 64 rows: 0.44 / 0.53 against 1.0 / 1.3 s. Prefill stays on the
# dequantised matmul: the kernels' 1.5k-row products took 25.6 s (int4) and 30.3 s (int8) for the
# whole decoder against 23-28 s for float32 matmuls.
NATIVE_MAX_ROWS = 128
_CHUNK_VALUES = 2**21  # weights quantised per pass (an 8 MB float32 copy)
_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, float16 scales (N, K / group_size)) of a (N, K) weight, rows in order; the
    weight is left alone. int8: an int8 (N, K) tensor. int4: a uint8 (N, K / 2) tensor in the Q4_0
    nibble layout. This is the interchange form (GGUF blocks are these bytes); layers hold tiles."""
    n, k = weight.shape
    qweight = torch.empty(n, k if bits == 8 else k // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=torch.float16)
    rows = max(8, _CHUNK_VALUES // k // 8 * 8)  # a chunk at a time: the float32 copy stays small
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        q, s = _quantize_rows(weight[start:stop], bits, group_size)
        scales[start:stop] = s
        if bits == 8:
            qweight[start:stop] = q.view(stop - start, k)
        else:
            q = q.view(stop - start, k // 32, 32)
            qweight[start:stop] = (q[..., :16] | (q[..., 16:] << 4)).view(stop - start, k // 2)
    return qweight, scales


def _quantize_rows(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (R, K): int8 in [-127, 127], or uint8 q + 8 in [0, 15] for int4; float16 scales (R, K / G))."""
    r, k = weight.shape
    g = weight.detach().to(torch.float32, copy=True).view(r, k // group_size, group_size)  # (R, groups, G)
    if bits == 8:
        scales = (g.abs().amax(-1) / 127).half()
    else:
        peak = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed value of largest magnitude
        scales = (peak / -8).half()
    s = scales.float()
    inverse = torch.where(s != 0, 1 / s, torch.zeros((), dtype=torch.float32))[..., None]
    if bits == 8:
        return g.mul_(inverse).round_().clamp_(-127, 127).to(torch.int8).view(r, k), scales
    return g.mul_(inverse).round_().add_(8).clamp_(0, 15).to(torch.uint8).view(r, k), scales


# Layers store their weights in tiles of 8 rows, the layout the native kernels read in one pass
# (llavakit/native/kernels.c): per tile and block of 32 values, int8 as (8 chunks of 4 values, 8
# rows, 4) and int4 as (4 byte groups, 8 rows, 4 bytes) with chunk j in the low nibbles and chunk
# j + 4 in the high ones; scales as (tiles, groups, 8 rows). Rows are padded to a multiple of 8.
TILE = 8


def quantize_tiles(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiled weight (tiles, K * 8 or K * 4), tiled float16 scales (tiles, K / G, 8)) of a (N, K) weight."""
    n, k = weight.shape
    tiles = -(-n // TILE)
    qweight = torch.empty(tiles, k * TILE if bits == 8 else k * TILE // 2,
                          dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.zeros(tiles, k // group_size, TILE, dtype=torch.float16)
    step = max(1, _CHUNK_VALUES // (k * TILE))  # tiles per pass
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        rows = weight[t0 * TILE: t1 * TILE]
        values, s = _quantize_rows(rows, bits, group_size)
        if rows.shape[0] < (t1 - t0) * TILE:  # the last tile's missing rows: zero weights, zero scales
            pad = (t1 - t0) * TILE - rows.shape[0]
            values = torch.cat([values, values.new_full((pad, k), 0 if bits == 8 else 8)])
            s = torch.cat([s, s.new_zeros(pad, s.shape[1])])
        qweight[t0:t1] = _tile_values(values, bits)
        scales[t0:t1] = s.view(t1 - t0, TILE, -1).transpose(1, 2)
    return qweight, scales


def _tile_values(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, K) values -> (rows / 8, K * 8 or K * 4) tile bytes."""
    rows, k = values.shape
    v = values.view(rows // TILE, TILE, k // 32, 8, 4).permute(0, 2, 3, 1, 4)  # (tiles, blocks, chunks, rows, 4)
    if bits == 8:
        return v.reshape(rows // TILE, -1)
    packed = v[:, :, :4] | (v[:, :, 4:] << 4)  # (tiles, blocks, 4 byte groups, rows, 4)
    return packed.reshape(rows // TILE, -1)


def dequantize_tiles(qweight: torch.Tensor, scales: torch.Tensor, bits: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The (n, K) weight in `dtype` that `quantize_tiles` packed."""
    tiles, groups, _ = scales.shape
    k = qweight.shape[1] // (TILE if bits == 8 else TILE // 2)
    lib = native.library() if qweight.device.type == "cpu" else None
    if lib is not None and qweight.is_contiguous() and scales.is_contiguous():
        out = torch.empty(n, k, dtype=torch.float32)  # one pass, in threads: the unpacking below takes five
        lib.lk_dequant_tiles(bits, qweight.data_ptr(), scales.data_ptr(), k // groups, n, k, out.data_ptr())
        return out.to(dtype)
    if bits == 8:
        v = qweight.view(tiles, k // 32, 8, TILE, 4).float()
    else:
        b = qweight.view(tiles, k // 32, 4, TILE, 4)
        v = torch.cat([b & 15, b >> 4], dim=2).float().sub_(8)  # (tiles, blocks, chunks, rows, 4)
    v = v.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, groups, -1)  # (rows, groups, G)
    s = scales.transpose(1, 2).reshape(tiles * TILE, groups, 1).float()
    return v.mul_(s).view(tiles * TILE, k)[:n].to(dtype)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` that `quantize_weight` packed."""
    n, groups = scales.shape
    if bits == 8:
        q = qweight.view(n, groups, -1).float()
    else:
        blocks = qweight.view(n, -1, 16)  # (N, K / 32, 16)
        q = torch.cat([blocks & 15, blocks >> 4], dim=-1).view(n, groups, -1).float().sub_(8)
    return q.mul_(scales.float()[..., None]).view(n, -1).to(dtype)


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as int8 or int4 groups with float16 scales, in tiles of 8 rows.

    Buffers (saved in checkpoints): `qweight` (tiles, K * 8) int8 or (tiles, K * 4) uint8, `scales`
    (tiles, K / group_size, 8) float16 and, when the layer has one, `bias` in the compute dtype.
    Outputs are in the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool, dtype: torch.dtype,
                 group_size: int = GROUP_SIZE, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.compute_dtype = dtype
        tiles = -(-out_features // TILE)
        width = in_features * TILE if bits == 8 else in_features * TILE // 2
        self.register_buffer("qweight", torch.empty(tiles, width, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(tiles, in_features // group_size, TILE, dtype=torch.float16,
                                                   device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self._bias32 = (-1, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantLinear:
        """Quantise `linear`'s weight; the bias and the compute dtype are kept."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, w.dtype, device=w.device)
        new.set_weight(w, linear.bias)
        return new

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantise `weight` (out_features, in_features) into this layer's buffers."""
        self.qweight, self.scales = quantize_tiles(weight, self.bits, self.group_size)
        if bias is not None:
            self.bias = bias.detach().to(self.compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the compute dtype), (out_features, in_features)."""
        return dequantize_tiles(self.qweight, self.scales, self.bits, self.out_features, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = kernel_for(x, self.in_features, 32, NATIVE_MAX_ROWS)
        if lib is None:
            x = x.to(self.compute_dtype)
            # Where dense() computes bfloat16 through float32, dequantise straight to float32.
            return dense(x, self.dequantized(torch.float32 if widens_product(x) else None), self.bias)
        rows, y, m = native_out(x, self.out_features)
        kernel = lib.lk_linear_int8 if self.bits == 8 else lib.lk_linear_int4
        kernel(rows.data_ptr(), dtype_code(x.dtype), self.qweight.data_ptr(), self.scales.data_ptr(), self.group_size,
               bias32_ptr(self), y.data_ptr(), dtype_code(x.dtype), m, self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group_size}"


def check_method(method: str) -> None:
    """Raise ConfigError unless `method` is one of QUANTIZE_CHOICES."""
    if method not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZE_CHOICES)}.")


def quantized_names(model: nn.Module) -> list[str]:
    """Dotted names of the linear layers `quantize` rewrites: the decoder's and the output head."""
    names = []
    for i, layer in enumerate(model.language_model.layers):
        for part in ("self_attn", "mlp"):
            for name in _DECODER_LINEARS:
                if isinstance(getattr(getattr(layer, part), name, None), nn.Linear):
                    names.append(f"language_model.layers.{i}.{part}.{name}")
    return names + ["lm_head"]


def _swap_linears(model: nn.Module, group_size: int, make) -> list[str]:
    """Replace each layer `quantized_names` lists by make(linear); returns the names.

    Raises ConfigError, before anything is swapped, when a layer's input width is not a multiple
    of the group size.
    """
    names = quantized_names(model)
    for name in names:
        width = model.get_submodule(name).in_features
        if width % group_size:
            raise ConfigError(f"{name} has {width} inputs, not a multiple of the quantisation group size "
                              f"{group_size}; load this checkpoint without quantize.")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(getattr(parent, attr)))
    return names


def replace_with_quantized(model: nn.Module, method: str, dtype: torch.dtype,
                           group_size: int = GROUP_SIZE) -> list[str]:
    """Swap the layers `quantized_names` lists for empty QuantLinears computing in `dtype`, on the
    same device; returns the names. For a model built on the meta device: the caller fills
    qweight/scales/bias (see weights.py)."""
    return _swap_linears(model, group_size, lambda linear: QuantLinear(
        linear.in_features, linear.out_features, BITS[method], linear.bias is not None, dtype, group_size,
        device=linear.weight.device))


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantise an already-loaded `model`'s decoder linear layers and output head in place; returns `model`.

    method: "none" (a no-op), "int8" or "int4". `load(quantize=...)` quantises tensor by tensor while
    reading instead. Raises ConfigError on an unknown method or a width the groups do not divide.
    """
    check_method(method)
    if method != "none":
        _swap_linears(model, GROUP_SIZE, lambda linear: QuantLinear.from_linear(linear, BITS[method]))
    return model


def loading_converter(model: nn.Module, method: str, dtype: torch.dtype, stored_group_size: int | None = None,
                      cached: bool = False):
    """Prepare `model` (built on the meta device) to be filled quantised; returns weights.py's converter.

    Rewrites the layers to quantise as empty QuantLinears and returns the function that turns each
    `X.weight` read from the checkpoint into `X.qweight` and `X.scales` as it arrives, so that no
    unquantised copy of the decoder is ever held. For a tied output head the input embeddings are
    quantised a second time as `lm_head`. stored_group_size: the checkpoint was saved quantised with
    this group size; its qweight/scales load as stored. cached: the quantised tensors are read from
    a second source (llavakit/model/quant_cache.py), as stored, and the checkpoint's `X.weight` is
    skipped. Returns None for method "none".
    """
    check_method(method)
    if method == "none":
        return None
    bits = BITS[method]
    group = stored_group_size or GROUP_SIZE
    names = set(replace_with_quantized(model, method, dtype, group))
    tied_embeddings = "language_model.embed_tokens.weight" if model.cfg.tie_word_embeddings else None

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        prefix, _, leaf = name.rpartition(".")
        if cached and leaf == "weight" and prefix in names:
            return {}  # its quantised form comes from the cache; its file pages were never read
        if stored_group_size is not None or cached:
            return {name: tensor} if leaf == "scales" and prefix in names else None  # float16 as stored
        if leaf == "weight" and prefix in names:
            q, s = quantize_tiles(tensor, bits, group)
            return {f"{prefix}.qweight": q, f"{prefix}.scales": s}
        if name == tied_embeddings and "lm_head" in names:
            q, s = quantize_tiles(tensor, bits, group)
            return {name: tensor.to(dtype), "lm_head.qweight": q, "lm_head.scales": s}
        return None

    return convert


def quantization_config(model: nn.Module) -> dict | None:
    """config.json's `quantization_config` for a model with QuantLinear layers, else None."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    return {"quant_method": QUANT_METHOD, "bits": layers[0].bits, "group_size": layers[0].group_size,
            "layout": f"tiles of {TILE} rows", "modules": "language_model.layers.*.{self_attn,mlp}.*_proj, lm_head"}


def stored_quantization(raw_config: dict) -> tuple[str, int] | None:
    """(method, group size) of a checkpoint saved quantised by llavakit, else None.

    Raises ConfigError for quantisation formats llavakit does not read (GPTQ, AWQ, bitsandbytes...).
    """
    q = raw_config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        kind = q.get("quant_method") if isinstance(q, dict) else q
        raise ConfigError(f"this checkpoint is quantised with {kind!r}, which llavakit cannot read; use the "
                          "unquantised checkpoint and load it with quantize='int8' or 'int4'.")
    bits, group = q.get("bits"), q.get("group_size")
    if bits not in (4, 8) or not isinstance(group, int) or group <= 0 or group % 32:
        raise ConfigError(f"quantization_config {q} is not valid: bits must be 4 or 8 and group_size a multiple of 32.")
    return f"int{bits}", group
