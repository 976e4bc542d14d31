"""Listing checks through the real (tiny random) models: answer ranking and tags equal the stock calls.

The engine installs fused attention on the models it is given, so the stock calls run on a second,
separately loaded copy (`stock`) that no engine ever touches.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from PIL import Image

from worker.families.blip.engine import AnswerRequest, Engine, ImageRequest, TagQuery
from worker.families.blip.models import LoadedModel, LoadedModels

TOLERANCE = 1e-4
COLOURS = (
    "red",
    "blue",
    "green",
    "off-white",
    "navy blue",
    "multicolor",
    "transparent",
    "ünïcödé ✓",
)
TAGS = ("a photo of a mug", "a photo of a cat", "a photo of a rocket", "a photo of a red item",
        "a photo of a blue item", "an item made of wood", "an item made of glass", "a photo of a person")  # fmt: skip
GROUPS = (0, 0, 0, 1, 1, 2, 2, 0)


def model_of(loaded: LoadedModels, role: Any) -> Any:
    return loaded.get(role).model


def stock_answer(vqa: LoadedModel, image: Image.Image, question: str, answer: str) -> float:
    """log P(answer) as BlipForQuestionAnswering composes its modules: vision, question encoder, answer decoder."""
    model: Any = vqa.model
    inputs = vqa.processor(images=image, text=question, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        states = model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        pieces = vqa.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        text = model.config.text_config
        logits = model.text_decoder(
            input_ids=torch.tensor([[text.bos_token_id, *pieces]]),
            encoder_hidden_states=states,
        ).logits
    log_probs = logits[0].log_softmax(dim=-1)
    return float(sum(log_probs[i, t] for i, t in enumerate([*pieces, text.sep_token_id])))


def stock_itc(itm: LoadedModel, image: Image.Image, texts: tuple[str, ...]) -> list[float]:
    inputs = itm.processor(images=image, text=list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        pixel_values = inputs["pixel_values"][:1]
        output = itm.model(  # type: ignore[operator]
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values,
            use_itm_head=False,
        )  # fmt: skip
    return [float(x) for x in output.itm_score[0]]


def stock_itm(itm: LoadedModel, image: Image.Image, text: str) -> float:
    inputs = itm.processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        output = itm.model(**inputs)  # type: ignore[operator]
    return float(output.itm_score.softmax(dim=-1)[0, 1])


def test_answer_log_likelihoods_equal_the_stock_decoder(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    engine = Engine(loaded, answer_budget=len(COLOURS))
    colour = AnswerRequest("c", "what color is the item?", COLOURS, ("blue",))
    count = AnswerRequest("n", "how many?", ("1", "2", "3"), ("2",))
    requests = [
        ImageRequest(
            photos["chelsea"],
            caption=False,
            probes=["is there a cat?"],
            answers=[colour, count],
        ),
        ImageRequest(photos["coffee"], caption=False, answers=[colour]),
    ]
    outputs = engine.run(requests)
    for output, request in zip(outputs, requests, strict=True):
        for answer in request.answers:
            ranked = output.answers[answer.key]
            assert set(ranked) == set(answer.candidates)  # the budget covers every candidate
            for candidate, value in ranked.items():
                expected = stock_answer(stock.get("vqa"), request.image, answer.question, candidate)
                assert abs(value - expected) <= TOLERANCE, (answer.question, candidate)
    assert outputs[0].probes.keys() == {"is there a cat?"}  # answer questions are not reported as probes
    assert outputs[0].answers["c"] != outputs[1].answers["c"]  # different images, different rankings
    assert outputs[0].timings["answers"] > 0 and outputs[1].timings["answers"] > 0


def test_answer_pruning_keeps_the_claim_and_the_best(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    candidates = tuple(f"colour{i}" for i in range(30)) + COLOURS
    engine = Engine(loaded, answer_budget=5)
    request = ImageRequest(
        photos["rocket"],
        caption=False,
        answers=[AnswerRequest("k", "what color?", candidates, ("transparent",))],
    )
    [output] = engine.run([request])
    ranked = output.answers["k"]
    assert "transparent" in ranked and len(ranked) <= 5
    for candidate, value in ranked.items():
        assert abs(value - stock_answer(stock.get("vqa"), photos["rocket"], "what color?", candidate)) <= TOLERANCE


def test_answer_ranking_stops_once_nothing_left_can_win(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded, answer_budget=100)
    calls: list[int] = []
    score = engine._score_answers

    def counting(rows: list[Any]) -> list[float]:
        calls.append(len(rows))
        return score(rows)

    engine._score_answers = counting  # type: ignore[method-assign]
    many = tuple(f"answer {i}" for i in range(40))
    [output] = engine.run(
        [
            ImageRequest(
                photos["coffee"],
                caption=False,
                answers=[AnswerRequest("k", "what?", many)],
            )
        ]
    )
    ranked = output.answers["k"]
    best = max(ranked.values())
    # Every candidate left out is bounded by its first piece's log-probability, itself below the best.
    assert len(ranked) == sum(calls) and calls[0] == 8
    assert all(value <= 0 for value in ranked.values()) and math.isfinite(best)


def test_tags_rank_by_itc_and_rescore_with_itm(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    engine = Engine(loaded)
    query = TagQuery("t", TAGS, GROUPS, top_k=2)
    requests = [
        ImageRequest(photos[name], caption=False, texts=["a photo of a cat"], tags=[query])
        for name in ("chelsea", "rocket")
    ]
    outputs = engine.run(requests)
    for output, request in zip(outputs, requests, strict=True):
        similarity = stock_itc(stock.get("itm"), request.image, TAGS)
        expected: set[str] = set()
        for group in sorted(set(GROUPS)):
            members = [i for i, g in enumerate(GROUPS) if g == group]
            expected |= {TAGS[i] for i in sorted(members, key=lambda i: -similarity[i])[:2]}
        scored = output.tags["t"]
        assert set(scored) == expected  # the top 2 of each group by ITC (group 2 has only 2)
        for text, value in scored.items():
            assert abs(value - stock_itm(stock.get("itm"), request.image, text)) <= TOLERANCE, text
        assert (
            abs(output.matches["a photo of a cat"] - stock_itm(stock.get("itm"), request.image, "a photo of a cat"))
            <= TOLERANCE
        )
    assert outputs[0].timings["tags"] > 0
    # The text features are cached by key: a second call does not run the text encoder over the tags again.
    runs: list[int] = []
    hook = model_of(loaded, "itm").text_encoder.register_forward_hook(
        lambda m, a, k, o: runs.append(1), with_kwargs=True
    )
    try:
        engine.run(requests[:1])
    finally:
        hook.remove()
    assert len(runs) == 1  # only the ITM pass over the re-ranked texts


def test_listing_requests_add_no_vision_passes(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    calls: list[str] = []
    handles = [
        model_of(loaded, role).vision_model.register_forward_hook(lambda m, a, o, role=role: calls.append(role))
        for role in ("vqa", "itm")
    ]
    try:
        Engine(loaded).run(
            [
                ImageRequest(
                    photos[name],
                    caption=False,
                    probes=["is it red?"],
                    texts=["a red mug"],
                    answers=[AnswerRequest("c", "what color?", COLOURS, ("red",))],
                    tags=[TagQuery("t", TAGS, GROUPS, 3)],
                )
                for name in ("chelsea", "coffee")
            ]
        )
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == [
        "itm",
        "vqa",
    ]  # one batched vision pass per model for both images


def test_bad_requests_are_refused(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded)
    with pytest.raises(ValueError):
        engine.run([ImageRequest(photos["coffee"], answers=[AnswerRequest("k", "q?", ("a",), ("b",))])])
    with pytest.raises(ValueError):
        engine.run([ImageRequest(photos["coffee"], tags=[TagQuery("t", ("a", "b"), (0,), 1)])])
    with pytest.raises(TypeError):
        engine.run([ImageRequest(photos["coffee"], answers=[("q?", ("a",))])])  # type: ignore[list-item]
    # An answer that tokenizes to nothing cannot be scored; the others still are.
    [output] = engine.run(
        [
            ImageRequest(
                photos["coffee"],
                caption=False,
                answers=[AnswerRequest("k", "q?", ("", "red"))],
            )
        ]
    )
    assert set(output.answers["k"]) == {"red"}
