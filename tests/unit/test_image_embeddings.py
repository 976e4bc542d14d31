"""Image embeddings and example sets with the real (tiny random) BLIP models, on SQLite and PostgreSQL.

With random weights nothing is semantically near anything, so "near" is made by construction: the same photo
slightly brightened or cropped lands close to the original (cosine above 0.9 here), other photos far.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from sqlmodel import select

from core import embeddings, examples
from core.db import session_scope
from core.erasure import erase_job
from core.errors import InvalidField
from core.principals import system_principal
from core.tables import AuditEntry, ExampleItem, Job, JobEmbedding
from policies import ModelOutputs, decide
from policies.loader import load_policy_text
from tests.support.jobs import new_job
from worker.families.blip.engine import Engine, ImageRequest
from worker.families.blip.models import LoadedModels

POLICY = """
name: bags
description: counterfeit bags, taught by example
categories:
  - name: counterfeit
    description: looks like the tenant's known fakes
    review: 0.5
    block: 0.95
    checks:
      - kind: examples
        set: fakes
        k: 10
"""
MODEL = "tiny-itm"


def brighter(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


def cropped(image: Image.Image, margin: int) -> Image.Image:
    return image.crop((margin, margin, image.width - margin, image.height - margin))


def variants(image: Image.Image) -> list[Image.Image]:
    """Three near copies of `image`: what a set's examples of one kind look like to random weights."""
    return [image, brighter(image, 1.08), cropped(image, 8)]


def embed(engine: Engine, images: list[Image.Image]) -> list[tuple[float, ...]]:
    outputs = engine.run([ImageRequest(image, caption=False, embedding=True) for image in images])
    vectors = [output.embedding for output in outputs]
    assert all(vector is not None for vector in vectors)
    return [vector for vector in vectors if vector is not None]


