"""The native CPU decode kernels: built on first use, equal to the PyTorch path, and never required."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import llavakit
from llavakit import native
from llavakit.engine.sampling import SamplingParams
from llavakit.model.fused_decode import FusedDecoder
from llavakit.model.linear import NATIVE_MAX_ROWS, FastLinear

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


@needs_native
@pytest.mark.parametrize("rows", [1, 3, NATIVE_MAX_ROWS])
@pytest.mark.parametrize("k", [96, 80, 128, 112])  # AVX512-BF16 path: blocks of 64, then 32, then a half block of 16
def test_bfloat16_kernel_matches_the_float32_product(rows, k):
    torch.manual_seed(0)
    linear = FastLinear.wrap(nn.Linear(k, 53).to(torch.bfloat16).requires_grad_(False))  # 53: a ragged last tile
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = linear(x)
    want = x.float() @ linear.weight.float().T + linear.bias.float()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 53)
    # float32 sums in another order, rounded once to bfloat16: at most one bfloat16 step from the exact value
    assert bool(((got.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all())


@needs_native
def test_bfloat16_weights_keep_float32_activations_exact():
    from llavakit import native as lib_module

    torch.manual_seed(0)
    w = torch.randn(24, 80).to(torch.bfloat16)
    x = torch.randn(2, 80) * 1e-3 + 1.0  # values bfloat16 cannot hold: a kernel rounding x would miss by ~1e-3
    y = torch.empty(2, 24)
    lib = lib_module.library()
    assert lib.lk_linear_bf16(x.data_ptr(), 0, w.view(torch.int16).data_ptr(), None, y.data_ptr(), 0, 2, 24, 80) == 0
    want = x.double() @ w.double().T
    assert float((y.double() - want).abs().max()) <= 1e-4 * float(want.abs().max())


def _answers(vlm, conv, n=12):
    return vlm.generate([conv, conv[:1]], SamplingParams(max_new_tokens=n, ignore_eos=True))


@needs_native
@pytest.mark.parametrize("name", ["qwen2", "mistral", "llama", "next_qwen2_tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_gives_the_tokens_of_the_pytorch_step(checkpoint, name, dtype):
    """The whole single-token step in one native call against text.py's layers, batched (two rows)."""
    vlm = llavakit.load(checkpoint(name), dtype=dtype)
    assert isinstance(vlm.model.language_model.fused_decode, FusedDecoder)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Describe a cat on a mat in detail."}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And the ball?"}]
    fused = _answers(vlm, conv)
    calls = []
    step = vlm.model.language_model.fused_decode
    vlm.model.language_model.fused_decode = lambda *a: calls.append(1) or None  # declines: the PyTorch layers run
    plain = _answers(vlm, conv)
    vlm.model.language_model.fused_decode = step
    assert calls  # the PyTorch path really ran
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]


