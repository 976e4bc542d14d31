"""A chaos run through a real deployment: one API and two worker processes on PostgreSQL, Redis and moto's S3, jobs
submitted all along while the blob store, then the database, then Redis go away for longer than the old retry
window (three attempts in about 6 s). Every accepted job ends `done` with one decision, both worker processes
are the ones started, and each worker's log has one line for each outage's start and one for its end.

S3 and PostgreSQL are cut on the workers' side by a proxy (tests/support/proxy.py): the API keeps reaching them,
so uploads are accepted during those outages. Redis is SIGKILLed and restarted empty, for every process at once.
Each outage lasts at least its length (`MODTAG_CHAOS_OUTAGE_S`: one number for all three, or `S3,DB,REDIS`
seconds) and until each worker met it (S3 and the database: handed a job back for it; Redis: said so in its log,
see `broker_outage_lines`); everything else waits on a condition, within the bounds below. The issue's run, with
the figures it prints, is deploy/CAPACITY.md's "Outages" section:

    MODTAG_CHAOS_OUTAGE_S=60,60,30 .venv/bin/python -m pytest tests/integration/test_chaos.py -s
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlmodel import select

from core.db import session_scope
from core.tables import Job, JobStatus, as_utc, utcnow
from modtag.client import ApiUnreachable
from modtag.servers import RedisServer, free_port
from tests.support.deployment import Deployment
from tests.support.outages import (
    broker_outage_lines,
    decisions_per_job,
    kill_redis,
    outage_lines,
    postgres_socket,
    worker_metric,
)
from tests.support.photos import NAMES, photo_bytes
from tests.support.proxy import cuttable_proxy
from tests.support.s3 import S3Bucket
from tests.support.waiting import wait_for


def outage_lengths() -> tuple[float, float, float]:
    """Seconds of the S3, database and Redis outages: past the old window (S3 and the database past 10 s)."""
    given = [float(part) for part in os.environ.get("MODTAG_CHAOS_OUTAGE_S", "11,11,7").split(",")]
    s3_s, database_s, redis_s = given * 3 if len(given) == 1 else given
    return s3_s, database_s, redis_s


OUTAGES_S = outage_lengths()
SUBMIT_EVERY_S = 1.0  # the client's pace, about half what the fleet decides here: a load, not a wait
BACKLOG = 8  # outside an outage the client waits while this many of its jobs are undecided (see Submitter)
# Bounds on the waits, not intervals slept: each is met well inside its bound alone; a loaded two-core machine
# (the full suite beside other work) decides jobs several times slower.
FIRST_DECISIONS_S = 120  # the fleet's first decisions: the workers load their models
RUNNING_S = 60  # a job running, before each outage
MEET_S = 120  # past an outage's length, until every worker met it
CATCH_UP_S = 240  # every job accepted before an outage ended decided
FINAL_S = 180  # every accepted job final
WORKERS = ("worker-1", "worker-2")
Evidence = Callable[[], dict[str, float]]  # per worker, a count that grows when it meets an outage
SETTINGS = {
    "MODTAG_DEPENDENCY_RETRY_MAX_S": "4",
    "MODTAG_RUNNING_LEASE_S": "6",
    "MODTAG_LEASE_RENEW_S": "1",
    "MODTAG_RECONCILE_INTERVAL_S": "1",
    "MODTAG_OUTBOX_INTERVAL_S": "0.5",
    "MODTAG_OUTBOX_GRACE_S": "2",
}

# A net for a hang outside the waits: every wait's bound (each fails first, saying which), the outages, and the
# processes' start and stop. A smaller net cut a slow run off mid-wait, with no word of what it waited for.
RUN_S = FIRST_DECISIONS_S + 3 * (RUNNING_S + MEET_S + CATCH_UP_S) + sum(OUTAGES_S) + FINAL_S + 120
pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_S)]


@dataclass
class Outage:
    """One dependency's outage as the test held it: wall-clock bounds, for the jobs' own timestamps."""

    dependency: str
    started: datetime
    ended: datetime

    @property
    def seconds(self) -> float:
        return (self.ended - self.started).total_seconds()


@dataclass
class Submitter:
    """A client uploading a new photo every SUBMIT_EVERY_S in a thread until stopped; what the API accepted and
    what it refused (a refused upload is the client's to retry, and none is expected here).

    Outside an outage it holds back while BACKLOG of its jobs are undecided: a fixed pace outran the fleet of a
    loaded machine (two cores at a load average of 16: a job decided every four to five seconds, one uploaded
    a second), and each catch-up then had more to decide than the last. During an outage (`outage()`)
    it keeps its pace whatever the backlog: the uploads accepted while a dependency is gone are what the run is
    about."""

    deployment: Deployment
    database_url: str
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _outage: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Keep the pace, whatever the backlog, until the block ends."""
        self._outage.set()
        try:
            yield
        finally:
            self._outage.clear()

    def __enter__(self) -> Submitter:
        self._thread = threading.Thread(target=self._run, name="chaos-submitter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(SUBMIT_EVERY_S):
            if not self._outage.is_set() and self._undecided() >= BACKLOG:
                continue
            # Distinct uploads (no two alike, so none reuses another's decision).
            image = photo_bytes(NAMES[index % len(NAMES)], size=(48 + index % 64, 40 + index // 64))
            try:
                reply = self.deployment.client.submit_job(image, filename=f"{index}.jpg", mime="image/jpeg")
            except ApiUnreachable as exc:
                self.refused.append(f"unreachable: {exc}")
                continue
            finally:
                index += 1
            if reply.status == 202:
                self.accepted.append(reply.body["id"])
            else:
                self.refused.append(f"{reply.status}: {reply.body}")

    def _undecided(self) -> int:
        accepted = list(self.accepted)
        return len(accepted) - statuses(self.database_url, accepted)["done"]


def test_outages_of_each_dependency_fail_no_job_and_end_no_worker(
    fleet: Deployment, s3_bucket: S3Bucket, postgres_url: str, redis_server: RedisServer
) -> None:
    s3_s, database_s, redis_s = OUTAGES_S
    fleet.env.update(SETTINGS)
    endpoint = urlsplit(s3_bucket.endpoint)
    socket_path, database_path = postgres_socket(postgres_url)
    metrics_ports = {name: free_port() for name in WORKERS}
    outages: list[Outage] = []
    with (
        cuttable_proxy((endpoint.hostname or "127.0.0.1", endpoint.port or 80)) as s3,
        cuttable_proxy(socket_path) as database,
    ):
        fleet.start_api()
        workers = {
            name: fleet.start_worker(
                name,
                AWS_ENDPOINT_URL=f"http://{s3.address}",
                MODTAG_DATABASE_URL=f"postgresql://postgres@{database.address}{database_path}",
                MODTAG_WORKER_METRICS_PORT=str(port),
                MODTAG_WORKER_METRICS_HOST="127.0.0.1",
            )
            for name, port in metrics_ports.items()
        }

        def retried(reason: str) -> Evidence:
            """Each worker's count of jobs handed back for `reason` (a dependency outage)."""
            return lambda: {
                name: worker_metric(port, "modtag_jobs_retried_total", reason=reason) or 0.0
                for name, port in metrics_ports.items()
            }

        def broker_said() -> dict[str, float]:
            """Each worker's lines saying the broker went away: its reconciler's, or its consumer's restart (which
            ends the reconciler until Redis answers; see `broker_outage_lines`)."""
            lines = {name: broker_outage_lines(fleet.log_dir / f"{name}.log") for name in WORKERS}
            return {name: float(said["down"] + said["restarted"]) for name, said in lines.items()}

        def met_from_now(evidence: Evidence) -> Callable[[], bool]:
            """From now on: each worker's `evidence` grew, and the API accepted an upload."""
            before, accepted_before = evidence(), len(client.accepted)

            def met() -> bool:
                now = evidence()
                return all(now[name] > before[name] for name in WORKERS) and len(client.accepted) > accepted_before

            return met

        # S3 and the database are cut on the workers' side (claims, decisions, lease renewals and the reconciler
        # fail; every worker hands jobs back while each is gone); Redis for every process, killed while tasks ack
        # and restarted empty. The API keeps accepting uploads through all three.
        plan: list[tuple[str, float, Callable[[], object], Callable[[], object], Evidence]] = [
            ("blob store", s3_s, s3.cut, s3.restore, retried("blob_store_unavailable")),
            ("database", database_s, database.cut, database.restore, retried("database_unavailable")),
            ("redis", redis_s, lambda: kill_redis(redis_server), redis_server.start, broker_said),
        ]
        with Submitter(fleet, postgres_url) as client:
            wait_for(
                lambda: statuses(postgres_url, client.accepted)["done"] >= 4,
                FIRST_DECISIONS_S,
                "the workers deciding jobs",
            )
            for dependency, minimum_s, cut, restore, evidence in plan:
                mid_work(postgres_url, client)
                outages.append(
                    hold(dependency, minimum_s, met_from_now(evidence), cut=cut, restore=restore, load=client)
                )
                caught_up(postgres_url, client)

        job_ids = list(client.accepted)
        final = fleet.client.wait_jobs(job_ids, timeout_s=FINAL_S)
        alive = {name: process.poll() is None for name, process in workers.items()}
        figures = report(postgres_url, job_ids, final, outages, alive, client.refused, fleet)
        print(f"\nchaos run ({fleet.log_dir}):\n{figures}")
        fleet.stop_all()  # before the proxies close: their cut would be one more outage in the logs

    assert not client.refused, client.refused
    assert Counter(job["status"] for job in final.values()) == Counter(done=len(job_ids)), figures
    assert decisions_per_job(postgres_url, job_ids) == Counter(dict.fromkeys(job_ids, 1))
    assert all(alive.values()), {name: fleet.log(name) for name, up in alive.items() if not up}
    for name in WORKERS:
        for dependency in ("blob store", "database"):
            down, up = outage_lines(fleet.log_dir / f"{name}.log", dependency)
            assert len(down) == 1 and len(up) == 1, (name, dependency, down, up)
    # The broker's lines come from the reconciler. A consumer that Celery's unrecoverable error in kombu ended (it
    # happens here for real, in some runs in both workers) is restarted in the same process, and its reconciler
    # with it, once the broker answers: that worker logs the restart instead of the outage's start (when its
    # reconciler had no pass before the consumer stopped) or end (deploy/CAPACITY.md, "Outages"). Either way each
    # worker said what happened, once.
    for name in WORKERS:
        lines = broker_outage_lines(fleet.log_dir / f"{name}.log")
        restarted = lines["restarted"] >= 1
        assert lines["down"] <= 1 and lines["up"] <= 1, (name, lines)
        assert (lines["down"] == 1 or restarted) and (lines["up"] == 1 or restarted), (name, lines)


def hold(
    dependency: str,
    minimum_s: float,
    met: Callable[[], bool],
    *,
    cut: Callable[[], object],
    restore: Callable[[], object],
    load: Submitter,
) -> Outage:
    """`cut()` the dependency, keep the outage until it lasted `minimum_s` and `met()` holds, then `restore()` it;
    `load` keeps submitting through it."""
    with load.outage():
        cut()
        started, since = utcnow(), time.monotonic()
        try:
            wait_for(
                lambda: time.monotonic() - since >= minimum_s and met(),
                minimum_s + MEET_S,
                f"the {dependency} outage met by every worker",
            )
        finally:
            restore()  # even when the wait failed: a session's Redis left dead would fail every later test
        return Outage(dependency, started, utcnow())


def mid_work(database_url: str, client: Submitter) -> None:
    """Until a job is running: the outage then lands on jobs both queued and being decided (and acked)."""
    wait_for(lambda: statuses(database_url, client.accepted)["running"] > 0, RUNNING_S, "a job running")


def caught_up(database_url: str, client: Submitter) -> None:
    """Until every job accepted before now is decided: the next outage starts from a fleet that recovered."""
    accepted = list(client.accepted)
    wait_for(
        lambda: statuses(database_url, accepted)["done"] == len(accepted),
        CATCH_UP_S,
        "the jobs accepted before the outage ended decided",
    )


def statuses(database_url: str, job_ids: list[str]) -> Counter[str]:
    with session_scope(database_url) as session:
        found = session.exec(select(Job.status).where(Job.id.in_(job_ids))).all()  # type: ignore[attr-defined]
        return Counter(str(status) for status in found)


def report(
    database_url: str,
    job_ids: list[str],
    final: dict[str, dict[str, Any]],
    outages: list[Outage],
    alive: dict[str, bool],
    refused: list[str],
    deployment: Deployment,
) -> str:
    """The run's figures: jobs accepted, decided, failed; per outage its length, the jobs that lived through it
    and the longest of their delays (submitted to decided); each job's attempts; the workers alive."""
    with session_scope(database_url) as session:
        jobs = session.exec(select(Job).where(Job.id.in_(job_ids))).all()  # type: ignore[attr-defined]
        spans = {job.id: (as_utc(job.created_at), as_utc(job.finished_at)) for job in jobs if job.finished_at}
        attempts = Counter(job.attempts for job in jobs)
    statuses = Counter(job["status"] for job in final.values())
    lines = [
        f"accepted {len(job_ids)}, refused {len(refused)}, decided {statuses[JobStatus.DONE.value]}, "
        f"failed {statuses[JobStatus.FAILED.value]}, not final {len(job_ids) - len(final)}; "
        f"attempts per job {dict(sorted(attempts.items()))}"
    ]
    for outage in outages:
        met = [end - start for start, end in spans.values() if start <= outage.ended and end >= outage.started]
        longest = max((delay.total_seconds() for delay in met), default=0.0)
        lines.append(
            f"{outage.dependency} outage {outage.seconds:.1f} s: {len(met)} jobs lived through it, "
            f"max delay {longest:.1f} s"
        )
    calm = [
        (end - start).total_seconds()
        for start, end in spans.values()
        if not any(start <= outage.ended and end >= outage.started for outage in outages)
    ]
    lines.append(f"outside the outages (catch-up included): {len(calm)} jobs, max delay {max(calm, default=0.0):.1f} s")
    logs = "".join((deployment.log_dir / f"{name}.log").read_text(errors="replace") for name in alive)
    lines.append(
        f"reconciler re-enqueues {logs.count('core.reconcile: re-enqueued job')}, deliveries of a job already "
        f"decided {logs.count('finished: duplicate')}, consumers restarted after Celery's unrecoverable error "
        f"{logs.count('restarting it, models kept')}, tracebacks in the workers' logs {logs.count('Traceback')}"
    )
    lines.append("workers alive: " + ", ".join(f"{name} {'yes' if up else 'NO'}" for name, up in alive.items()))
    return "\n".join(lines)