def test_the_embedding_is_the_itc_image_feature_from_the_one_vision_pass(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    engine = Engine(loaded)
    calls: list[int] = []
    hook = loaded.get("itm").model.vision_model.register_forward_hook(  # type: ignore[union-attr]
        lambda _module, args, _output: calls.append(int(args[0].shape[0]) if args else 0)
    )
    try:
        outputs = engine.run(
            [
                ImageRequest(photos["chelsea"], caption=False, texts=["a photo of a cat"], embedding=True),
                ImageRequest(photos["rocket"], caption=False, embedding=True),
                ImageRequest(photos["coffee"], caption=False, texts=["a cup"]),
            ]
        )
    finally:
        hook.remove()
    assert len(calls) == 1  # one batched vision pass of the ITM model, shared by the texts and the embeddings
    assert outputs[2].embedding is None
    itm: Any = stock.get("itm")
    for output, name in zip(outputs[:2], ("chelsea", "rocket"), strict=True):
        pixels = itm.processor(images=photos[name], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = itm.model.vision_model(pixel_values=pixels).last_hidden_state
            expected = torch.nn.functional.normalize(itm.model.vision_proj(hidden[:, 0, :]), dim=-1)[0]
        assert output.embedding is not None
        assert np.allclose(output.embedding, expected.numpy(), atol=1e-4)
        assert abs(np.linalg.norm(output.embedding) - 1.0) < 1e-5


def test_an_image_near_three_positives_scores_above_one_near_the_negatives(
    loaded: LoadedModels, photos: dict[str, Image.Image], database_url: str
) -> None:
    engine = Engine(loaded)
    policy = load_policy_text(POLICY)
    positives = variants(photos["chelsea"])
    negatives = variants(photos["rocket"])
    vectors = embed(engine, [*positives, *negatives])
    admin = system_principal("default")
    with session_scope(database_url) as session:
        fakes = examples.create_set(session, admin, "fakes", "known counterfeit photos")
        ids = []
        for i, vector in enumerate(vectors):
            job_id = new_job(database_url)
            ids.append(job_id)
            label = examples.Label.POSITIVE if i < 3 else examples.Label.NEGATIVE
            job = session.get(Job, job_id)
            assert job is not None
            examples.add_item(session, admin, fakes, job, label)
            assert examples.counts(session, fakes).pending == 1  # no embedding yet: it does not vote
            embeddings.save(session, job_id, "default", MODEL, vector)
            session.commit()
        assert examples.counts(session, fakes) == examples.SetCounts(positive=3, negative=3, pending=0)

    index = embeddings.ExampleIndex()
    scored = {}
    for name, query in (
        ("near positives", brighter(photos["chelsea"], 0.95)),
        ("near negatives", brighter(photos["rocket"], 0.95)),
    ):
        (vector,) = embed(engine, [query])
        with session_scope(database_url) as session:
            found = index.lookup(session, "default", [("fakes", 10)], MODEL, vector)
        verdict = decide(policy, ModelOutputs(examples=found), {})
        (evidence,) = verdict.evidence
        scored[name] = evidence
    near_positives, near_negatives = scored["near positives"], scored["near negatives"]
    assert near_positives.score > 0.5 > near_negatives.score
    assert near_positives.field == "positive" and near_positives.matched in ids[:3]
    assert near_negatives.field == "negative" and near_negatives.matched in ids[3:]
    assert set(near_positives.scores or {}) == {f"positive:{i}" for i in ids[:3]} | {f"negative:{i}" for i in ids[3:]}

    # Another tenant's set of the same name is not this tenant's: it has no examples for it.
    with session_scope(database_url) as session:
        other = index.lookup(session, "other", [("fakes", 10)], MODEL, vectors[0])
        unknown = index.lookup(session, "default", [("nothing", 10)], MODEL, vectors[0])
        other_model = index.lookup(session, "default", [("fakes", 10)], "another-model", vectors[0])
    assert other == {"fakes": ()} and unknown == {"nothing": ()} and other_model == {"fakes": ()}
    assert decide(policy, ModelOutputs(examples=other), {}).evidence[0].score == 0.0


def test_erasure_removes_the_embedding_and_every_membership(
    loaded: LoadedModels, photos: dict[str, Image.Image], database_url: str, tmp_path: Any
) -> None:
    from core.blobs import LocalBlobStore

    engine = Engine(loaded)
    admin = system_principal("default")
    (vector, near) = embed(engine, [photos["coffee"], brighter(photos["coffee"], 1.05)])
    erased, kept = new_job(database_url), new_job(database_url)
    with session_scope(database_url) as session:
        for job_id, v in ((erased, vector), (kept, near)):
            embeddings.save(session, job_id, "default", MODEL, v)
        session.commit()
        index = embeddings.ExampleIndex()
        for name in ("cups", "mugs"):
            example_set = examples.create_set(session, admin, name, None)
            for job_id in (erased, kept):
                job = session.get(Job, job_id)
                examples.add_item(session, admin, example_set, job, examples.Label.POSITIVE)
        assert [n.job_id for n in index.lookup(session, "default", [("cups", 5)], MODEL, vector)["cups"]] == [
            erased,
            kept,
        ]
        target = embeddings.get(session, kept)
        assert target is not None
        assert [s.job_id for s in embeddings.similar(session, target, 5)] == [erased]

        job = session.get(Job, erased)
        erase_job(session, LocalBlobStore(tmp_path), job, admin)
    with session_scope(database_url) as session:
        assert session.get(JobEmbedding, erased) is None
        assert session.exec(select(ExampleItem).where(ExampleItem.job_id == erased)).all() == []
        # The workers' cached sets moved on: the erased example no longer votes, the other one does.
        assert [n.job_id for n in index.lookup(session, "default", [("cups", 5)], MODEL, vector)["cups"]] == [kept]
        target = embeddings.get(session, kept)
        assert target is not None and embeddings.similar(session, target, 5) == []
        entry = session.exec(select(AuditEntry).where(AuditEntry.action == "job.erase")).one()
        assert entry.after is not None and entry.after["examples_left"] == 2


@pytest.mark.parametrize(
    ("label", "ok"), [("positive", True), ("negative", True), ("Positive", False), ("", False), ("x" * 10_000, False)]
)
def test_labels_are_positive_or_negative(label: str, ok: bool) -> None:
    if ok:
        assert examples.parse_label(label).value == label
    else:
        with pytest.raises(InvalidField) as raised:
            examples.parse_label(label)
        assert raised.value.code == "example_label_invalid" and len(raised.value.message) < 200
