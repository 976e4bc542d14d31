"""A Redis outage while a worker's tasks are acking: the worker process lives through it and every job is decided.

Redis is SIGKILLed mid-work and restarted empty on the same port after longer than the 5 s the audit saw
kill workers; the reconciler notices the restart and puts back the jobs whose messages it lost, well before
the queued grace (a minute)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from core.db import session_scope
from core.tables import Job, JobStatus
from tests.support.deployment import Deployment, submit
from tests.support.outages import decisions_per_job, kill_redis
from tests.support.photos import NAMES, photo_bytes
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

OUTAGE_S = 6.0  # longer than the 5 s outage that ended workers in the audit
OUTAGES = 3
CONSUMER_FAULT = Path(__file__).parents[1] / "support" / "consumer_fault"


def statuses(database_url: str, job_ids: list[str]) -> Counter[str]:
    with session_scope(database_url) as session:
        found = session.exec(select(Job.status).where(Job.id.in_(job_ids))).all()  # type: ignore[attr-defined]
        return Counter(str(status) for status in found)


def test_a_worker_lives_through_redis_outages_while_acking(deployment: Deployment, redis_server: Any) -> None:
    outages_while_acking(deployment, redis_server, OUTAGES)


def test_a_consumer_ended_by_the_audits_error_is_restarted_in_the_same_process(
    deployment: Deployment, redis_server: Any
) -> None:
    # The audit's kombu error, injected at the first connection loss (tests/support/consumer_fault says why).
    fault = {
        "MODTAG_TEST_CONSUMER_FAULT": "1",
        "PYTHONPATH": os.pathsep.join([str(CONSUMER_FAULT), os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    }
    outages_while_acking(deployment, redis_server, 2, **fault)
    log = (deployment.log_dir / "worker.log").read_text(errors="replace")
    assert "Unrecoverable error: AttributeError" in log and "restarting it, models kept" in log
    # The reconciler (and with it the lease renewals and the webhook sender) outlived the consumer the fault ended:
    # it saw each outage and each return. It used to end with the consumer and start again only once Redis was back.
    assert log.count("reconciler: Redis unreachable") == 2, log
    assert log.count("reconciler: Redis reachable again") == 2, log


def outages_while_acking(deployment: Deployment, redis_server: Any, outages: int, **worker_env: str) -> None:
    """`outages` Redis SIGKILLs while the worker's tasks ack; every job done once, the same worker process alive."""
    # The queued grace stays at its minute: the jobs the restarts lost come back because the restart is noticed.
    deployment.env.update({"MODTAG_OUTBOX_INTERVAL_S": "0.5"})
    database_url = deployment.env["MODTAG_DATABASE_URL"]
    deployment.start_api()
    worker = deployment.start_worker(**worker_env)
    job_ids: list[str] = []
    for outage in range(outages):
        batch = [
            submit(deployment, photo_bytes(NAMES[i % len(NAMES)], size=(64 + i, 48 + outage)), name=f"{i}.jpg")["id"]
            for i in range(12)
        ]
        job_ids += batch
        # Mid-work: some of this round's jobs decided (so tasks are acking), others still to come.
        wait_for(lambda batch=batch: statuses(database_url, batch)["done"] >= 2, 120, "the worker deciding jobs")
        kill_redis(redis_server)
        down_at = time.monotonic()
        wait_for(lambda down_at=down_at: time.monotonic() - down_at >= OUTAGE_S, OUTAGE_S + 5, "the outage to last")
        assert worker.poll() is None, f"the worker exited ({worker.returncode}) during outage {outage + 1}: " + (
            deployment.log("worker")
        )
        redis_server.start()
    back_at = time.monotonic()
    final = deployment.client.wait_jobs(job_ids, timeout_s=240)
    print(
        f"\n{outages} Redis outages of {OUTAGE_S:g} s: {len(final)} of {len(job_ids)} jobs final, the last "
        f"{time.monotonic() - back_at:.1f} s after Redis came back; worker pid {worker.pid} alive"
    )
    assert worker.poll() is None, f"the worker exited ({worker.returncode}): " + deployment.log("worker")
    assert {job["status"] for job in final.values()} == {JobStatus.DONE.value}, deployment.log("worker")
    assert decisions_per_job(database_url, job_ids) == Counter(dict.fromkeys(job_ids, 1))
