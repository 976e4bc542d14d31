"""`modtag bench --examples N`: what an embedding lookup costs per image against 1,000 ... N stored embeddings.

Synthetic unit vectors of the base ITM model's dimension (256) stand in for stored image embeddings, in groups
of `CLUSTER` near one another (variants of one product or scene: real embeddings are clustered, and uniformly
random ones would be the one case no approximate index handles); each query is a new member of a stored
vector's group. Timed per image, best of `repeat` rounds, at each size of 1,000, 100,000, 1,000,000 up to N
(and N itself):

- `memory_exact`: the worker's example-set index, one numpy matrix in memory (core/embeddings.py ExampleIndex);
- `sqlite_exact`: a similar-image search on SQLite, float32 blobs read from the database and scanned in numpy;
- `pgvector_exact`: `ORDER BY vector <=> q LIMIT k` on PostgreSQL without an index (a full scan);
- `pgvector_hnsw`: the same query on an HNSW index (`vector_cosine_ops`, m 16, ef_construction 64, ef_search 40),
  with its recall@k against the exact answers.

PostgreSQL is `database_url` when given, else a pgserver instance in a temporary directory (pgserver ships the
vector extension). The vectors go into the bench's own tables (`bench_embeddings`), dropped afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from tqdm import tqdm

DIM = 256
SIZES = (1_000, 100_000, 1_000_000)
_INSERT_CHUNK = 5_000
CLUSTER = 20  # stored vectors per group of near ones
NOISE = 0.5


@dataclass(frozen=True)
class ExamplesBenchOptions:
    largest: int
    queries: int = 50
    k: int = 10
    repeat: int = 3
    dim: int = DIM
    database_url: str | None = None
    progress: bool = True
    seed: int = 0


def bench_sizes(largest: int) -> list[int]:
    """1,000, 100,000 and 1,000,000 up to `largest`, and `largest` itself."""
    return sorted({size for size in SIZES if size <= largest} | {largest})


def run_examples_bench(options: ExamplesBenchOptions) -> dict[str, Any]:
    rng = np.random.default_rng(options.seed)
    largest = options.largest
    say = _Progress(options.progress)
    say(f"{largest:,} random unit vectors of {options.dim} dimensions")
    centres = _unit(rng.standard_normal((largest // CLUSTER + 1, options.dim), dtype=np.float32))
    vectors = _unit(centres[np.arange(largest) // CLUSTER] + _noise(rng, largest, options.dim))
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="modtag-bench-examples-") as scratch,
        _postgres(options.database_url, scratch) as pg_url,
    ):
        os.chmod(scratch, 0o755)
        for size in bench_sizes(largest):
            stored = vectors[:size]
            picks = rng.integers(0, size, options.queries) // CLUSTER
            queries = _unit(centres[picks] + _noise(rng, options.queries, options.dim))
            say(f"{size:,} embeddings: in memory")
            exact = [_top_k(stored, query, options.k) for query in queries]
            row: dict[str, Any] = {"size": size, "k": options.k, "queries": options.queries}
            row["memory_exact_ms"] = _best(options.repeat, partial(_top_k_all, stored, queries, options.k))
            say(f"{size:,} embeddings: SQLite")
            row["sqlite_exact_ms"], row["sqlite_load_s"] = _sqlite(scratch, stored, queries, options)
            say(f"{size:,} embeddings: PostgreSQL (pgvector, exact and HNSW)")
            row.update(_pgvector(pg_url, stored, queries, exact, options, say))
            for key in ("memory_exact_ms", "sqlite_exact_ms"):
                row[key] = round(row[key] / options.queries * 1000, 3)
            rows.append(row)
    return {"dim": options.dim, "k": options.k, "queries": options.queries, "results": rows}


def format_examples_report(report: dict[str, Any]) -> str:
    lines = [
        f"Embedding lookups, {report['dim']} dimensions, k={report['k']}, ms per image (best of the rounds):",
        f"{'stored':>10} {'memory':>9} {'SQLite':>9} {'pg exact':>9} {'pg HNSW':>9} {'recall':>7} {'HNSW build':>11}",
    ]
    for row in report["results"]:
        lines.append(
            f"{row['size']:>10,} {row['memory_exact_ms']:>9.3f} {row['sqlite_exact_ms']:>9.3f} "
            f"{row['pgvector_exact_ms']:>9.3f} {row['pgvector_hnsw_ms']:>9.3f} {row['hnsw_recall']:>7.3f} "
            f"{row['hnsw_build_s']:>10.1f}s"
        )
    return "\n".join(lines)


def nearest_ids(stored: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """The exact k nearest by cosine similarity (unit vectors), as the worker's index ranks them."""
    return _top_k(stored, query, k)


