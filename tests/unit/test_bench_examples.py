"""`modtag bench --examples N`: every figure at every size, through the CLI, on a real PostgreSQL (pgvector)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.embeddings import _nearest
from modtag.bench.examples import bench_sizes, nearest_ids
from modtag.cli import main


def test_sizes_are_the_powers_asked_for_up_to_n() -> None:
    assert bench_sizes(100_000) == [1_000, 100_000]
    assert bench_sizes(1_000_000) == [1_000, 100_000, 1_000_000]
    assert bench_sizes(5_000) == [1_000, 5_000]
    assert bench_sizes(10) == [10]


def test_the_exact_answer_is_the_worker_index_ranking() -> None:
    rng = np.random.default_rng(1)
    stored = rng.standard_normal((300, 32)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    query = stored[7] + 0.01 * rng.standard_normal(32).astype(np.float32)
    ids = [str(i) for i in range(300)]
    worker = _nearest(ids, ["positive"] * 300, stored, query / np.linalg.norm(query), 5, None)
    assert [int(n.job_id) for n in worker] == nearest_ids(stored, query / np.linalg.norm(query), 5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_command_prints_every_figure(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--examples", "1500", "--database-url", postgres_url, "--json", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["size"] for row in report["results"]] == [1_000, 1_500]
    for row in report["results"]:
        for key in ("memory_exact_ms", "sqlite_exact_ms", "pgvector_exact_ms", "pgvector_hnsw_ms", "hnsw_build_s"):
            assert row[key] > 0, key
        assert 0.5 <= row["hnsw_recall"] <= 1.0  # near copies: HNSW finds most of the exact neighbours
    with pytest.raises(SystemExit):
        main(["bench", "--examples", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--examples", "many"])
