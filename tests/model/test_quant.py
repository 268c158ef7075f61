"""Weight-only int8 and int4: the packing, the native kernels against the dequantised product, and quantised models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import llavakit
from llavakit import native
from llavakit.engine.sampling import SamplingParams
from llavakit.errors import ConfigError
from llavakit.model.quant import (NATIVE_MAX_ROWS, QuantLinear, dequantize_tiles, dequantize_weight,
                                  quantize_tiles, quantize_weight)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_round_trip_error_is_bounded_by_the_step(bits):
    # Seeded: the mean bound is rounding's own expectation (a quarter step), which about one draw
    # in twelve exceeds by chance for int4, whose clamped extreme adds to it.
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # channels of very different sizes
    before = w.clone()
    q, s = quantize_weight(w, bits)
    assert torch.equal(w, before)  # the model's own weight (tied to the embeddings, maybe) is left alone
    assert s.dtype == torch.float16 and s.shape == (64, 3)
    if bits == 8:
        assert q.dtype == torch.int8 and q.shape == (64, 96) and int(q.abs().max()) == 127
    else:
        assert q.dtype == torch.uint8 and q.shape == (64, 48)  # two values a byte
    err = (dequantize_weight(q, s, bits, torch.float32) - w).abs().view(64, 3, 32)
    step = s.float().abs()[..., None]
    # int4 maps the group's largest magnitude to -8 (Q4_0): the other sign reaches +7 only, so a
    # value near the opposite extreme rounds by up to one step; everything else by half a step.
    bound = step / 2 if bits == 8 else step
    assert bool((err <= bound + 1e-6 * w.abs().max()).all())
    assert float(err.mean()) <= float(step.mean()) / 4 + 1e-6


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,group", [(37, 32), (64, 64), (8, 32)])
def test_tiles_hold_the_same_values_as_rows(bits, rows, group):
    w = torch.randn(rows, 128)
    q, s = quantize_weight(w, bits, group)
    tq, ts = quantize_tiles(w, bits, group)
    assert tq.shape[0] == -(-rows // 8) and ts.shape == (-(-rows // 8), 128 // group, 8)
    assert torch.equal(dequantize_weight(q, s, bits, torch.float32), dequantize_tiles(tq, ts, bits, rows, torch.float32))


@pytest.mark.skipif(native.library() is None, reason="no C compiler here")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,group", [(37, 32), (64, 64), (16, 128)])
def test_native_unpacking_equals_pytorchs(bits, rows, group, monkeypatch):
    w = torch.randn(rows, 256)
    tq, ts = quantize_tiles(w, bits, group)
    fast = dequantize_tiles(tq, ts, bits, rows, torch.bfloat16)
    monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(fast, dequantize_tiles(tq, ts, bits, rows, torch.bfloat16))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_dequantised_matmul_agree(bits, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 75, bias=True).to(dtype).requires_grad_(False)  # 75 outputs: a padded last tile
    q = QuantLinear.from_linear(linear, bits)
    exact = q.dequantized(torch.float32)
    x = torch.randn(3, NATIVE_MAX_ROWS + 5, 128, dtype=dtype)
    with torch.inference_mode():
        few = q(x[:1, :3])  # 3 rows: the native kernel (int8 activations in blocks of 32)
        many = q(x)  # 399 rows: dequantise, then matmul
    assert few.shape == (1, 3, 75) and few.dtype == dtype and many.shape == (3, NATIVE_MAX_ROWS + 5, 75)
    want = x.float() @ exact.T + linear.bias.float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert float((many.float() - want).abs().max()) <= tol * float(want.abs().max())
    if native.library() is not None:
        cos = torch.nn.functional.cosine_similarity(few.float().flatten(), want[:1, :3].flatten(), dim=0)
        assert float(cos) >= 0.9999  # activation blocks quantised to int8 cost less than 1e-4


@pytest.mark.parametrize("variant", ["-DQ256=1", "-DQSCALAR=1"])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_variants_agree_to_the_bit(bits, variant, tmp_path):
    """The 512-bit tile kernel (AVX512-VNNI CPUs) and the 256-bit one sum in another order, and the vector
    activation quantiser replaces a scalar loop, yet each gives the floats of the other."""
    import ctypes
    import shutil
    import subprocess

    lib = native.library()
    cc = shutil.which("cc") or shutil.which("gcc")
    if lib is None or cc is None:
        pytest.skip("no native library here")
    other_path = tmp_path / "other.so"
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", variant,
                    str(native.SOURCE), "-o", str(other_path), "-lm"], check=True, capture_output=True)
    other = ctypes.CDLL(str(other_path))
    torch.manual_seed(bits)
    for k, group in ((128, 32), (896, 128), (4864, 64)):
        w = torch.randn(75, k)
        q, scales = quantize_tiles(w, bits, group)
        x = torch.randn(2, k) * torch.rand(2, k) ** 4  # a wide spread within blocks
        x[0, 32:64] = 0  # a block of zeros: scale 0
        x[1, :32] *= 1e4
        for xs, code in ((x, 0), (x.to(torch.bfloat16), 1)):
            outs = []
            for library in (lib, other):
                y = torch.empty(2, 75)
                fn = library.lk_linear_int8 if bits == 8 else library.lk_linear_int4
                fn.argtypes = native._SIGNATURES["lk_linear_int8"]
                assert fn(xs.data_ptr(), code, q.data_ptr(), scales.data_ptr(), group, None, y.data_ptr(), 0, 2, 75,
                          k) == 0
                outs.append(y)
            assert torch.equal(outs[0], outs[1]), (k, group, code)


def test_without_the_native_library_every_product_is_dequantised(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40).requires_grad_(False)
    q = QuantLinear.from_linear(linear, 4)
    x = torch.randn(2, 64)
    monkeypatch.setattr(native, "_tried", True)
    monkeypatch.setattr(native, "_lib", None)
    with torch.inference_mode():
        got = q(x)
    assert torch.allclose(got, x @ q.dequantized().T + linear.bias, atol=1e-5)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


# int4 on these tiny models: their matrices are widened six-fold (reference.py) so that answers vary,
# which also amplifies rounding from layer to layer; a wrong layout or scale gives a cosine near 0.
# The int4 bar of 0.99 is measured on the 0.5B preset by bench/llamacpp.py.
@pytest.mark.parametrize("method,floor", [("int8", 0.999), ("int4", 0.9)])
@pytest.mark.parametrize("name", ["qwen2_siglip", "next_mistral", "onevision"])
def test_quantised_model_logits_and_greedy_answer(checkpoint, models, name, method, floor):
    vlm, _, _ = models(name)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 140, 3), dtype=np.uint8))
    q = llavakit.load(checkpoint(name), dtype=torch.float32, quantize=method)
    layer = q.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and isinstance(q.model.lm_head, QuantLinear)
    assert q.model.lm_head.bits == int(method[3:])
    assert q.dtype == torch.float32 and q.model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    conv = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What is it?"}]}]
    batch = vlm.prepare([conv])
    want, got = vlm.forward(batch), q.forward(batch)
    assert _cosine(want, got) >= floor
    # Only the head's last row: one row takes the native kernel (activations quantised in blocks of
    # 32), the full forward's head the dequantised matmul, so the two agree to that rounding.
    last = q.forward(batch, last_only=True)
    assert last.shape == (1, 1, got.shape[-1]) and _cosine(last[:, 0], got[:, -1]) >= 0.9999
    # Decode steps run the native kernels on the KV cache; a full forward over the answer runs the
    # dequantised weights. Every step's logits stay as close to the unquantised model's.
    out = q.generate([conv], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    n = batch.input_ids.shape[1]
    ids = torch.cat([batch.input_ids, torch.tensor([out.token_ids[:-1]])], dim=1)
    forced = dataclasses.replace(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert _cosine(q.forward(forced)[0, n - 1:], vlm.forward(forced)[0, n - 1:]) >= floor


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_saved_quantised_checkpoint_loads_quantised_with_identical_logits(checkpoint, tmp_path, method):
    q = llavakit.load(checkpoint("onevision_cap4_list"), dtype=torch.bfloat16, quantize=method)
    out = q.save_pretrained(tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "llavakit"
    assert config["quantization_config"]["bits"] == int(method[3:]) and config["quantization_config"]["group_size"] == 32
    again = llavakit.load(out)  # quantised as stored, in the saved dtype
    assert isinstance(again.model.lm_head, QuantLinear) and again.dtype == torch.bfloat16
    conv = [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    batch = q.prepare([conv])
    assert torch.equal(q.forward(batch), again.forward(batch))
    other = "int4" if method == "int8" else "int8"
    with pytest.raises(ConfigError, match=f"saved quantised as {method}; load it with quantize='{method}'"):
        llavakit.load(out, quantize=other)


def test_foreign_quantisation_formats_are_refused(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(checkpoint("onevision"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantised with 'gptq', which llavakit cannot read"):
        llavakit.load(folder)


def test_unknown_quantization_is_refused(checkpoint):
    with pytest.raises(ConfigError, match="unknown quantization 'int3'; choose one of none, int8, int4"):
        llavakit.load(checkpoint("onevision"), quantize="int3")


def test_quantising_a_loaded_model_equals_quantising_while_loading(checkpoint):
    from llavakit.model.quant import quantize_model

    path = checkpoint("qwen2_tied")
    loaded = llavakit.load(path, dtype=torch.float32, quantize="int4")
    later = llavakit.load(path, dtype=torch.float32)
    quantize_model(later.model, "int4")
    assert torch.equal(later.model.lm_head.qweight, loaded.model.lm_head.qweight)  # the tied head, quantised once more
    batch = loaded.prepare([[{"role": "user", "content": "Hello there."}]])
    assert torch.equal(later.forward(batch), loaded.forward(batch))


def test_a_full_quantised_batch_decodes_each_row_as_alone(checkpoint):
    """Twelve requests decode together (more rows than the bfloat16 kernels take): each row's tokens
    are those it gets alone, since activations are quantised row by row."""
    q = llavakit.load(checkpoint("qwen2_tied"), dtype=torch.bfloat16, quantize="int4")
    convs = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(12)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = [o.token_ids for o in q.generate(convs, params)]
    alone = [q.generate([c], params)[0].token_ids for c in convs]
    assert together == alone
