"""A dependency's outage is waiting, not a job's attempt: the lifecycle against a real database (SQLite and
PostgreSQL) with an injected clock and random source, the per-process record of each dependency's state, the
blob store's errors sorted into outages and the job's own, and /readyz naming a blob store that refuses or hangs."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from core.blobs import LocalBlobStore, S3BlobStore
from core.db import migrate
from core.dependencies import RECORD, Dependency, DependencyRecord, outage_delay, outage_of
from core.errors import DependencyUnavailable, NotFound, TransientError
from core.settings import Settings
from core.tables import JobStatus
from modtag.servers import free_port
from tests.support.api import api_settings, running_api
from tests.support.jobs import new_job, stored
from tests.support.outages import postgres_socket
from tests.support.proxy import cuttable_proxy
from tests.support.s3 import S3Bucket
from tests.support.servers import reset_postgres, silent_server
from tests.support.waiting import wait_for

BLOB_OUTAGE = DependencyUnavailable("blob_store", "EndpointConnectionError")


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("modtag_dependency_up", {"dependency": dependency})


def lifecycle_for(database_url: str, tmp_path: Path, *, rand: float = 1.0, **fields: Any) -> Any:
    from worker.lifecycle import JobLifecycle

    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, **fields)
    return JobLifecycle(settings, "worker-a", dependencies=DependencyRecord(clock=Clock()), rand=lambda: rand)


def test_a_blob_store_outage_hands_the_job_back_uncounted_with_a_growing_capped_wait(
    database_url: str, tmp_path: Path
) -> None:
    from worker.lifecycle import RetryLater

    # rand=1.0: the top of each jitter window, so the waits show the window itself.
    lifecycle = lifecycle_for(database_url, tmp_path, max_attempts=3, dependency_retry_max_s=16)
    job_id = new_job(database_url)
    delays = []
    for _ in range(7):  # more deliveries than max_attempts: none of them is charged
        job = lifecycle.claim(job_id)
        assert job.attempts == 1
        with pytest.raises(RetryLater) as wait:
            lifecycle.retry(job, BLOB_OUTAGE)
        assert wait.value.code == "blob_store_unavailable"
        delays.append(wait.value.delay_s)
        row = stored(database_url, job_id)
        assert (row.status, row.attempts) == (JobStatus.QUEUED, 0)  # handed back, the claim undone with it
    assert delays == [1, 2, 4, 8, 16, 16, 16]  # exponential from 1 s, capped by MODTAG_DEPENDENCY_RETRY_MAX_S
    assert not lifecycle.dependencies.is_up("blob_store")

    # The job's own transient errors still count, with today's backoff; the outage waits are forgotten once final.
    own = TransientError("out of memory while processing the image", code="out_of_memory")
    for attempt, delay in ((1, 2), (2, 4)):
        job = lifecycle.claim(job_id)
        assert job.attempts == attempt
        with pytest.raises(RetryLater) as retry:
            lifecycle.retry(job, own)
        assert retry.value.delay_s == delay
    result = lifecycle.retry(lifecycle.claim(job_id), own)
    assert (result.outcome, result.code) == ("failed", "out_of_memory")
    final = stored(database_url, job_id)
    assert (final.status, final.attempts) == (JobStatus.FAILED, 3)


def test_the_outage_wait_is_full_jitter_under_the_cap() -> None:
    assert [outage_delay(waits, 300, lambda: 0.5) for waits in (1, 2, 3, 10, 11, 1000)] == [0.5, 1, 2, 150, 150, 150]
    assert outage_delay(4, 300, lambda: 0.0) == 0.0  # full jitter: anywhere from at once to the window's end


def test_a_hand_back_the_database_missed_is_settled_uncounted_once_it_answers(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.lifecycle import RetryLater

    lifecycle = lifecycle_for(database_url, tmp_path, max_attempts=1)
    job_id = new_job(database_url)
    job = lifecycle.claim(job_id)
    # The database becomes unreachable (nothing listens where the worker now looks for it) while the job runs.
    monkeypatch.setattr(lifecycle, "_url", f"postgresql://modtag@127.0.0.1:{free_port()}/gone?connect_timeout=2")
    with pytest.raises(RetryLater) as wait:
        lifecycle.retry(job, DependencyUnavailable("database", "OperationalError: connection refused"))
    assert wait.value.code == "database_unavailable"
    with pytest.raises(RetryLater) as again:  # the redelivery cannot claim it either: no attempt, a longer wait
        lifecycle.claim(job_id)
    assert again.value.code == "database_unavailable" and again.value.delay_s == 2
    assert not lifecycle.dependencies.is_up("database")
    assert (stored(database_url, job_id).status, stored(database_url, job_id).attempts) == (JobStatus.RUNNING, 1)

    monkeypatch.setattr(lifecycle, "_url", database_url)  # back
    taken = lifecycle.claim(job_id)  # the owed undo first, then the claim: one attempt, with max_attempts=1 too
    assert (taken.status, taken.attempts) == (JobStatus.RUNNING, 1)
    assert lifecycle.dependencies.is_up("database")

    # The same through the renewer's settle(), for a job no delivery came back for yet.
    monkeypatch.setattr(lifecycle, "_url", f"postgresql://modtag@127.0.0.1:{free_port()}/gone?connect_timeout=2")
    with pytest.raises(RetryLater):
        lifecycle.retry(taken, DependencyUnavailable("database", "OperationalError: connection refused"))
    monkeypatch.setattr(lifecycle, "_url", database_url)
    assert lifecycle.settle() == 1 and lifecycle.settle() == 0
    row = stored(database_url, job_id)
    assert (row.status, row.attempts) == (JobStatus.QUEUED, 0)


def test_one_line_when_an_outage_starts_one_when_it_ends_and_the_gauge_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    record = DependencyRecord(clock=clock)
    caplog.set_level(logging.INFO, logger="core.dependencies")
    assert record.succeeded("broker") is None and gauge("broker") == 1
    for _ in range(50):  # every job and every renewal meets it
        record.failed(DependencyUnavailable("blob_store", "EndpointConnectionError"))
    assert gauge("blob_store") == 0
    clock.now += 42.5
    assert record.succeeded("blob_store") == 42.5
    assert record.succeeded("blob_store") is None
    assert gauge("blob_store") == 1
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "core.dependencies"]
    assert lines == [
        ("WARNING", "blob store unreachable: EndpointConnectionError"),
        ("INFO", "blob store reachable again after 42.5 s (down: EndpointConnectionError)"),
    ]


def test_database_errors_are_sorted_into_outages_and_answers() -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError

    down = outage_of(OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused\nDETAIL: ...")))
    assert down is not None and down.dependency == "database" and down.code == "database_unavailable"
    assert down.reason == "ConnectionRefusedError: connection refused"  # the first line: no SQL, no parameters
    assert outage_of(IntegrityError("INSERT", {}, ValueError("duplicate key"))) is None  # the database answered
    assert outage_of(NotFound("gone", code="blob_missing")) is None


def test_a_refused_or_throttling_s3_is_an_outage_and_a_missing_blob_is_the_jobs_own(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3BlobStore(s3_bucket.bucket)
    with pytest.raises(NotFound) as missing:
        store.get("0" * 64)
    assert missing.value.code == "blob_missing"
    store.ping()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(DependencyUnavailable) as refused:
        S3BlobStore(s3_bucket.bucket).get("0" * 64)
    assert refused.value.dependency == "blob_store" and refused.value.code == "blob_store_unavailable"

    from botocore.exceptions import ClientError

    def slow_down(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")

    monkeypatch.setattr(store._client, "get_object", slow_down)  # moto does not throttle: its answer, as botocore
    with pytest.raises(DependencyUnavailable):
        store.get("0" * 64)


def test_a_failing_disk_is_an_outage_of_the_directory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    key = store.put(b"an image")
    with pytest.raises(NotFound):
        store.get("1" * 64)

    def failing_read(*_: Any) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    # An I/O error cannot be made on demand without root: the one a dying disk raises, where Python raises it.
    monkeypatch.setattr(Path, "read_bytes", failing_read)
    with pytest.raises(DependencyUnavailable) as failing:
        store.get(key)
    assert failing.value.reason == "EIO (Input/output error)"


def test_readyz_names_a_blob_store_that_refuses_or_hangs(
    db_url: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import health

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "modtag-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "modtag-test-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # refuses
    settings = api_settings(tmp_path_factory.mktemp("api-s3-down"), db_url, redis_server.url, blob_url="s3://gone")
    with running_api(settings) as server:
        response = server.client.get("/readyz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert "blob_store" in body["detail"] and body["checks"]["database"] == "ok" and body["checks"]["redis"] == "ok"
    assert body["checks"]["blob_store"] == "failed: DependencyUnavailable"

    with silent_server() as silent:  # accepts and never answers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.port}")
        settings = api_settings(tmp_path_factory.mktemp("api-s3-hung"), db_url, redis_server.url, blob_url="s3://hung")
        with running_api(settings) as server:
            first = server.client.get("/readyz")
            second = server.client.get("/readyz")  # the probe still runs: not a second one, and not ready
        probes = len(silent.accepted)
    assert first.status_code == 503 and first.json()["checks"]["blob_store"] == (
        f"timed out after {health.CHECK_TIMEOUT_S:.0f} s"
    )
    assert second.status_code == 503 and "blob_store" in second.json()["detail"]
    assert probes <= 1


def test_the_webhook_sender_logs_one_line_per_database_outage_not_a_traceback_per_pass(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: each worker's webhook sender logged 'webhook retry pass failed' with a traceback every pass (5 s)
    for the whole of a database outage."""
    from worker import callbacks

    passes = 0
    record_missing = callbacks._record_missing

    def counted(settings: Settings) -> None:  # the real pass, counted: its first step, each pass
        nonlocal passes
        passes += 1
        record_missing(settings)

    monkeypatch.setattr(callbacks, "_record_missing", counted)
    reset_postgres(postgres_url)
    migrate(postgres_url)
    socket_path, path = postgres_socket(postgres_url)
    stop = threading.Event()
    with cuttable_proxy(socket_path) as database:
        settings = Settings(
            _env_file=None,
            data_dir=tmp_path,
            database_url=f"postgresql://postgres@{database.address}{path}",
            webhook_poll_s=0.05,
        )
        RECORD.succeeded(Dependency.DATABASE)  # whatever an earlier test left: up, before the lines are read
        caplog.set_level(logging.INFO)
        sender = callbacks.start_webhook_sender(settings, stop)
        try:
            wait_for(lambda: passes >= 3 and gauge("database") == 1, 30, "passes with the database up")
            database.cut()
            cut_at = passes
            wait_for(lambda: passes >= cut_at + 20 and gauge("database") == 0, 60, "20 passes during the outage")
            database.restore()
            wait_for(lambda: gauge("database") == 1, 30, "the database reachable again")
            back_at = passes
            wait_for(lambda: passes >= back_at + 3, 30, "passes after the outage")
        finally:
            stop.set()
            sender.join(10)
    lines = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records if r.name == "core.dependencies"]
    assert [(level, text.split(" after ")[0]) for level, text in lines] == [
        ("WARNING", "database unreachable"),
        ("INFO", "database reachable again"),
    ], lines
    assert not [r for r in caplog.records if r.name == "worker.callbacks" and r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info], "no traceback during the outage"
