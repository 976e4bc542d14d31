"""The engine computes what the stock per-image, per-question, per-text calls compute, with less work.

Real BLIP classes with tiny random weights loaded through the real loader, real photos, float32.
The engine installs fused attention on the models it is given, so the stock calls run on a second,
separately loaded copy (`stock`) that no engine ever touches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from core.errors import ConfigError, ModelError
from worker.families.blip import attention, baseline
from worker.families.blip.attention import has_fused_attention
from worker.families.blip.engine import STAGES, Engine, ImageOutput, ImageRequest
from worker.families.blip.models import LoadedModels, load_models

TOLERANCE = 1e-4

QUESTIONS = [
    "is there a gun in the picture?",
    "is this a photo of a cat?",
    "is there a person?",
    "yes?",
    "is there a knife, a rifle or any other weapon in the hands of the person standing in the kitchen?",
    "",
]
TEXTS = [
    "a photo of a gun",
    "a cat sleeping on a sofa",
    "a rocket on the launch pad at night with smoke and fire",
    "coffee",
    "ünïcödé ✓ 🚀 text with symbols #$%",
]


def _assert_same(engine_outputs: list[ImageOutput], requests: list[ImageRequest], loaded: LoadedModels) -> float:
    """Compare with the stock calls one by one; returns the largest difference seen."""
    assert not any(has_fused_attention(model.model) for model in loaded.models.values()), "not the stock models"
    largest = 0.0
    for output, request in zip(engine_outputs, requests, strict=True):
        if request.caption:
            stock_ids, stock_caption = baseline.caption(loaded.get("caption"), request.image, max_new_tokens=8)
            assert output.caption_ids == tuple(stock_ids[1:])
            assert output.caption == stock_caption
        else:
            assert output.caption is None and output.caption_ids == ()
        assert set(output.probes) == set(request.probes)
        for question in request.probes:
            stock = baseline.probe(loaded.get("vqa"), request.image, question)
            assert abs(output.probes[question] - stock) <= TOLERANCE, question
            largest = max(largest, abs(output.probes[question] - stock))
        assert set(output.matches) == set(request.texts)
        for text in request.texts:
            stock = baseline.match(loaded.get("itm"), request.image, text)
            assert abs(output.matches[text] - stock) <= TOLERANCE, text
            largest = max(largest, abs(output.matches[text] - stock))
    return largest


@pytest.mark.slow
def test_engine_equals_stock_calls_for_mixed_batches(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    engine = Engine(loaded, max_caption_tokens=8)
    single = [ImageRequest(photos["rocket"], probes=QUESTIONS[:2], texts=TEXTS[:3])]
    mixed = [
        ImageRequest(photos["astronaut"], probes=QUESTIONS, texts=TEXTS),
        ImageRequest(photos["chelsea"], caption=False, probes=QUESTIONS[2:4], texts=TEXTS[1:2]),
        ImageRequest(photos["coffee"], probes=[QUESTIONS[4], QUESTIONS[4], QUESTIONS[0]], texts=[]),
    ]
    largest = 0.0
    for requests in (single, mixed):
        outputs = engine.run(requests)
        largest = max(largest, _assert_same(outputs, requests, stock))

    # The comparison means something: random weights still tell images and texts apart.
    astronaut, chelsea, coffee = engine.run(mixed)
    probe_values = list(astronaut.probes.values())
    assert max(probe_values) - min(probe_values) > 0.02
    match_values = list(astronaut.matches.values())
    assert max(match_values) - min(match_values) > 0.05
    assert abs(astronaut.probes[QUESTIONS[2]] - chelsea.probes[QUESTIONS[2]]) > 1e-3
    assert abs(astronaut.probes[QUESTIONS[0]] - coffee.probes[QUESTIONS[0]]) > 1e-3
    assert astronaut.caption_ids != coffee.caption_ids
    assert largest < TOLERANCE
    # Duplicates are computed once and answered once.
    assert list(coffee.probes) == [QUESTIONS[4], QUESTIONS[0]]


@pytest.mark.slow
def test_parity_holds_when_texts_split_into_many_rows_and_passes(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    # One text per row, one row per forward, one image per vision batch: every chunking path.
    engine = Engine(loaded, max_caption_tokens=8, max_batch=1, max_row_tokens=1)
    requests = [
        ImageRequest(photos["coffee"], probes=QUESTIONS[:3], texts=TEXTS[:2]),
        ImageRequest(photos["rocket"], caption=True, probes=QUESTIONS[3:], texts=TEXTS[2:]),
    ]
    _assert_same(engine.run(requests), requests, stock)
    # And with rows of a few texts each.
    engine = Engine(loaded, max_caption_tokens=8, max_batch=2, max_row_tokens=24)
    _assert_same(engine.run(requests), requests, stock)


def test_each_image_is_encoded_once_per_model(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    calls: Counter[str] = Counter()
    rows: Counter[str] = Counter()

    def counting(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object) -> None:
            calls[name] += 1
            tensor = kwargs.get("pixel_values", kwargs.get("input_ids"))
            assert isinstance(tensor, torch.Tensor)
            rows[name] += tensor.shape[0]

        return hook

    handles = []
    for role in ("caption", "vqa", "itm"):
        model: Any = loaded.get(role).model
        handles.append(model.vision_model.register_forward_hook(counting(f"{role}.vision"), with_kwargs=True))
        if role != "caption":
            encoder = model.text_encoder
            handles.append(encoder.register_forward_hook(counting(f"{role}.text"), with_kwargs=True))
    try:
        requests = [ImageRequest(photos[name], probes=QUESTIONS, texts=TEXTS) for name in ("astronaut", "chelsea")]
        Engine(loaded, max_caption_tokens=4).run(requests)
    finally:
        for handle in handles:
            handle.remove()
    # One batched vision pass per model over the 2 images; one text-encoder row per image for all
    # its 6 questions (5 texts), so the image's cross-attention keys and values are computed once.
    assert calls == {"caption.vision": 1, "vqa.vision": 1, "itm.vision": 1, "vqa.text": 1, "itm.text": 1}
    assert rows == {"caption.vision": 2, "vqa.vision": 2, "itm.vision": 2, "vqa.text": 2, "itm.text": 2}


def test_caption_length_limits_match_stock(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    engine = Engine(loaded, max_caption_tokens=5, min_caption_tokens=5)
    outputs = engine.run([ImageRequest(photos[name]) for name in ("astronaut", "rocket")])
    for output, name in zip(outputs, ("astronaut", "rocket"), strict=True):
        stock_ids, _ = baseline.caption(stock.get("caption"), photos[name], max_new_tokens=5, min_new_tokens=5)
        assert len(output.caption_ids) == 5
        assert output.caption_ids == tuple(stock_ids[1:])
        assert isinstance(output.caption, str)
    with pytest.raises(ConfigError):
        Engine(loaded, max_caption_tokens=3, min_caption_tokens=4)
    with pytest.raises(ConfigError):
        Engine(loaded, max_batch=0)


def test_hostile_and_odd_inputs(loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded, max_caption_tokens=8)
    huge_text = "weapon " * 3000  # far past the 512 positions: truncated, where the stock call would fail
    odd_images = [
        Image.new("RGB", (1, 1), "red"),
        photos["chelsea"].convert("L"),
        photos["coffee"].convert("RGBA"),
        Image.new("RGB", (4000, 3), "white"),
    ]
    requests = [ImageRequest(image, probes=[huge_text, "   "], texts=[huge_text, "\n\t"]) for image in odd_images]
    outputs = engine.run(requests)
    for output in outputs:
        values = [*output.probes.values(), *output.matches.values()]
        assert len(values) == 4
        assert all(0.0 <= value <= 1.0 for value in values)
    # Grey and RGBA images are converted like the stock processor converts them.
    converted = [ImageRequest(image, probes=["   ", QUESTIONS[1]], texts=["\n\t"]) for image in odd_images[1:3]]
    _assert_same(engine.run(converted), converted, stock)

    assert engine.run([]) == []
    [idle] = engine.run([ImageRequest(photos["rocket"], caption=False)])
    assert (idle.caption, idle.probes, idle.matches) == (None, {}, {})

    with pytest.raises(TypeError):
        engine.run([ImageRequest(b"not an image")])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.run([ImageRequest(photos["rocket"], probes="is there a gun?")])
    with pytest.raises(TypeError):
        engine.run([ImageRequest(photos["rocket"], texts=[None])])  # type: ignore[list-item]


def test_missing_model_is_a_clear_error(tiny_models_dir: Path, photos: dict[str, Image.Image]) -> None:
    only_itm = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    engine = Engine(only_itm)
    [output] = engine.run([ImageRequest(photos["rocket"], caption=False, texts=TEXTS[:2])])
    assert set(output.matches) == set(TEXTS[:2])
    with pytest.raises(ModelError) as error:
        engine.run([ImageRequest(photos["rocket"], caption=False, probes=QUESTIONS[:1])])
    assert error.value.code == "model_not_loaded"
    assert engine.describe()["roles"]["itm"]["random"] is True


def test_timings_are_shares_of_the_stages(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded, max_caption_tokens=4)
    outputs = engine.run(
        [
            ImageRequest(photos["astronaut"], probes=QUESTIONS[:2], texts=TEXTS[:2]),
            ImageRequest(photos["chelsea"], caption=False, texts=TEXTS[:1]),
        ]
    )
    for output in outputs:
        assert tuple(output.timings) == STAGES
        assert all(seconds >= 0 for seconds in output.timings.values())
    assert outputs[0].timings["probes"] > 0 and outputs[1].timings["probes"] == 0
    assert outputs[1].timings["caption"] == 0 and outputs[1].timings["matches"] > 0


def test_token_cache_is_bounded(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded, token_cache_size=3)
    texts = [f"a photo of item number {n}" for n in range(10)]
    first = engine.run([ImageRequest(photos["coffee"], caption=False, texts=texts)])
    assert len(engine._token_cache) == 3
    again = engine.run([ImageRequest(photos["coffee"], caption=False, texts=texts)])
    assert first[0].matches == again[0].matches


def test_bfloat16_runs_close_to_float32(
    loaded: LoadedModels, tiny_models_dir: Path, photos: dict[str, Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_bf16 = load_models(
        "tiny-random", {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent, dtype="bfloat16"
    )
    requests = [ImageRequest(photos[name], probes=QUESTIONS, texts=TEXTS) for name in ("astronaut", "rocket")]
    engine = Engine(loaded_bf16, max_caption_tokens=4)
    fast = engine.run(requests)
    exact = Engine(loaded, max_caption_tokens=4).run(requests)
    diffs = []
    for low, high in zip(fast, exact, strict=True):
        assert low.caption is not None and len(low.caption_ids) <= 4
        diffs += [abs(low.probes[q] - high.probes[q]) for q in QUESTIONS]
        diffs += [abs(low.matches[t] - high.matches[t]) for t in TEXTS]
    # bfloat16 keeps 8 bits of mantissa: close to float32, not equal.
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.03
    assert max(diffs) > 0

    # The CPU's chunked bfloat16 attention gives the same numbers however it is chunked.
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 64)
    chunked = engine.run(requests)
    for small, large in zip(chunked, fast, strict=True):
        assert small.caption_ids == large.caption_ids
        for question in QUESTIONS:
            assert small.probes[question] == pytest.approx(large.probes[question], abs=1e-3)
        for text in TEXTS:
            assert small.matches[text] == pytest.approx(large.matches[text], abs=1e-3)


def test_engine_runs_fused_attention_on_its_own_models(tiny_models_dir: Path, loaded: LoadedModels) -> None:
    Engine(loaded)
    assert all(has_fused_attention(model.model) for model in loaded.models.values())
    plain = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent)
    Engine(plain, fused_attention=False)
    assert not has_fused_attention(plain.get("itm").model)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_parity_for_every_batch_size(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image], batch_size: int
) -> None:
    # Images with different numbers of checks and question lengths, in batches of every size.
    requests = [
        ImageRequest(photos["astronaut"], probes=QUESTIONS[:1], texts=TEXTS),
        ImageRequest(photos["chelsea"], probes=QUESTIONS, texts=TEXTS[:1]),
        ImageRequest(photos["coffee"], caption=False, probes=QUESTIONS[4:], texts=TEXTS[2:4]),
        ImageRequest(photos["rocket"], probes=QUESTIONS[2:4], texts=[]),
        ImageRequest(photos["astronaut"], caption=True, probes=[], texts=TEXTS[3:]),
    ]
    engine = Engine(loaded, max_caption_tokens=8, max_batch=batch_size)
    outputs = []
    for start in range(0, len(requests), batch_size):
        outputs += engine.run(requests[start : start + batch_size])
    _assert_same(outputs, requests, stock)