@needs_native
def test_fused_step_logits_equal_the_pytorch_step(checkpoint):
    """Mistral's sliding window, grouped key/value heads and a prompt longer than the window."""
    vlm = llavakit.load(checkpoint("mistral"), dtype=torch.float32)
    model, engine = vlm.model, vlm.engine
    captured = {"fused": [], "plain": []}
    hook_into = {"on": "fused"}
    model.lm_head.register_forward_hook(lambda _m, _i, out: captured[hook_into["on"]].append(out.detach().clone()))
    conv = [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog " * 3}]}]
    vlm.generate([conv], SamplingParams(max_new_tokens=10, ignore_eos=True))
    engine.clear_caches()
    step, hook_into["on"] = model.language_model.fused_decode, "plain"
    model.language_model.fused_decode = None
    vlm.generate([conv], SamplingParams(max_new_tokens=10, ignore_eos=True))
    model.language_model.fused_decode = step
    assert len(captured["fused"]) == len(captured["plain"]) == 10  # the hooked head is never skipped
    for a, b in zip(captured["fused"], captured["plain"]):
        assert float((a - b).abs().max()) <= 1e-4


@needs_native
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_logits_equal_the_separate_head(checkpoint, dtype, quantize, monkeypatch):
    """The output head run inside the native step gives the logits of the step and the head run apart."""
    if quantize != "none" and dtype == torch.float32:
        pytest.skip("quantised models compute in bfloat16 here")
    vlm = llavakit.load(checkpoint("next_qwen2_tied"), dtype=dtype, quantize=quantize)
    model, engine = vlm.model, vlm.engine
    fused_logits, apart = [], []
    real = FusedDecoder.logits
    monkeypatch.setattr(FusedDecoder, "logits",
                        lambda self, *a: fused_logits.append(real(self, *a).clone()) or fused_logits[-1])
    conv = [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox jumps over the lazy dog " * 2}]}]
    first = vlm.generate([conv], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    monkeypatch.setattr(FusedDecoder, "logits", lambda self, *a: None)  # declines: layers natively, the head apart
    model.lm_head.register_forward_hook(lambda _m, _i, out: apart.append(out.detach().clone()))
    engine.clear_caches()
    second = vlm.generate([conv], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    assert first == second
    assert len(fused_logits) == 7 and len(apart) == 8  # the first token comes from the prompt's step
    for a, b in zip(fused_logits, apart[1:]):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        if dtype == torch.bfloat16:  # the same kernel as the head's own native product: equal to the bit
            assert torch.equal(a, b)
        else:  # float32: the native dot product against PyTorch's, sums in another order
            assert float((a - b).abs().max()) <= 1e-5


@needs_native
def test_a_hooked_decoder_keeps_its_hooks_called(checkpoint):
    """The head inside the native step replaces the decoder's module call: hooks on it turn that off."""
    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.bfloat16)
    calls = []
    vlm.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    vlm.generate([conv], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(calls) == 5  # the prompt's step and four single-token steps


@needs_native
def test_rope_tables_hold_each_position_as_text_py_computes_it(checkpoint):
    from llavakit.model.layers import rope_cos_sin

    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.bfloat16)
    text = vlm.model.language_model
    fused = text.fused_decode
    cos, sin = fused._rope(torch.bfloat16, torch.tensor([[1500]]))
    assert cos.shape[0] == 2048 and cos.dtype == torch.float32  # grown by doubling past the position asked for
    for p in (0, 1, 17, 1023, 1024, 1500, 2047):
        want_cos, want_sin = rope_cos_sin(text.inv_freq, torch.tensor([[p]]), torch.bfloat16)
        assert torch.equal(cos[p], want_cos.reshape(-1).float()) and torch.equal(sin[p], want_sin.reshape(-1).float())
    assert fused._rope(torch.bfloat16, torch.tensor([[3], [900]]))[0] is cos  # covered: not rebuilt


@needs_native
def test_fused_step_points_at_replaced_pool_tensors(checkpoint):
    from llavakit.engine.runner import LayerPools
    from llavakit.model.text import PagedStep

    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.float32)
    fused = vlm.model.language_model.fused_decode
    layers = fused._layers(torch.float32)
    n = len(layers)
    keys = LayerPools(torch.zeros(32, 2, 8) for _ in range(n))
    values = LayerPools(torch.zeros(32, 2, 8) for _ in range(n))
    step = PagedStep(keys=keys, values=values, write_slots=None, read_slots=None, read_valid=None, query_pos=None)
    fused._point_at(layers, step)
    assert [layers[i].kpool for i in range(n)] == [t.data_ptr() for t in keys]
    layers[0].kpool = 12345
    fused._point_at(layers, step)
    assert layers[0].kpool == 12345  # nothing replaced since: the structs are left as they are
    keys[0] = torch.zeros(64, 2, 8)  # the engine grows a pool by replacing its tensors
    fused._point_at(layers, step)
    assert layers[0].kpool == keys[0].data_ptr() and keys.version == 1
    plain = PagedStep(keys=list(keys), values=list(values), write_slots=None, read_slots=None, read_valid=None,
                      query_pos=None)
    layers[1].vpool = 12345
    fused._point_at(layers, plain)  # a plain list has no version: pointed at every time
    assert layers[1].vpool == values[1].data_ptr()


@needs_native
def test_fused_step_follows_replaced_weights(checkpoint):
    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.float32)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    before = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    layer = vlm.model.language_model.layers[0].mlp
    layer.down_proj = FastLinear.wrap(nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False))
    nn.init.zeros_(layer.down_proj.weight)  # a new module and a new tensor: the native step must see both
    vlm.engine.clear_caches()
    fused = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    vlm.model.language_model.fused_decode = None
    vlm.engine.clear_caches()
    plain = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    assert fused == plain and fused != before


