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
from worker.families.blip.engine import DEFAULT_INT8_STAGES, INT8_STAGES, Engine, ImageRequest, resolve_int8_stages
from worker.families.blip.linear import has_packed_linear
from worker.families.blip.models import LoadedModels, load_models
from worker.families.blip.quant import has_int8_linear, install_int8_linear, int8_linear_available, is_int8_linear

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


def test_the_loader_records_int8_and_the_engine_quantizes_the_chosen_stages_only(tiny_models_dir: Path) -> None:
    loaded = load_models("tiny-random", {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent, dtype="int8")
    assert loaded.int8 and loaded.dtype_name == "int8"
    described = loaded.describe()
    assert described["dtype"] == "int8"  # what a decision's `models` field records
    assert {info["dtype"] for info in described["roles"].values()} == {"int8"}
    # The loader leaves the weights alone: which stages run int8 is the engine's choice.
    assert not any(has_int8_linear(model.model) for model in loaded.models.values())
    engine = Engine(loaded, int8_stages=("vision", "matches"))
    assert engine.int8_stages == ("vision", "matches")
    for role, model in loaded.models.items():
        assert model.model.dtype == loaded.dtype  # attention and norms at the compute dtype
        vision = [m for m in model.model.vision_model.modules() if type(m) is nn.Linear]
        assert vision and all(is_int8_linear(m) for m in vision)
        text = getattr(model.model, "text_encoder", None) or model.model.text_decoder
        text_linears = [m for m in text.modules() if type(m) is nn.Linear]
        # The ITM text encoder (matches) is int8; the caption decoder and the VQA question encoder stay bf16, packed.
        assert all(is_int8_linear(m) == (role == "itm") for m in text_linears)
        assert all(has_packed_linear(m) for m in text_linears if not is_int8_linear(m))
    itm = loaded.get("itm").model
    # The float32 heads a threshold sees are never quantized.
    assert not any(is_int8_linear(getattr(itm, head)) for head in ("vision_proj", "text_proj", "itm_head"))


def test_unknown_int8_stages_are_refused_and_float_models_ignore_them(
    tiny_models_dir: Path, loaded_int8: LoadedModels
) -> None:
    with pytest.raises(ConfigError) as error:
        Engine(loaded_int8, int8_stages=("vision", "decoder"))
    assert error.value.code == "int8_stages_invalid" and "decoder" in error.value.message
    assert resolve_int8_stages(None) == DEFAULT_INT8_STAGES
    assert resolve_int8_stages(["matches", "vision"]) == ("vision", "matches")  # in stage order
    float_models = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    engine = Engine(float_models, int8_stages=INT8_STAGES)
    assert engine.int8_stages == () and not has_int8_linear(float_models.get("itm").model)
    settings = Settings(_env_file=None, int8_stages=" vision, probes ,")  # type: ignore[call-arg]
    assert settings.resolved_int8_stages == ("vision", "probes")
    assert Settings(_env_file=None, int8_stages="").resolved_int8_stages == ()  # type: ignore[call-arg]
    assert Settings(_env_file=None).resolved_int8_stages is None  # type: ignore[call-arg]


def test_int8_engine_scores_close_to_float32(
    loaded_int8: LoadedModels, tiny_models_dir: Path, photos: list[Image.Image]
) -> None:
    exact_models = load_models("tiny-random", {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent)
    requests = [ImageRequest(photo, probes=QUESTIONS, texts=TEXTS) for photo in photos]
    engine = Engine(loaded_int8, max_caption_tokens=6, int8_stages=INT8_STAGES)
    assert all(has_int8_linear(loaded.model) for loaded in loaded_int8.models.values())
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
