"""What outage tests read and do around a deployment: a worker's metrics, each job's decisions, the outage lines
in a worker's log (a broker outage's among them), a Redis crash, and the TCP path to pgserver's unix socket that a
proxy can cut."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import func, select

from core.db import session_scope
from core.tables import Decision
from modtag.servers import RedisServer


def worker_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of a worker's /metrics, or None (not exported yet, or the worker not answering)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def decisions_per_job(database_url: str, job_ids: list[str]) -> Counter[str]:
    """How many decisions each of `job_ids` has (a job with none is absent)."""
    with session_scope(database_url) as session:
        query = select(Decision.job_id, func.count()).where(Decision.job_id.in_(job_ids)).group_by(Decision.job_id)  # type: ignore[attr-defined]
        return Counter({job_id: int(count) for job_id, count in session.exec(query).all()})


def outage_lines(log: Path, name: str) -> tuple[list[str], list[str]]:
    """The lines core.dependencies logged for `name` ("blob store", "database"): (outage started, outage ended)."""
    # The record's own lines: Celery's retry lines quote the error too.
    own = [line for line in log.read_text(errors="replace").splitlines() if "core.dependencies" in line]
    return [line for line in own if f"{name} unreachable: " in line], [
        line for line in own if f"{name} reachable again" in line
    ]


def broker_outage_lines(log: Path) -> Counter[str]:
    """What a worker logged of broker outages: `down` and `up`, its reconciler's lines for one's start and end, and
    `restarted`, its Celery consumer started again after an unrecoverable error.

    Such an error (kombu failing to restore unacknowledged messages over the connection Redis dropped) ends the
    worker's reconciler with its consumer, and the next reconciler starts once Redis answers: a worker whose
    consumer stopped before its reconciler's next pass logs the restart for that outage and no reconciler line."""
    text = log.read_text(errors="replace")
    return Counter(
        down=text.count("reconciler: Redis unreachable"),
        up=text.count("reconciler: Redis reachable again"),
        restarted=text.count("restarting it, models kept"),
    )


def kill_redis(redis_server: RedisServer) -> None:
    """SIGKILL, as a crashed or OOM-killed Redis goes: no goodbye to its clients. `start()` brings it back empty
    (when it does not persist) on the same port and password."""
    assert redis_server.process is not None
    redis_server.process.kill()
    redis_server.process.wait(10)
    redis_server.process = None


def postgres_socket(postgres_url: str) -> tuple[str, str]:
    """(pgserver's unix socket, the database path): a `cuttable_proxy` to the first, then
    `postgresql://postgres@{proxy.address}{path}` reaches the same database through a path a test can cut."""
    socket_dir = parse_qs(urlsplit(postgres_url).query)["host"][0]
    return str(next(Path(socket_dir).glob(".s.PGSQL.*"))), urlsplit(postgres_url).path
