"""Image embeddings per job: stored by the worker, searched for similar images, looked up in example sets.

Which jobs have one: every job whose models ran the ITM model anyway (its policy, or a shadow, has a match,
describe, tags or examples check), and every job that is an example of a set (an example upload), where the
worker has the ITM model loaded. The embedding is BLIP's image-text-contrastive image feature (the ITM model's
vision [CLS] through `vision_proj`, L2-normalised), taken from the vision pass the other checks already made.

One interface over both backends: on PostgreSQL the vectors are pgvector `vector`s and a similar-image search is
one exact `ORDER BY vector <=> :query` over the tenant's rows of the same model; on SQLite they are float32 bytes
and the same search is an exact numpy scan, in chunks. Example sets are small (a few thousand images): a worker
keeps each set's vectors as one numpy matrix per (tenant, set), reloaded when the set's `revision` moved.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Float, delete, update
from sqlmodel import Session, col, select

from core.tables import ExampleItem, ExampleSet, JobEmbedding
from core.vectors import Neighbour

MODEL_KEY_CHARS = 255
_SCAN_CHUNK = 4096  # rows per step of SQLite's exact scan


@dataclass(frozen=True)
class Similar:
    """A job whose image is near another's: its id and the cosine similarity."""

    job_id: str
    similarity: float


def model_key(source: str) -> str:
    """The name embeddings are stored under: the ITM weights they came from (a hub id or a directory)."""
    return source[-MODEL_KEY_CHARS:]


def normalised(vector: Sequence[float] | np.ndarray) -> np.ndarray:
    """The vector as float32 with unit length (a zero vector stays zero)."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def save(session: Session, job_id: str, tenant: str, model: str, vector: Sequence[float]) -> None:
    """Store (or replace) a job's embedding, and bump the sets the job is an example of (the caller commits)."""
    array = normalised(vector)
    row = session.get(JobEmbedding, job_id)
    if row is None:
        row = JobEmbedding(job_id=job_id, tenant=tenant, model=model, dim=int(array.size), vector=array)
    else:
        row.model, row.dim, row.vector = model, int(array.size), array
    session.add(row)
    bump_sets_of(session, [job_id])


def get(session: Session, job_id: str) -> JobEmbedding | None:
    return session.get(JobEmbedding, job_id)


def is_example(session: Session, job_id: str) -> bool:
    """True when the job is an item of some example set (its image must be embedded)."""
    return session.exec(select(ExampleItem.id).where(ExampleItem.job_id == job_id).limit(1)).first() is not None


def similar(session: Session, embedding: JobEmbedding, limit: int) -> list[Similar]:
    """The tenant's jobs whose images are nearest to `embedding` (same model), most similar first, itself left out."""
    if session.get_bind().dialect.name == "postgresql":
        distance = col(JobEmbedding.vector).op("<=>", return_type=Float())(normalised(embedding.vector))
        rows = session.exec(
            select(JobEmbedding.job_id, distance)
            .where(
                JobEmbedding.tenant == embedding.tenant,
                JobEmbedding.model == embedding.model,
                JobEmbedding.dim == embedding.dim,
                JobEmbedding.job_id != embedding.job_id,
            )
            .order_by(distance)
            .limit(limit)
        ).all()
        return [Similar(job_id, round(1.0 - float(d), 6)) for job_id, d in rows]
    return _scan(session, embedding, limit)


def bump_sets_of(session: Session, job_ids: Iterable[str]) -> None:
    """Move the revision of every set holding one of these jobs: workers reload those sets."""
    ids = list(job_ids)
    if not ids:
        return
    holding = select(ExampleItem.set_id).where(col(ExampleItem.job_id).in_(ids))
    session.execute(
        update(ExampleSet).where(col(ExampleSet.id).in_(holding)).values(revision=col(ExampleSet.revision) + 1)
    )


def erase(session: Session, job_id: str) -> int:
    """A job's embedding and its example-set memberships removed (the caller commits); how many memberships."""
    bump_sets_of(session, [job_id])
    removed = session.execute(delete(ExampleItem).where(col(ExampleItem.job_id) == job_id))
    session.execute(delete(JobEmbedding).where(col(JobEmbedding.job_id) == job_id))
    return int(getattr(removed, "rowcount", 0) or 0)


