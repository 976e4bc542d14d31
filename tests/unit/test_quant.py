"""int8 linear layers: close to the float layers, loaded through the real loader, recorded as int8.

Real BLIP classes with tiny random weights, real photos. int8 rounds every weight to one of 255 levels
per output channel and every input to one of 256 levels per call, so results are close to float32,
not equal: the tolerances below are stated per test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn
from transformers.models.blip.modeling_blip import BlipMLP

from core.errors import ConfigError
from core.settings import Settings
from worker.families.blip.engine import Engine, ImageRequest
from worker.families.blip.linear import has_packed_linear
from worker.families.blip.models import LoadedModels, load_models
from worker.families.blip.quant import has_int8_linear, install_int8_linear, int8_linear_available

pytestmark = pytest.mark.skipif(
    not int8_linear_available(), reason="this PyTorch has no oneDNN int8 linear kernels (int8 is refused)"
)

QUESTIONS = ["is there a gun in the picture?", "is this a photo of a cat?", "is there a person?", "yes?"]
TEXTS = ["a photo of a gun", "a cat sleeping on a sofa", "a rocket on the launch pad at night", "coffee"]


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_are_close_to_the_float_layers(dtype: torch.dtype) -> None:
    stock, quantized = _layers().to(dtype), _layers().to(dtype)
    assert install_int8_linear(quantized) == 2
    assert install_int8_linear(quantized) == 0  # idempotent
    assert has_int8_linear(quantized) and not has_int8_linear(stock)
    assert list(quantized.state_dict()) == list(stock.state_dict())  # the int8 copy is no parameter
    inputs = torch.randn(4, 9, 64).to(dtype)
    strided = torch.randn(9, 4, 64).to(dtype).transpose(0, 1)
    with torch.inference_mode():
        for batch in (inputs, strided, inputs[:1, :1]):
            got, expected = quantized(batch), stock(batch)
            assert got.dtype == dtype and got.shape == expected.shape
            # Two roundings of 1/255 of the range each, over 64 and 96 products: within 3% of the scale.
            error = (got.float() - expected.float()).abs().max().item()
            assert 0 < error < 0.03 * expected.abs().max().item()


def test_the_mlp_gelu_is_fused_into_the_int8_product() -> None:
    from transformers import BlipVisionConfig

    config = BlipVisionConfig(hidden_size=32, intermediate_size=64)
    torch.manual_seed(0)
    stock = BlipMLP(config)
    quantized = BlipMLP(config)
    quantized.load_state_dict(stock.state_dict())
    install_int8_linear(quantized)
    assert "forward" in quantized.__dict__  # the fused forward, on this instance only
    inputs = torch.randn(2, 7, 32)
    with torch.inference_mode():
        got, expected = quantized(inputs), stock(inputs)
    assert (got - expected).abs().max().item() < 0.03 * expected.abs().max().item()


def test_falls_back_to_the_float_layer_with_gradients() -> None:
    layers, reference = _layers(), _layers()
    install_int8_linear(layers)
    inputs = torch.randn(3, 64)
    # The int8 kernel has no backward: with gradients on, the float weights compute, exactly.
    assert torch.equal(layers(inputs), reference(inputs))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def loaded_int8(tiny_models_dir: Path) -> LoadedModels:
    return load_models("tiny-random", {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent, dtype="int8")


def test_the_loader_quantizes_every_model_and_records_int8(loaded_int8: LoadedModels) -> None:
    assert loaded_int8.int8 and loaded_int8.dtype_name == "int8"
    described = loaded_int8.describe()
    assert described["dtype"] == "int8"  # what a decision's `models` field records
    assert {info["dtype"] for info in described["roles"].values()} == {"int8"}
    for loaded in loaded_int8.models.values():
        assert has_int8_linear(loaded.model)
        assert loaded.model.dtype == loaded_int8.dtype  # attention and norms at the compute dtype
        linears = [m for m in loaded.model.modules() if type(m) is nn.Linear]
        assert all(hasattr(m, "_modtag_int8_weight") for m in linears)


def test_int8_engine_scores_close_to_float32(
    loaded_int8: LoadedModels, tiny_models_dir: Path, photos: list[Image.Image]
) -> None:
    exact_models = load_models("tiny-random", {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent)
    requests = [ImageRequest(photo, probes=QUESTIONS, texts=TEXTS) for photo in photos]
    engine = Engine(loaded_int8, max_caption_tokens=6)
    # The engine's packed float layers leave the int8 layers alone.
    assert not any(has_packed_linear(loaded.model) for loaded in loaded_int8.models.values())
    fast = engine.run(requests)
    exact = Engine(exact_models, max_caption_tokens=6).run(requests)
    diffs = []
    for low, high in zip(fast, exact, strict=True):
        assert low.caption is not None and 0 < len(low.caption_ids) <= 6
        diffs += [abs(low.probes[q] - high.probes[q]) for q in QUESTIONS]
        diffs += [abs(low.matches[t] - high.matches[t]) for t in TEXTS]
    # Measured on these models: max 0.05, mean 0.012 (bf16 alone: max 0.03, mean 0.007).
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.04
    assert max(diffs) > 0  # int8 really computed


def test_int8_is_a_setting_and_refused_off_the_cpu(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(dtype="int8").dtype == "int8"
    # Asking for CUDA where there is none fails first; pretend there is one to reach the int8 check.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError) as error:
        load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent, device="cuda", dtype="int8")
    assert error.value.code == "dtype_unsupported"