def _top_k_all(stored: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    return [_top_k(stored, query, k) for query in queries]


def _top_k(stored: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    similarity = stored @ query
    k = min(k, len(stored))
    top = np.argpartition(-similarity, k - 1)[:k]
    return [int(i) for i in top[np.argsort(-similarity[top], kind="stable")]]


def _sqlite(
    scratch: str, stored: np.ndarray, queries: np.ndarray, options: ExamplesBenchOptions
) -> tuple[float, float]:
    # The similar-image search on SQLite: every query reads the float32 blobs and scans them (core/embeddings.py).
    path = os.path.join(scratch, f"bench-{len(stored)}.db")
    connection = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        connection.execute("CREATE TABLE bench_embeddings (id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        for start in range(0, len(stored), _INSERT_CHUNK):
            chunk = stored[start : start + _INSERT_CHUNK]
            connection.executemany(
                "INSERT INTO bench_embeddings VALUES (?, ?)",
                ((start + i, row.tobytes()) for i, row in enumerate(chunk)),
            )
        connection.commit()
        load_s = time.perf_counter() - started
        # Each query reads every row (1 GB at 1e6): a few queries are enough for the figure at the larger sizes.
        sample = queries[: max(2, min(len(queries), 500_000 // max(len(stored), 1)))]

        def scan() -> None:
            for query in sample:
                best: list[tuple[float, int]] = []
                cursor = connection.execute("SELECT id, vector FROM bench_embeddings")
                while batch := cursor.fetchmany(4096):
                    matrix = np.frombuffer(b"".join(blob for _, blob in batch), dtype="<f4").reshape(len(batch), -1)
                    scores = matrix @ query
                    best.extend((float(scores[i]), batch[i][0]) for i in np.argsort(-scores)[: options.k])
                    best = sorted(best, reverse=True)[: options.k]

        per_query = _best(options.repeat, scan) / len(sample)
        return per_query * len(queries), round(load_s, 2)
    finally:
        connection.close()


def _pgvector(
    url: str,
    stored: np.ndarray,
    queries: np.ndarray,
    exact: list[list[int]],
    options: ExamplesBenchOptions,
    say: Callable[[str], None],
) -> dict[str, Any]:
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(connection)
        connection.execute("DROP TABLE IF EXISTS bench_embeddings")
        connection.execute(f"CREATE TABLE bench_embeddings (id bigint PRIMARY KEY, vector vector({options.dim}))")
        started = time.perf_counter()
        with (
            connection.cursor() as cursor,
            cursor.copy("COPY bench_embeddings (id, vector) FROM STDIN WITH (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int8", "vector"])
            for i, row in enumerate(
                tqdm(stored, disable=not options.progress, desc="COPY", leave=False, file=sys.stderr)
            ):
                copy.write_row((i, row))
        connection.execute("ANALYZE bench_embeddings")
        load_s = time.perf_counter() - started
        query_sql = "SELECT id FROM bench_embeddings ORDER BY vector <=> %s LIMIT %s"

        def run(limit: int) -> list[list[int]]:
            return [[int(r[0]) for r in connection.execute(query_sql, (q, limit)).fetchall()] for q in queries]

        exact_s = _best(options.repeat, lambda: run(options.k))
        say(f"{len(stored):,} embeddings: building the HNSW index")
        # The graph must fit in maintenance_work_mem, or the build slows down many times (pgvector's advice).
        connection.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        connection.execute(
            "CREATE INDEX bench_embeddings_hnsw ON bench_embeddings USING hnsw (vector vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 64)"
        )
        build_s = time.perf_counter() - started
        connection.execute("SET hnsw.ef_search = 40")
        approximate: list[list[int]] = []

        def hnsw() -> None:
            approximate[:] = run(options.k)

        hnsw_s = _best(options.repeat, hnsw)
        found = sum(len(set(got) & set(want)) for got, want in zip(approximate, exact, strict=True))
        connection.execute("DROP TABLE bench_embeddings")
    count = len(queries)
    return {
        "pgvector_load_s": round(load_s, 2),
        "pgvector_exact_ms": round(exact_s / count * 1000, 3),
        "pgvector_hnsw_ms": round(hnsw_s / count * 1000, 3),
        "hnsw_build_s": round(build_s, 2),
        "hnsw_recall": round(found / sum(len(want) for want in exact), 4),
    }


@contextmanager
def _postgres(url: str | None, scratch: str) -> Iterator[str]:
    if url:
        yield url
        return
    import pgserver  # type: ignore[import-untyped]

    data = tempfile.mkdtemp(prefix="modtag-bench-pg-")
    os.chmod(data, 0o777)  # pgserver runs PostgreSQL as its own user when started by root
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def _best(repeat: int, work: Callable[[], Any]) -> float:
    timings = []
    for _ in range(max(1, repeat)):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


def _noise(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    # Of norm about NOISE: members of a group have a cosine similarity of about 0.8 with each other.
    return rng.standard_normal((count, dim), dtype=np.float32) * np.float32(NOISE / np.sqrt(dim))


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"[{time.perf_counter() - self.started:6.0f}s] {message}", file=sys.stderr)