class ExampleIndex:
    """A worker's example sets in memory: per (tenant, set), one matrix of unit vectors, reloaded on change.

    Thread-safe. Sets are read per lookup (a revision check: one small query), never across tenants: the query
    is keyed by the job's tenant. Only examples embedded by the same model as the image vote.
    """

    def __init__(self) -> None:
        # set id -> (revision, model, job ids, labels, matrix)
        self._sets: dict[str, tuple[int, str, list[str], list[str], np.ndarray]] = {}
        self._lock = threading.Lock()

    def lookup(
        self,
        session: Session,
        tenant: str,
        queries: Iterable[tuple[str, int]],
        model: str,
        vector: Sequence[float],
        *,
        exclude: str | None = None,
    ) -> dict[str, tuple[Neighbour, ...]]:
        """For each (set name, k): the set's k examples nearest to `vector`, closest first, the job `exclude` left out
        (an example judged by a policy that votes with its own set must not vote for itself).

        A set the tenant does not have has no examples (a policy may name a set before it is created).
        """
        query = normalised(vector)
        found: dict[str, tuple[Neighbour, ...]] = {}
        for name, k in queries:
            example_set = session.exec(
                select(ExampleSet).where(ExampleSet.tenant == tenant, ExampleSet.name == name)
            ).first()
            if example_set is None:
                found[name] = ()
                continue
            ids, labels, matrix = self._matrix(session, example_set, model, query.size)
            found[name] = _nearest(ids, labels, matrix, query, k, exclude)
        return found

    def _matrix(
        self, session: Session, example_set: ExampleSet, model: str, dim: int
    ) -> tuple[list[str], list[str], np.ndarray]:
        with self._lock:
            cached = self._sets.get(example_set.id)
            if cached is not None and cached[0] == example_set.revision and cached[1] == model:
                return cached[2], cached[3], cached[4]
            rows = session.exec(
                select(ExampleItem.job_id, ExampleItem.label, JobEmbedding.vector)
                .join(JobEmbedding, col(JobEmbedding.job_id) == col(ExampleItem.job_id))
                .where(
                    ExampleItem.set_id == example_set.id,
                    JobEmbedding.model == model,
                    JobEmbedding.dim == dim,
                )
                .order_by(col(ExampleItem.job_id))
            ).all()
            ids = [job_id for job_id, _, _ in rows]
            labels = [label for _, label, _ in rows]
            matrix = (
                np.stack([normalised(vector) for _, _, vector in rows])
                if rows
                else np.zeros((0, dim), dtype=np.float32)
            )
            self._sets[example_set.id] = (example_set.revision, model, ids, labels, matrix)
            return ids, labels, matrix


def _nearest(
    ids: list[str], labels: list[str], matrix: np.ndarray, query: np.ndarray, k: int, exclude: str | None
) -> tuple[Neighbour, ...]:
    if exclude is not None and exclude in ids:
        keep = [i for i, job_id in enumerate(ids) if job_id != exclude]
        ids, labels, matrix = [ids[i] for i in keep], [labels[i] for i in keep], matrix[keep]
    if not ids:
        return ()
    similarity = matrix @ query
    k = min(k, len(ids))
    top = np.argpartition(-similarity, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
    order = sorted(top.tolist(), key=lambda i: (-float(similarity[i]), ids[i]))
    return tuple(Neighbour(ids[i], labels[i], round(float(similarity[i]), 6)) for i in order)


def _scan(session: Session, embedding: JobEmbedding, limit: int) -> list[Similar]:
    query = normalised(embedding.vector)
    best_ids: list[str] = []
    best_scores = np.zeros(0, dtype=np.float32)
    rows = session.exec(
        select(JobEmbedding.job_id, JobEmbedding.vector).where(
            JobEmbedding.tenant == embedding.tenant,
            JobEmbedding.model == embedding.model,
            JobEmbedding.dim == embedding.dim,
            JobEmbedding.job_id != embedding.job_id,
        )
    ).yield_per(_SCAN_CHUNK)
    chunk: list[tuple[str, np.ndarray]] = []

    def fold() -> None:
        nonlocal best_ids, best_scores
        ids = best_ids + [job_id for job_id, _ in chunk]
        scores = np.concatenate([best_scores, np.stack([vector for _, vector in chunk]) @ query])
        keep = np.argsort(-scores, kind="stable")[:limit]
        best_ids, best_scores = [ids[i] for i in keep], scores[keep]
        chunk.clear()

    for job_id, vector in rows:
        chunk.append((job_id, normalised(vector)))
        if len(chunk) >= _SCAN_CHUNK:
            fold()
    if chunk:
        fold()
    return [Similar(job_id, round(float(score), 6)) for job_id, score in zip(best_ids, best_scores, strict=True)]
