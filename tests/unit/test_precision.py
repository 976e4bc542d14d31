"""Mixed precision at bf16: layer norms, residual stream and final projections in float32, products in bf16.

Real BLIP classes with tiny random weights through the real loader, real photos. What is held here is the
structure (which layers compute in which dtype, what the engine hands on) and that the judgement moves
towards float32's: the drift figures at base size are `modtag bench`'s (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from worker.families.blip.engine import Engine, ImageRequest, TagQuery
from worker.families.blip.models import LoadedModels, load_models
from worker.families.blip.precision import FLOAT32_HEADS, has_mixed_precision, install_mixed_precision
from worker.families.blip.quant import int8_linear_available

QUESTIONS = ["is there a gun in the picture?", "is there a person?", "yes?"]
TEXTS = ["a photo of a gun", "a rocket on the launch pad at night", "coffee"]
ROLES = {"caption", "vqa", "itm"}


def _bf16(tiny_models_dir: Path, dtype: str = "bfloat16") -> LoadedModels:
    return load_models("tiny-random", ROLES, cache_dir=tiny_models_dir.parent, dtype=dtype)


@pytest.fixture(scope="module")
def mixed(tiny_models_dir: Path) -> Engine:
    """An engine on bf16 models under mixed precision (the default)."""
    return Engine(_bf16(tiny_models_dir), max_caption_tokens=6)


@pytest.fixture(scope="module")
def plain(tiny_models_dir: Path) -> Engine:
    """An engine on bf16 models computing wholly in bf16, as before mixed precision."""
    return Engine(_bf16(tiny_models_dir), max_caption_tokens=6, mixed_precision=False)


def _requests(photos: dict[str, Image.Image]) -> list[ImageRequest]:
    tags = TagQuery(key="t", texts=("a cat", "a rocket", "a cup"), groups=(0, 0, 0), top_k=2)
    return [
        ImageRequest(photos[name], caption=True, probes=QUESTIONS, texts=TEXTS, tags=(tags,))
        for name in ("astronaut", "rocket", "coffee")
    ]


def test_norms_and_heads_compute_in_float32(mixed: Engine, plain: Engine) -> None:
    assert not any(has_mixed_precision(loaded.model) for loaded in plain.models.models.values())
    for loaded in mixed.models.models.values():
        model = loaded.model
        assert has_mixed_precision(model)
        assert not install_mixed_precision(model)  # idempotent
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm) or name.endswith(FLOAT32_HEADS):
                assert all(p.dtype == torch.float32 for p in module.parameters(recurse=False)), name
        # The products stay in bf16: the bulk of the weights, the language-model heads' too.
        assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
        for name, module in model.named_modules():
            if name.endswith("cls.predictions.decoder"):
                assert module.weight.dtype == torch.bfloat16


def test_the_largest_and_the_named_logits_are_float32s(mixed: Engine, loaded: LoadedModels) -> None:
    # The same weights (bf16 values) in float32 arithmetic over the float32 transform: what the refinement gives.
    head = mixed.models.get("vqa").model.text_decoder.cls.predictions
    states = torch.randn(3, head.transform.dense.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = head(states)
        transformed = head.transform(states).float()
        full = transformed @ head.decoder.weight.float().T + head.decoder.bias.float()
    assert logits.dtype == torch.float32
    top = full.topk(4, dim=-1).indices
    assert torch.allclose(logits.gather(-1, top), full.gather(-1, top), atol=1e-5)
    yes_no = torch.tensor(mixed._yes_no_ids())
    assert torch.allclose(logits[:, yes_no], full[:, yes_no], atol=1e-5)
    # The rest come from the bf16 product: close, not equal.
    assert (logits - full).abs().max() > 0


def test_float32_models_are_left_alone(loaded: LoadedModels) -> None:
    Engine(loaded)
    assert not any(has_mixed_precision(model.model) for model in loaded.models.values())


def test_mixed_precision_runs_every_check_close_to_float32(
    loaded: LoadedModels, mixed: Engine, photos: dict[str, Image.Image]
) -> None:
    # Which way the remaining rounding moves tiny random models' scores is chance: the comparison with plain
    # bf16 at base size is `modtag bench --precision`'s (README); here, every check runs and stays close.
    requests = _requests(photos)
    exact = Engine(loaded, max_caption_tokens=6).run(requests)
    outputs = mixed.run(requests)
    for low, high in zip(outputs, exact, strict=True):
        assert low.caption is not None and set(low.tags["t"]) <= {"a cat", "a rocket", "a cup"}
        assert max(abs(low.probes[q] - high.probes[q]) for q in QUESTIONS) < 0.05
        assert max(abs(low.matches[t] - high.matches[t]) for t in TEXTS) < 0.05


def test_the_vision_output_is_float32_and_closer(
    loaded: LoadedModels, mixed: Engine, plain: Engine, photos: dict[str, Image.Image]
) -> None:
    exact_engine = Engine(loaded)
    pixels = exact_engine.preprocess(_requests(photos)).pixels["itm"]
    with torch.inference_mode():
        exact = exact_engine.encode_images("itm", pixels)
        low = plain.encode_images("itm", pixels)
        high = mixed.encode_images("itm", pixels)
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    assert (high - exact).abs().max() < (low.float() - exact).abs().max()


@pytest.mark.skipif(not int8_linear_available(), reason="this PyTorch has no oneDNN int8 linear kernels")
def test_int8_runs_under_mixed_precision(tiny_models_dir: Path, photos: dict[str, Image.Image]) -> None:
    models = _bf16(tiny_models_dir, "int8")
    outputs = Engine(models, max_caption_tokens=4).run(_requests(photos))
    assert all(o.caption is not None and 0 <= o.probes[QUESTIONS[0]] <= 1 for o in outputs)
    assert models.dtype_name == "int8"
