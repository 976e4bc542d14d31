"""Packed oneDNN linear layers: the stock layers' numbers, per model instance, with safe fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers.models.blip.modeling_blip import BlipEncoderLayer, BlipMLP
from transformers.models.blip.modeling_blip_text import (
    BlipTextIntermediate,
    BlipTextOutput,
    BlipTextSelfAttention,
    BlipTextSelfOutput,
)

from worker.families.blip.attention import install_fused_attention
from worker.families.blip.linear import (
    has_packed_linear,
    install_packed_linear,
    key_value,
    linear_add,
    packed_linear_available,
)
from worker.families.blip.models import load_models

pytestmark = pytest.mark.skipif(
    not packed_linear_available(torch.float32),
    reason="this PyTorch has no oneDNN linear kernels (the layers stay stock)",
)


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24, bias=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layers_give_the_stock_numbers(dtype: torch.dtype) -> None:
    stock, packed = _layers().to(dtype), _layers().to(dtype)
    assert install_packed_linear(packed) == 2
    assert install_packed_linear(packed) == 0  # idempotent
    assert has_packed_linear(packed) and not has_packed_linear(stock)
    assert list(packed.state_dict()) == list(stock.state_dict())  # the packed copy is no parameter
    inputs = torch.randn(4, 9, 48).to(dtype)
    strided = torch.randn(9, 4, 48).to(dtype).transpose(0, 1)  # a view with gaps between rows
    with torch.inference_mode():
        for batch in (inputs, strided, inputs[:1, :1]):
            got, expected = packed(batch), stock(batch)
            # bfloat16: the stock layer may round once more (adding the bias after the product).
            tolerance = 1e-5 if dtype == torch.float32 else 0.01 * (1 + expected.abs().max().item())
            assert (got.float() - expected.float()).abs().max().item() < tolerance


def test_bfloat16_is_bitwise_stock_at_the_base_models_size() -> None:
    torch.manual_seed(0)
    stock = nn.Linear(768, 3072).bfloat16()
    packed = nn.Linear(768, 3072).bfloat16()
    packed.load_state_dict(stock.state_dict())
    install_packed_linear(packed)
    inputs = torch.randn(2, 577, 768).bfloat16()
    with torch.inference_mode():
        assert torch.equal(packed(inputs), stock(inputs))


def test_falls_back_to_the_stock_layer_when_the_packed_copy_does_not_fit() -> None:
    layers = _layers()
    install_packed_linear(layers)
    inputs = torch.randn(3, 48)
    reference = _layers()(inputs)
    # With gradients (no backward in the packed kernel), and after a cast the copy does not follow.
    output = layers(inputs)
    assert output.requires_grad and torch.allclose(output, reference, atol=1e-6)
    layers.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layers(inputs.bfloat16()), _layers().bfloat16()(inputs.bfloat16()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blip_mlps_fuse_their_gelu(tiny_models_dir: Path, dtype: torch.dtype) -> None:
    fused = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent, dtype=str(dtype)[6:])
    stock = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent, dtype=str(dtype)[6:])
    model = fused.get("itm").model
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert install_packed_linear(model) == linears
    mlps = [m for m in model.modules() if isinstance(m, BlipMLP | BlipTextIntermediate)]
    assert mlps and all("forward" in vars(m) for m in mlps)  # replaced on the instances
    stock_mlps = [m for m in stock.get("itm").model.modules() if isinstance(m, BlipMLP | BlipTextIntermediate)]
    width = mlps[0].fc1.in_features if isinstance(mlps[0], BlipMLP) else mlps[0].dense.in_features
    inputs = torch.randn(2, 7, width).to(dtype)
    with torch.inference_mode():
        got, expected = mlps[0](inputs).float(), stock_mlps[0](inputs).float()
    # float32: 1e-5; bfloat16: the fused GELU rounds once where the stock layers round twice.
    tolerance = 1e-5 if dtype == torch.float32 else 0.02 * (1 + expected.abs().max().item())
    assert (got - expected).abs().max().item() < tolerance


def test_residual_sums_fuse_into_float32_products_with_the_stock_value() -> None:
    torch.manual_seed(0)
    stock, packed = nn.Linear(48, 40), nn.Linear(48, 40)
    packed.load_state_dict(stock.state_dict())
    install_packed_linear(packed)
    inputs, residual = torch.randn(2, 9, 48), torch.randn(2, 9, 40)
    strided = torch.randn(9, 2, 48).transpose(0, 1)
    with torch.inference_mode():
        for batch in (inputs, strided):
            # oneDNN adds the residual to the finished float32 output: the same value as the sum after it.
            assert torch.equal(linear_add(packed, batch, residual), stock(batch) + residual)
        # A float32 residual beside a bf16 layer (mixed precision) is the stock sum: promoted to float32.
        low = nn.Linear(48, 40).bfloat16()
        install_packed_linear(low)
        got = linear_add(low, inputs.bfloat16(), residual)
        assert got.dtype == torch.float32 and torch.equal(got, low(inputs.bfloat16()) + residual)


def test_blip_layers_hand_their_residuals_to_the_products(tiny_models_dir: Path) -> None:
    # The vision layers (through the fused attention's layer) and the text output blocks, as the engine installs them.
    fused = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    stock = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    model: Any = fused.get("itm").model
    install_fused_attention(model)
    install_packed_linear(model)
    outputs = [m for m in model.modules() if isinstance(m, BlipTextSelfOutput | BlipTextOutput)]
    assert outputs and all("forward" in vars(m) for m in outputs)
    assert all("forward" in vars(m) for m in model.modules() if isinstance(m, BlipEncoderLayer))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 23, 3, 37, 31, 2]] * 2)  # within the tiny vocabulary
    reference: Any = stock.get("itm").model
    with torch.inference_mode():
        for net in (model, reference):
            net.eval()
        got = model(input_ids=ids, pixel_values=pixels).itm_score
        expected = reference(input_ids=ids, pixel_values=pixels).itm_score
        vision = model.vision_model(pixel_values=pixels).last_hidden_state
        stock_vision = reference.vision_model(pixel_values=pixels).last_hidden_state
    assert (vision - stock_vision).abs().max().item() < 1e-5
    assert (got - expected).abs().max().item() < 1e-5


def test_text_attention_keys_and_values_run_as_one_product(tiny_models_dir: Path) -> None:
    fused = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    stock = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    model: Any = fused.get("itm").model
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert install_packed_linear(model) == linears
    assert install_packed_linear(model) == 0  # the fused layers are not packed again
    attentions = [m for m in model.modules() if isinstance(m, BlipTextSelfAttention)]
    stock_attentions = [m for m in stock.get("itm").model.modules() if isinstance(m, BlipTextSelfAttention)]
    assert attentions and all(
        "forward" not in vars(layer) for m in attentions for layer in (m.key, m.value)
    )  # their own packed copies went: one copy of the weights, in the fused product
    states = torch.randn(2, 7, attentions[0].key.in_features)
    with torch.inference_mode():
        for ours, theirs in zip(attentions, stock_attentions, strict=True):
            key, value = key_value(ours, states)
            assert (key - theirs.key(states)).abs().max().item() < 1e-5
            assert (value - theirs.value(states)).abs().max().item() < 1e-5
    # With gradients (the packed kernel has none) the stock layers run.
    key, value = key_value(attentions[0], states)
    assert key.requires_grad and torch.allclose(key, stock_attentions[0].key(states), atol=1e-6)
