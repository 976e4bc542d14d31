"""The stock "tutorial way" of running BLIP: one processor call and one generate/forward per image, question and text.

The engine's yardstick: the parity tests compare the engine with these functions and `modtag bench`
times both on the same models, images and checks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from worker.families.blip.engine import ImageOutput, ImageRequest
from worker.families.blip.models import LoadedModel, LoadedModels


def run_baseline(
    models: LoadedModels,
    requests: Sequence[ImageRequest],
    *,
    max_caption_tokens: int = 30,
    min_caption_tokens: int = 0,
) -> list[ImageOutput]:
    """What the engine computes, the stock way: every call encodes its image again."""
    outputs = []
    for request in requests:
        output = ImageOutput(caption=None, probes={}, matches={}, timings={})
        started = time.perf_counter()
        if request.caption:
            ids, output.caption = caption(
                models.get("caption"),
                request.image,
                max_new_tokens=max_caption_tokens,
                min_new_tokens=min_caption_tokens,
            )
            output.caption_ids = tuple(ids[1:])  # without the bos, like the engine's
        output.timings["caption"] = time.perf_counter() - started
        started = time.perf_counter()
        for question in request.probes:
            output.probes[question] = probe(models.get("vqa"), request.image, question)
        output.timings["probes"] = time.perf_counter() - started
        started = time.perf_counter()
        for text in request.texts:
            output.matches[text] = match(models.get("itm"), request.image, text)
        output.timings["matches"] = time.perf_counter() - started
        outputs.append(output)
    return outputs


@torch.inference_mode()
def caption(
    loaded: LoadedModel, image: Image.Image, *, max_new_tokens: int = 30, min_new_tokens: int = 0
) -> tuple[list[int], str]:
    """`model.generate(**processor(images=image))`: the generated ids (with the bos) and the decoded caption."""
    inputs = _inputs(loaded, images=image)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    model: Any = loaded.model
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra)
    return generated[0].tolist(), loaded.processor.decode(generated[0], skip_special_tokens=True).strip()


@torch.inference_mode()
def probe(loaded: LoadedModel, image: Image.Image, question: str) -> float:
    """P(yes) for a yes/no question: softmax over the first generated step's logits of "yes" and "no"."""
    inputs = _inputs(loaded, images=image, text=question)
    model: Any = loaded.model
    generated = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    logits = generated.logits[0][0]
    tokenizer = loaded.processor.tokenizer
    yes_no = [tokenizer(answer, add_special_tokens=False)["input_ids"][0] for answer in ("yes", "no")]
    return float(logits[yes_no].float().softmax(dim=-1)[0])


@torch.inference_mode()
def match(loaded: LoadedModel, image: Image.Image, text: str) -> float:
    """P(the text describes the image) from the ITM head."""
    inputs = _inputs(loaded, images=image, text=text)
    model: Any = loaded.model
    itm_score = model(**inputs).itm_score
    return float(itm_score.float().softmax(dim=-1)[0, 1])


def _inputs(loaded: LoadedModel, **processor_kwargs: Any) -> dict[str, torch.Tensor]:
    features = loaded.processor(**processor_kwargs, return_tensors="pt")
    device, dtype = loaded.model.device, loaded.model.dtype
    return {
        name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for name, value in features.items()
    }