def test_fused_step_follows_weights_moved_in_place(checkpoint):
    """`.to()` keeps each Parameter and gives it new storage: the step must not read the old one.

    A round trip through float64 leaves float32 weights equal to before at other addresses.
    """
    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.float32)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    before = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    text = vlm.model.language_model
    weight = text.layers[0].self_attn.o_proj.weight
    old_ptr = weight.data_ptr()
    vlm.model.double().float()
    assert text.layers[0].self_attn.o_proj.weight is weight and weight.data_ptr() != old_ptr
    with torch.no_grad():
        weight.zero_()  # so that reading the old storage would give other tokens
    vlm.engine.clear_caches()
    fused = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    text.fused_decode = None
    vlm.engine.clear_caches()
    plain = vlm.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    assert fused == plain and fused != before


def test_a_weight_swapped_by_hand_needs_invalidate(checkpoint):
    """`param.data = t` fires no hook: invalidate() makes the next step rebuild its structs."""
    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.float32)
    fused = vlm.model.language_model.fused_decode
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    vlm.generate([conv], SamplingParams(max_new_tokens=2, ignore_eos=True))
    weight = vlm.model.language_model.layers[0].self_attn.o_proj.weight
    built = fused._layers(torch.float32)
    assert fused._layers(torch.float32) is built  # nothing changed: the same structs, not rebuilt
    weight.data = torch.zeros_like(weight)
    fused.invalidate()
    assert fused._layers(torch.float32)[0].o.w == weight.data_ptr()


def test_no_compiler_means_the_pytorch_path(monkeypatch, tmp_path, caplog, checkpoint):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="llavakit.native"):
        assert native.library() is None
    assert "no C compiler found" in caplog.text
    vlm = llavakit.load(checkpoint("qwen2"), dtype=torch.float32, quantize="int8")
    assert vlm.model.language_model.fused_decode is None
    out = vlm.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_a_failing_compiler_is_logged_and_not_fatal(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("LLAVAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger="llavakit.native"):
        assert native.library() is None
    assert "could not build llavakit's CPU kernels" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left for the next run


def test_opting_out_skips_the_build(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("LLAVAKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("built although opted out"))
    assert native.library() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_greedy_pick_equals_torch_first_maximum(dtype):
    """lk_argmax (through sample_rows) picks torch's first maximum, ties included, and refuses what torch's max refuses."""
    from llavakit.engine.sampling import _native_argmax, sample_rows

    if native.library() is None:
        pytest.skip("no native library here")
    torch.manual_seed(0)
    rows = (torch.randn(9, 1003) * 3).to(dtype)  # 1003: a tail after the vector part
    rows[1, 500] = rows[1, 7] = rows[1].max() + 1  # a tie: the first one wins
    rows[2, 1001] = 1e4  # the maximum in the tail
    rows[3, 40] = float("nan")  # in the vector part
    rows[4, 1002] = float("nan")  # in the tail
    rows[5, :] = float("-inf")
    rows[6, 3] = float("inf")
    rows[7] = rows[7].round()  # many ties
    rows[8, 0] = rows[8].max() + 1  # the very first value
    tokens, finite = _native_argmax(rows)
    best, want = rows.float().max(-1)
    assert finite == torch.isfinite(best).tolist() == [True, True, True, False, False, False, False, True, True]
    assert [t for t, ok in zip(tokens, finite) if ok] == [int(w) for w, ok in zip(want, finite) if ok]
    assert tokens[1] == 7 and tokens[2] == 1001 and tokens[8] == 0
    picks = sample_rows(rows, [SamplingParams()] * 9, [[]] * 9, [None] * 9)
    assert [p.token_id for p in picks] == [t if ok else None for t, ok in zip(tokens, finite)]
