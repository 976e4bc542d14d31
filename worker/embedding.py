"""The worker's image-embedding step: which jobs get an embedding, storing it, and example-set lookups with it.

A job gets its image embedded when this worker has the ITM model loaded and the job runs that model anyway (a
match, describe, tags or examples check of its policy or a shadow: the embedding then costs one small
projection of the vision pass already made) or is an example of a set (an upload to a set: its embedding is
what the set needs). The embedding is stored before the decision, under the job row's lock, and never for an
erased job (core/embeddings.py). A decision reused from an identical earlier upload copies that job's embedding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from core import embeddings
from core.db import session_scope
from core.settings import Settings
from core.tables import Job, utcnow
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability

# The capabilities that run the ITM model (the BLIP family's `itm` role): with any of them loaded, so is the model.
ITM_CAPABILITIES = frozenset({Capability.TEXT_MATCH, Capability.TAGS, Capability.IMAGE_EMBEDDING})


class EmbeddingStep:
    """Per worker process: what to embed, and the example sets' cached index (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.resolved_database_url
        self.index = embeddings.ExampleIndex()

    def needs_for(self, job: Job, needs: Requirements, loaded: frozenset[Capability]) -> Requirements:
        """`needs`, asking for the image embedding too where this job gets one (see the module's docstring)."""
        if needs.embedding or not loaded & ITM_CAPABILITIES:
            return needs
        if needs.model_capabilities & ITM_CAPABILITIES:
            return replace(needs, embedding=True)
        with session_scope(self._url) as session:
            example = embeddings.is_example(session, job.id)
        return replace(needs, embedding=True) if example else needs

    def after_inference(
        self, job: Job, needs: Requirements, outputs: ModelOutputs, models: dict[str, Any]
    ) -> ModelOutputs:
        """Store the job's embedding; `outputs` with the nearest examples of the sets its checks name."""
        vector = outputs.embedding
        if vector is None:
            return outputs
        model = embeddings.model_key(str(models.get("roles", {}).get("itm", {}).get("source", "itm")))
        with session_scope(self._url) as session:
            found = self.index.lookup(
                session, job.tenant, [(q.set, q.k) for q in needs.examples], model, vector, exclude=job.id
            )
            # The job row first, on condition (as every write of a job's content): an erasure meanwhile wins.
            taken = session.execute(
                update(Job).where(col(Job.id) == job.id, col(Job.erased_at).is_(None)).values(updated_at=utcnow())
            )
            if getattr(taken, "rowcount", 0) == 1:
                embeddings.save(session, job.id, job.tenant, model, vector)
            session.commit()
        return outputs.merged(ModelOutputs(examples=found)) if found else outputs

    def copy_reused(self, job: Job, earlier_job_id: str) -> None:
        """A reused decision's job gets the earlier identical image's embedding, when it has one."""
        with session_scope(self._url) as session:
            earlier = embeddings.get(session, earlier_job_id)
            if earlier is None:
                return
            taken = session.execute(
                update(Job).where(col(Job.id) == job.id, col(Job.erased_at).is_(None)).values(updated_at=utcnow())
            )
            if getattr(taken, "rowcount", 0) == 1:
                embeddings.save(session, job.id, job.tenant, earlier.model, earlier.vector)
            session.commit()
