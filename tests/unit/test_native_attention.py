"""The native attention kernel (worker/families/blip/native): built by the real compiler, the stock numbers,
a clear refusal.

It needs AVX-512 and a C compiler; the CI machine has both. Elsewhere these tests skip, saying which is
missing, and the engine runs PyTorch's attention (test_attention.py covers that path).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BlipVisionConfig, BlipVisionModel

from worker.families.blip import native
from worker.families.blip.attention import attend, has_native_attention, install_fused_attention
from worker.families.blip.native import NativeAttention, build, cpu_supports, native_attention

pytestmark = [
    pytest.mark.skipif(not cpu_supports(torch.float32), reason="the kernel needs AVX-512; this CPU lacks it"),
    pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler to build it"),
]

BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="this CPU lacks AVX-512 BF16"),
)


@pytest.fixture(scope="module")
def kernel() -> NativeAttention:
    loaded = native_attention()
    assert loaded is not None, "the kernel should build on an AVX-512 machine with a compiler"
    return loaded


def _qkv(images: int, tokens: int, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Views into one fused projection, as the vision attention passes them: (images, heads, tokens, 64).
    generator = torch.Generator().manual_seed(seed)
    fused = torch.randn(images, tokens, 3, heads, 64, generator=generator)
    query, key, value = fused.permute(2, 0, 3, 1, 4).unbind(0)
    return query, key, value


def _float64(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    return (scores.softmax(dim=-1) @ value.double()).transpose(1, 2)


# Token counts on each side of the kernel's 16-column vectors, 6-row tiles and 48-row blocks, and a ViT's.
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 48, 49, 100, 197, 577])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_kernel_gives_the_float64_attention(kernel: NativeAttention, tokens: int, dtype: torch.dtype) -> None:
    images, heads = (2, 3) if tokens < 577 else (1, 2)
    query, key, value = _qkv(images, tokens, heads, seed=tokens)
    expected = _float64(query, key, value, scale=0.125)
    operands = [t.to(dtype) for t in (query, key, value)]
    assert kernel.supports(*operands)
    got = kernel(*operands, scale=0.125)
    assert got.shape == (images, tokens, heads, 64) and got.dtype == dtype
    error = (got.double() - expected).abs().max().item()
    if dtype == torch.float32:
        assert error < 2e-6
    else:
        # Rounded inputs and weights: no worse than PyTorch's bfloat16 attention on the same operands.
        stock_error = (attend(*operands, None, 0.125).double() - expected).abs().max().item()
        assert error <= max(stock_error * 1.25, 1e-2)


def test_kernel_refuses_what_it_does_not_compute(kernel: NativeAttention) -> None:
    query, key, value = _qkv(1, 8, 2, seed=1)
    assert kernel.supports(query, key, value)
    narrow = torch.randn(1, 2, 8, 32)
    assert not kernel.supports(narrow, narrow, narrow)  # heads of 64 only
    assert not kernel.supports(query.double(), key.double(), value.double())
    assert not kernel.supports(query, key[:, :, :4], value[:, :, :4])  # cross-attention: other key counts
    assert not kernel.supports(query, key.transpose(2, 3).contiguous().transpose(2, 3), value)  # strided dim
    with torch.enable_grad():
        leaf = query.clone().requires_grad_()
        assert not kernel.supports(leaf, key, value)  # no backward: autograd keeps PyTorch's attention


def _vision(seed: int) -> BlipVisionModel:
    torch.manual_seed(seed)
    config = BlipVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    return BlipVisionModel(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_vision_encoder_with_the_kernel_gives_the_stock_outputs(dtype: torch.dtype) -> None:
    # A real BLIP vision encoder with heads of 64 (the tiny test models' heads are too small for the kernel).
    fast, stock, reference = _vision(0).to(dtype), _vision(0).to(dtype), _vision(0)
    install_fused_attention(fast)
    assert has_native_attention(fast) and not has_native_attention(stock)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = fast(pixel_values=pixels.to(dtype)).last_hidden_state.double()
        expected = reference(pixel_values=pixels).last_hidden_state.double()
        stock_error = (stock(pixel_values=pixels.to(dtype)).last_hidden_state.double() - expected).abs().max().item()
    error = (got - expected).abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-4
    else:
        assert error <= stock_error * 1.25


def test_native_off_keeps_pytorch_attention() -> None:
    model = _vision(0)
    install_fused_attention(model, native=False)
    assert not has_native_attention(model)


def test_build_is_cached_and_says_why_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src" / "attention.c"
    source.parent.mkdir()
    shutil.copy(native.SOURCE, source)
    shutil.copy(native.SOURCE.with_name("quantize.c"), source.with_name("quantize.c"))
    monkeypatch.setattr(native, "SOURCE", source)
    built = build(tmp_path / "cache")
    first = built.stat().st_mtime_ns
    assert build(tmp_path / "cache") == built and built.stat().st_mtime_ns == first  # compiled once per source
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(OSError, match="no C compiler"):
        build(tmp_path / "missing")
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(OSError, match=r"false failed on attention\.c"):
        build(tmp_path / "failing")
    assert not list((tmp_path / "failing").glob("*.so"))  # no half-written library left behind
    # An image builds it beside its source; without a compiler, that one is used.
    monkeypatch.delenv("CC")
    prebuilt = build(source.parent)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert build(tmp_path / "elsewhere") == prebuilt


def test_cpu_without_avx512_gets_pytorch_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    native.cpu_supports.cache_clear()
    native._load.cache_clear()
    try:
        assert native_attention() is None
    finally:
        native.cpu_supports.cache_clear()
        native._load.cache_clear()


def test_flop_counter_sees_the_kernel(kernel: NativeAttention) -> None:
    # `modtag bench` reports the share of peak from counted FLOPs: the kernel's two products count like SDPA's.
    from modtag.bench.engine import count_flops

    query, key, value = _qkv(2, 17, 3, seed=2)
    flops, result = count_flops(lambda: kernel(query, key, value, 0.125))
    assert flops == 2 * (2 * 2 * 3 * 17 * 17 * 64)
    assert torch.equal(result, kernel.run(query, key, value, 0.125))  # type: ignore[arg-type]


def test_tiny_models_heads_are_too_small_for_the_kernel(tiny_models_dir: Path) -> None:
    from worker.families.blip.models import load_models

    loaded = load_models("tiny-random", {"caption"}, cache_dir=tiny_models_dir.parent)
    install_fused_attention(loaded.get("caption").model)
    assert not has_native_attention(loaded.get("caption").model)


@pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="this CPU lacks AVX-512 BF16")
@pytest.mark.parametrize("shape", [(1, 5), (3, 17), (37, 768), (577, 3072)])
def test_quantizer_matches_pytorch(shape: tuple[int, int]) -> None:
    # The int8 layers' input quantizer (worker/families/blip/quant.py): PyTorch's scale, zero point and values.
    quantizer = native.native_quantizer()
    assert quantizer is not None
    rows = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 3 + 0.5).bfloat16()
    got, scale, zero = quantizer(rows)
    low, high = (float(v) for v in torch.aminmax(rows.float()))
    low, high = min(low, 0.0), max(high, 0.0)
    assert scale == (high - low) / 255 and zero == min(255, max(0, round(-low / scale)))
    expected = torch.quantize_per_tensor(rows.float(), scale, zero, torch.quint8).int_repr()
    assert got.shape == rows.shape and got.dtype == torch.uint8
    assert (got.int() - expected.int()).abs().max().item() <= 1  # ties may round the other way
    assert (got != expected).float().mean().item() < 0.02
    positive, _, zero = quantizer(rows.abs())
    assert zero == 0 and positive.max().item() == 255  # all positive: the range starts at 0


@pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="this CPU lacks AVX-512 BF16")
@pytest.mark.parametrize("shape", [(1, 5), (37, 768), (577, 3072)])
def test_static_quantizer_matches_pytorch_and_saturates(shape: tuple[int, int]) -> None:
    # A calibrated scale and zero point (worker/families/blip/calibration.py): one pass, values outside the range
    # clamped to 0 and 255 as PyTorch's quantizer clamps them.
    quantizer = native.native_quantizer()
    assert quantizer is not None
    rows = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 4).bfloat16()
    scale, zero = 6.0 / 255, 128  # about [-3, 3]: the tails of the input fall outside
    got = quantizer.static(rows, scale, zero)
    expected = torch.quantize_per_tensor(rows.float(), scale, zero, torch.quint8).int_repr()
    assert got.shape == rows.shape and got.dtype == torch.uint8
    assert (got.int() - expected.int()).abs().max().item() <= 1  # ties may round the other way
    outside = rows.float().abs() > 3.5
    assert torch.equal(got[outside], expected[outside])  # saturated alike


def test_native_kernels_off_leaves_int8_to_pytorchs_quantizer() -> None:
    # MODTAG_NATIVE_KERNELS=false: the worker turns the library off for the int8 layers too.
    native.enable(False)
    try:
        assert native.native_quantizer() is None
    finally:
        native.enable(True)
    assert native.native_quantizer() is not None or not cpu_supports(torch.bfloat16)
