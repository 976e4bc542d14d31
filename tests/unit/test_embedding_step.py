"""Which jobs the worker embeds, and what it stores (worker/embedding.py), on SQLite and PostgreSQL.

The step is driven with ModelOutputs as the BLIP family returns them (the engine's embeddings themselves are
tested against the stock model in test_image_embeddings.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import update
from sqlmodel import col

from core import embeddings, examples
from core.db import session_scope
from core.principals import system_principal
from core.settings import Settings
from core.tables import Job, utcnow
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability
from policies.requirements import ExampleQuery
from tests.support.jobs import new_job, stored
from worker.embedding import EmbeddingStep

ITM_LOADED = frozenset({Capability.TEXT_MATCH, Capability.YES_NO, Capability.IMAGE_EMBEDDING})
VQA_ONLY = frozenset({Capability.YES_NO})
MODELS = {"roles": {"itm": {"source": "/models/tiny-random/itm"}}}


def step_for(database_url: str, tmp_path: Path) -> EmbeddingStep:
    return EmbeddingStep(Settings(_env_file=None, data_dir=tmp_path, database_url=database_url))


def test_which_jobs_are_embedded(database_url: str, tmp_path: Path) -> None:
    step = step_for(database_url, tmp_path)
    plain, example = stored(database_url, new_job(database_url)), stored(database_url, new_job(database_url))
    with session_scope(database_url) as session:
        example_set = examples.create_set(session, system_principal("default"), "fakes", None)
        job = session.get(Job, example.id)
        assert job is not None
        examples.add_item(session, system_principal("default"), example_set, job, examples.Label.POSITIVE)
    matches = Requirements(caption=False, probes=(), texts=("a photo of a gun",))
    probes = Requirements(caption=False, probes=("is there a gun?",), texts=())
    voting = Requirements(caption=False, probes=(), texts=(), examples=(ExampleQuery("fakes", 5),))

    assert step.needs_for(plain, matches, ITM_LOADED).embedding  # the ITM model runs anyway: free
    assert not step.needs_for(plain, probes, ITM_LOADED).embedding  # it would cost an ITM vision pass
    assert step.needs_for(example, probes, ITM_LOADED).embedding  # an example needs its embedding
    assert not step.needs_for(example, probes, VQA_ONLY).embedding  # no ITM model in this worker
    assert step.needs_for(plain, voting, ITM_LOADED).capabilities >= {Capability.IMAGE_EMBEDDING}


def test_the_embedding_is_stored_unless_the_job_was_erased_and_a_reuse_copies_it(
    database_url: str, tmp_path: Path
) -> None:
    step = step_for(database_url, tmp_path)
    vector = tuple(float(x) for x in np.linspace(-1, 1, 32))
    needs = Requirements(caption=False, probes=(), texts=("t",), embedding=True)
    first, reused, erased = (stored(database_url, new_job(database_url)) for _ in range(3))
    outputs = step.after_inference(first, needs, ModelOutputs(embedding=vector), MODELS)
    assert outputs.examples == {}
    with session_scope(database_url) as session:
        row = embeddings.get(session, first.id)
        assert row is not None and row.model == "/models/tiny-random/itm" and row.dim == 32
        assert np.allclose(row.vector, np.array(vector) / np.linalg.norm(vector), atol=1e-6)

    step.copy_reused(reused, first.id)
    with session_scope(database_url) as session:
        copy = embeddings.get(session, reused.id)
        assert copy is not None and np.array_equal(copy.vector, row.vector)
        session.execute(update(Job).where(col(Job.id) == erased.id).values(erased_at=utcnow()))
        session.commit()
    step.after_inference(erased, needs, ModelOutputs(embedding=vector), MODELS)
    step.copy_reused(erased, first.id)
    with session_scope(database_url) as session:
        assert embeddings.get(session, erased.id) is None  # nothing of an erased job is written back


def test_the_nearest_examples_come_back_without_the_job_itself(database_url: str, tmp_path: Path) -> None:
    step = step_for(database_url, tmp_path)
    admin = system_principal("default")
    ids = [new_job(database_url) for _ in range(3)]
    basis = np.eye(8, dtype=np.float32)
    with session_scope(database_url) as session:
        example_set = examples.create_set(session, admin, "fakes", None)
        for job_id, label, vector in zip(
            ids, ("positive", "positive", "negative"), (basis[0], basis[0] + basis[1] * 0.2, basis[2]), strict=True
        ):
            embeddings.save(session, job_id, "default", "/models/tiny-random/itm", vector)
            job = session.get(Job, job_id)
            assert job is not None
            examples.add_item(session, admin, example_set, job, examples.Label(label))
    needs = Requirements(caption=False, probes=(), texts=(), examples=(ExampleQuery("fakes", 2),))
    itself = stored(database_url, ids[0])
    outputs = step.after_inference(itself, needs, ModelOutputs(embedding=tuple(basis[0].tolist())), MODELS)
    assert [(n.job_id, n.label) for n in outputs.examples["fakes"]] == [(ids[1], "positive"), (ids[2], "negative")]
