"""Fused attention: the same numbers as the stock eager attention, installed per model instance only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from worker.families.blip import attention
from worker.families.blip.attention import attend, has_fused_attention, install_fused_attention
from worker.families.blip.models import load_models


def _eager(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The stock BLIP arithmetic in float64: scores / sqrt(d) + additive mask, softmax, times the values."""
    scores = query.double() @ key.double().transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.double()
    return (scores.softmax(dim=-1) @ value.double()).transpose(1, 2)


def _block_mask(batch: int, length: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
    # Each query may see a different prefix of the keys (at least one key), as packed texts do.
    mask = torch.zeros(batch, 1, length, keys, dtype=dtype)
    for row in range(length):
        mask[:, :, row, (row % keys) + 1 :] = torch.finfo(dtype).min
    return mask


# (batch, heads, queries, keys) with 600 scores per chunk: all images in one chunk (a decoding step),
# 3 images per chunk, 3 heads per chunk, 1 head per chunk.
SHAPES = [(3, 4, 1, 20), (5, 4, 5, 10), (2, 6, 10, 20), (2, 4, 12, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_attend_equals_eager_attention_on_every_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, masked: bool, shape: tuple[int, int, int, int]
) -> None:
    # Small chunks, so these small shapes take each branch of the chunked CPU path.
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 600)
    batch, heads, length, keys = shape
    generator = torch.Generator().manual_seed(sum(shape))
    query, key, value = (torch.randn(batch, heads, n, 16, generator=generator) for n in (length, keys, keys))
    mask = _block_mask(batch, length, keys, dtype) if masked else None
    expected = _eager(query, key, value, None if mask is None else mask.float())
    got = attend(query.to(dtype), key.to(dtype), value.to(dtype), mask, scale=16**-0.5)
    assert got.shape == (batch, length, heads, 16) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    assert (got.double() - expected).abs().max().item() < tolerance
    # A mask shared by all images (one row) broadcasts like a per-image one.
    if mask is not None:
        shared = attend(query.to(dtype), key.to(dtype), value.to(dtype), mask[:1], scale=16**-0.5)
        assert torch.equal(shared, got)


def test_attend_masks_exclude_keys() -> None:
    query, key, value = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.zeros(1, 1, 3, 5)
    mask[..., 1:] = torch.finfo(torch.float32).min
    # Only the first key is visible: every query returns its value.
    for dtype in (torch.float32, torch.bfloat16):
        got = attend(query.to(dtype), key.to(dtype), value.to(dtype), mask.to(dtype), scale=8**-0.5)
        expected = value[:, :, :1].to(dtype).expand(1, 2, 3, 8).transpose(1, 2)
        assert torch.allclose(got.float(), expected.float(), atol=1e-6)


def test_installed_per_instance_never_on_the_class(tiny_models_dir: Path) -> None:
    fused = load_models("tiny-random", {"caption", "vqa"}, cache_dir=tiny_models_dir.parent)
    stock = load_models("tiny-random", {"caption", "vqa"}, cache_dir=tiny_models_dir.parent)
    class_forwards = (BlipAttention.forward, BlipTextSelfAttention.forward)
    model = fused.get("vqa").model
    expected = sum(isinstance(m, BlipAttention | BlipTextSelfAttention) for m in model.modules())
    assert expected > 0
    assert install_fused_attention(model) == expected
    assert install_fused_attention(model) == 0  # idempotent
    assert has_fused_attention(model)
    assert not has_fused_attention(fused.get("caption").model)
    assert not has_fused_attention(stock.get("vqa").model)
    assert (BlipAttention.forward, BlipTextSelfAttention.forward) == class_forwards
    assert not has_fused_attention(torch.nn.Linear(2, 2))  # nothing to replace is not "fused"


@pytest.mark.slow
def test_fused_models_give_the_stock_outputs(tiny_models_dir: Path) -> None:
    # The whole models, every attention kind: vision, text self-attention with a padding mask,
    # cross-attention, and the decoder's cached steps (generate).
    fused = load_models("tiny-random", {"caption", "itm"}, cache_dir=tiny_models_dir.parent)
    stock = load_models("tiny-random", {"caption", "itm"}, cache_dir=tiny_models_dir.parent)
    for loaded in fused.models.values():
        install_fused_attention(loaded.model)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    input_ids = torch.tensor([[101, 2000, 2001, 2002, 102], [101, 2003, 102, 0, 0]])
    attention_mask = (input_ids != 0).long()
    with torch.inference_mode():
        outputs = [
            loaded.get("itm").model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
            for loaded in (fused, stock)
        ]
        assert (outputs[0].itm_score - outputs[1].itm_score).abs().max().item() < 1e-5
        captions = [_generate(loaded.get("caption").model, pixels) for loaded in (fused, stock)]
    assert torch.equal(captions[0], captions[1])


def _generate(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    result: torch.Tensor = model.generate(pixel_values=pixels, max_new_tokens=6)
    return result
