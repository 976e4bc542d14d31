"""Greedy caption decoding with absorbed cross-attention: token for token what stock `generate` returns.

Random BERT-style weights have zero biases, which would hide a mistake in the folded key and value
biases: the models here get random biases first, the same in both copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from worker.families.blip.captioning import _FixedSteps, greedy_captions, plain_greedy
from worker.families.blip.engine import Engine, ImageRequest
from worker.families.blip.models import LoadedModels, load_models

EOS, PAD = 102, 0


def _with_biases(tiny_models_dir: Path) -> LoadedModels:
    loaded = load_models("tiny-random", {"caption"}, cache_dir=tiny_models_dir.parent)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in loaded.get("caption").model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return loaded


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path) -> tuple[Any, Any]:
    """(decoder for greedy_captions, the stock caption model): two copies of the same biased weights."""
    return _with_biases(tiny_models_dir).get("caption").model, _with_biases(tiny_models_dir).get("caption").model


def _stock(model: Any, embeds: torch.Tensor, max_new: int, min_new: int) -> torch.Tensor:
    bos = torch.full((embeds.shape[0], 1), model.config.text_config.bos_token_id)
    extra = {"min_new_tokens": min_new} if min_new else {}
    with torch.inference_mode():
        generated: torch.Tensor = model.text_decoder.generate(
            input_ids=bos,
            eos_token_id=EOS,
            pad_token_id=PAD,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
            max_new_tokens=max_new,
            **extra,
        )
    return generated[:, 1:]


def _greedy(model: Any, embeds: torch.Tensor, max_new: int, min_new: int, fixed: bool = False) -> torch.Tensor:
    bos = model.config.text_config.bos_token_id
    return greedy_captions(
        model.text_decoder,
        embeds,
        bos=bos,
        eos=EOS,
        pad=PAD,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        fixed_steps=fixed,
    )


def _image_embeds(model: Any, images: int, seed: int) -> torch.Tensor:
    pixels = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        embeds: torch.Tensor = model.vision_model(pixel_values=pixels).last_hidden_state
    return embeds


@pytest.mark.parametrize(("images", "max_new", "min_new"), [(1, 6, 0), (3, 12, 0), (4, 9, 9), (5, 7, 3)])
def test_tokens_equal_stock_generate(models: tuple[Any, Any], images: int, max_new: int, min_new: int) -> None:
    ours, stock = models
    embeds = _image_embeds(stock, images, seed=images)
    assert torch.equal(_greedy(ours, embeds, max_new, min_new), _stock(stock, embeds, max_new, min_new))


@pytest.mark.parametrize(("images", "max_new", "min_new"), [(1, 6, 0), (3, 12, 0), (4, 9, 9), (5, 7, 3)])
def test_fixed_shape_steps_equal_stock_generate(
    models: tuple[Any, Any], images: int, max_new: int, min_new: int
) -> None:
    # The steps CUDA replays as a graph, run eagerly on the CPU: the same tokens as stock generate (3 and 5
    # images run padded to 4 and 8 rows, the padding finished from the start).
    ours, stock = models
    embeds = _image_embeds(stock, images, seed=images)
    assert torch.equal(_greedy(ours, embeds, max_new, min_new, fixed=True), _stock(stock, embeds, max_new, min_new))


def test_a_fixed_step_never_waits_for_the_host(models: tuple[Any, Any]) -> None:
    # A CUDA graph cannot hold an operation that reads a device value on the host or whose output shape
    # depends on the data; capturing needs a GPU, but the operations a step dispatches can be listed here.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dispatched(TorchDispatchMode):
        names: set[str] = set()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    ours, stock = models
    embeds = _image_embeds(stock, 2, seed=3)
    ids = (ours.config.text_config.bos_token_id, EOS, PAD)
    rows, image_tokens, width = embeds.shape
    state = _FixedSteps(ours.text_decoder, (rows, image_tokens, width), embeds.device, ids, 6, 2)
    with torch.inference_mode():
        state.start(embeds)
        with Dispatched() as dispatched:
            state.step()
            state.step()
    host_reads = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.item"}
    assert "aten.index_copy_" in dispatched.names  # the cache written in place, at the step held in a tensor
    assert not dispatched.names & host_reads
    # Its state moved on in the tensors themselves: the step number and the tokens written so far.
    assert int(state.step_index) == 2 and not bool((state.generated[:, :2] == PAD).all())


@pytest.mark.slow
def test_end_token_rules_and_padding_match_stock(models: tuple[Any, Any]) -> None:
    # Raising the end token's bias makes rows end, at different steps, once min_new_tokens allows it:
    # the tokens after each row's end are the pad, and decoding stops when every row has ended.
    ours, stock = models
    embeds = _image_embeds(stock, 6, seed=1)
    lengths_seen = set()
    original = [m.text_decoder.cls.predictions.bias[EOS].item() for m in models]
    try:
        for shift in (1.0, 2.0, 3.0, 4.0, 6.0, 9.0):
            for model, base in zip(models, original, strict=True):
                with torch.no_grad():
                    model.text_decoder.cls.predictions.bias[EOS] = base + shift
            for min_new in (0, 2):
                got, expected = _greedy(ours, embeds, 10, min_new), _stock(stock, embeds, 10, min_new)
                assert torch.equal(got, expected), (shift, min_new)
                # The fixed-shape steps stop where every row has ended too, whatever step they look at that.
                assert torch.equal(_greedy(ours, embeds, 10, min_new, fixed=True), expected), (shift, min_new)
                ends = [row.tolist().index(EOS) if EOS in row.tolist() else None for row in got]
                assert all(end is None or end >= min_new for end in ends)
                lengths_seen.add(tuple(ends))
    finally:
        for model, base in zip(models, original, strict=True):
            with torch.no_grad():
                model.text_decoder.cls.predictions.bias[EOS] = base
    # The comparison covered a batch whose rows end at different steps, one never.
    assert any(None in ends and len({end for end in ends if end is not None}) > 1 for ends in lengths_seen)


def test_plain_greedy_recognises_settings_that_change_the_tokens() -> None:
    assert plain_greedy(GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=20))
    for change in ({"repetition_penalty": 1.3}, {"num_beams": 3}, {"do_sample": True}, {"min_length": 4}):
        assert not plain_greedy(GenerationConfig(**change)), change
    assert not plain_greedy(GenerationConfig(no_repeat_ngram_size=2))


def test_engine_falls_back_to_generate_for_other_settings(tiny_models_dir: Path) -> None:
    fast, stock = _with_biases(tiny_models_dir), _with_biases(tiny_models_dir)
    for loaded in (fast, stock):
        decoder: Any = loaded.get("caption").model
        decoder.text_decoder.generation_config.repetition_penalty = 1.5
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    [output] = Engine(fast, max_caption_tokens=8).run([ImageRequest(image)])
    processor = stock.get("caption").processor
    model: Any = stock.get("caption").model
    with torch.inference_mode():
        expected = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=8)
    ids = expected[0, 1:].tolist()
    assert list(output.caption_ids) == (ids[: ids.index(EOS) + 1] if EOS in ids else ids)
