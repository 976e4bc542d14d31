"""Image embeddings as a column type, and a nearest example as the policy domain reads it.

One column type over both backends: pgvector's `vector` on PostgreSQL (no fixed dimension: models differ,
256 for the BLIP base ITM model, a few dozen for the tiny test models; rows say which model and how many
dimensions), float32 bytes on SQLite. Python sees a float32 numpy array either way. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import LargeBinary
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class EmbeddingVector(TypeDecorator[np.ndarray]):
    """A float32 vector: pgvector's `vector` on PostgreSQL, little-endian float32 bytes elsewhere."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from pgvector.sqlalchemy import VECTOR

            return dialect.type_descriptor(VECTOR())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        vector = np.asarray(value, dtype="<f4").reshape(-1)
        return vector if dialect.name == "postgresql" else vector.tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, bytes | bytearray | memoryview):
            return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)
        return np.asarray(value, dtype=np.float32)


@dataclass(frozen=True)
class Neighbour:
    """One example of a set near an image: the example's job, its label, and the cosine similarity."""

    job_id: str
    label: str  # positive or negative
    similarity: float  # cosine similarity of the two embeddings, in [-1, 1]
