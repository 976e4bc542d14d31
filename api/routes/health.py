"""Operations: liveness `/healthz`, readiness `/readyz`, Prometheus `/metrics`."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlmodel import Session

from api.deps import Services, ServicesDep
from api.errors import error_response
from core.blobs import BlobStore
from core.db import get_engine, ping
from core.jobs import count_by_status
from core.metrics import JOBS_BY_STATUS, QUEUE_DEPTH, REVIEW_OLDEST_AGE, REVIEW_QUEUE
from core.public import Liveness, NotReadyBody, Readiness
from core.queues import Queue
from core.review import queue_stats
from core.tables import JobStatus, utcnow

logger = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_S = 2.0
GAUGE_REFRESH_S = 5.0
# A load balancer polls /readyz every few seconds on every replica; object stores bill each request. One probe
# (a HEAD of the bucket, a stat of the directory) per 10 s per process answers an outage within a typical
# failure threshold (3 polls) and costs a few thousand requests a day per replica.
BLOB_CHECK_INTERVAL_S = 10.0
# Checks run here so a hung dependency costs a worker of this pool, not the request past its timeout.
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")
_refresh_lock = threading.Lock()


@router.get("/healthz", response_model=Liveness)
def healthz() -> dict[str, str]:
    """Liveness: the process answers. No I/O."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": NotReadyBody, "description": "A dependency is unreachable (see `checks`)."}},
)
def readyz(services: ServicesDep) -> Response | dict[str, object]:
    """Readiness: the database, Redis and the blob store answer within 2 s (the blob store probed every 10 s)."""
    url = services.settings.resolved_database_url
    checks = _run_checks(
        {
            "database": lambda: ping(url),
            "redis": lambda: services.redis.ping(),
            "blob_store": lambda: _blob_store_answers(services.blobs),
        }
    )
    failed = sorted(name for name, result in checks.items() if result != "ok")
    if failed:
        return error_response(503, f"not ready: {', '.join(failed)} unreachable", "not_ready", checks=checks)
    return {"status": "ready", "checks": checks}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition."}},
)
def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics (open: scrapers carry no key). Queue depth, job counts and the review backlog are
    refreshed at most every 5 s."""
    _refresh_gauges(services)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _run_checks(checks: dict[str, Callable[[], object]]) -> dict[str, str]:
    futures = {name: _checks.submit(check) for name, check in checks.items()}
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
            results[name] = "ok"
        except FutureTimeout:
            results[name] = f"timed out after {CHECK_TIMEOUT_S:.0f} s"
        except BlobStoreNotReady as exc:
            results[name] = f"failed: {exc}"
        except Exception as exc:  # any failure means not ready; the class name says which kind
            results[name] = f"failed: {type(exc).__name__}"
    return results


@dataclass
class _BlobProbe:
    """The last probe of one blob store: when it ended and how, or since when one runs."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ended_at: float = float("-inf")
    failure: str | None = None
    running_since: float | None = None


_blob_probes: weakref.WeakKeyDictionary[BlobStore, _BlobProbe] = weakref.WeakKeyDictionary()
_blob_probes_lock = threading.Lock()


class BlobStoreNotReady(Exception):
    """The blob store's last probe failed, or the one running has not answered for CHECK_TIMEOUT_S."""


def _blob_store_answers(store: BlobStore) -> None:
    """Raise unless the store answered its last probe. At most one probe per BLOB_CHECK_INTERVAL_S and one at a
    time per store: a hung store holds one thread of the checks' pool, not one per request."""
    with _blob_probes_lock:
        probe = _blob_probes.setdefault(store, _BlobProbe())
    with probe.lock:
        now = time.monotonic()
        if probe.running_since is not None:
            if now - probe.running_since > CHECK_TIMEOUT_S:
                raise BlobStoreNotReady(f"no answer for {now - probe.running_since:.0f} s")
            due = False
        else:
            due = now - probe.ended_at >= BLOB_CHECK_INTERVAL_S
            if due:
                probe.running_since = now
        if not due and probe.failure is not None:
            raise BlobStoreNotReady(probe.failure)
    if not due:
        return
    failure: str | None = None
    try:
        store.ping()
    except Exception as exc:  # any failure means not ready; the class name says which kind
        failure = type(exc).__name__
    with probe.lock:
        probe.running_since, probe.ended_at, probe.failure = None, time.monotonic(), failure
    if failure is not None:
        raise BlobStoreNotReady(failure)


def _refresh_gauges(services: Services) -> None:
    with _refresh_lock:
        now = time.monotonic()
        if now - services.gauges_refreshed_at < GAUGE_REFRESH_S:
            return
        services.gauges_refreshed_at = now
    # A scrape must succeed even when a dependency is down: the gauges keep their last values.
    try:
        for queue in Queue:
            QUEUE_DEPTH.labels(queue=queue.value).set(services.redis.llen(queue.value))
    except Exception as exc:
        logger.warning("queue depth not refreshed: %s", type(exc).__name__)
    try:
        with Session(get_engine(services.settings.resolved_database_url)) as session:
            counts = count_by_status(session)
            backlog = queue_stats(session)
        for job_status in JobStatus:
            JOBS_BY_STATUS.labels(status=job_status.value).set(counts.get(job_status.value, 0))
        REVIEW_QUEUE.set(backlog.open)
        oldest = backlog.oldest_queued_at
        REVIEW_OLDEST_AGE.set(max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
    except Exception as exc:
        logger.warning("job counts not refreshed: %s", type(exc).__name__)
