"""The Celery app configuration shared by the API (which only sends) and the worker (which consumes).

Tasks are enqueued by name, so the API never imports the worker (and with it torch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery import Celery

from core.queues import Priority, Queue, TaskName
from core.settings import Settings

UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered-but-unacknowledged messages here
UNACKED_INDEX_KEY = "unacked_index"  # ... and when each was delivered (a sorted set of delivery tags)


def make_celery(settings: Settings) -> Celery:
    """A Celery app wired for at-least-once delivery of long model jobs."""
    app = Celery("modtag", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=Queue.INFERENCE.value,
        task_routes={
            TaskName.PROCESS_JOB.value: {"queue": Queue.INFERENCE.value},
        },
        # The worker's task threads (three times the batch size, see `modtag worker`) already hold the batch that
        # computes, the next one and a batch kept free for live uploads; reserving more would only keep messages from
        # idle workers.
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_time_limit=settings.job_timeout_s + 30,
        task_soft_time_limit=settings.job_timeout_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than any job, so a slow job is not redelivered to a second worker while it runs.
            "visibility_timeout": settings.resolved_visibility_timeout_s,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            # BRPOP on the queues in the order of the worker's -Q flag (core.queues.Queue): a bulk message is
            # taken only while no interactive one waits. The default (round robin) would alternate between them.
            "queue_order_strategy": "priority",
        },
        broker_pool_limit=10,
    )
    return app


def task_id_for(job_id: str) -> str:
    """The Celery task id of a job's message: lets the reconciler find a job's message in Redis."""
    return f"job-{job_id}"


def enqueue_job(app: Celery, job_id: str, priority: Priority = Priority.INTERACTIVE) -> None:
    """Send the job's task to its priority's queue."""
    queue = priority.queue.value
    app.send_task(TaskName.PROCESS_JOB.value, args=[job_id], queue=queue, task_id=task_id_for(job_id))


def enqueue_job_first(
    app: Celery, client: Any, job_id: str, priority: Priority = Priority.INTERACTIVE, *, scan: int = 1000
) -> bool:
    """Enqueue a job taken back from a worker (a lapsed lease, a drain's hand-back) at the head of its queue, so it
    is the next one taken instead of waiting behind the backlog; False when it stayed at the tail (not found among
    the `scan` newest messages, or already taken).

    kombu's Redis transport publishes with LPUSH and consumes with BRPOP: the head is the list's right end. The
    message is published the ordinary way (kombu writes it), then moved from the left end to the right end in one
    Lua call, which moves nothing when a worker took it meanwhile."""
    enqueue_job(app, job_id, priority)
    queue, task_id = priority.queue.value, task_id_for(job_id)
    for raw in client.lrange(queue, 0, scan - 1):  # the newest first: it was pushed a moment ago
        if _task_id(raw) == task_id:
            return bool(client.eval(_MOVE_TO_HEAD, 1, queue, raw))
    return False


# Remove one copy of the message from the tail end and push it at the head, atomically; 0 when it was gone.
_MOVE_TO_HEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def queued_task_ids(
    client: Any, queues: str | Iterable[str] = tuple(Queue), *, fresh_s: float, limit: int = 100_000
) -> set[str] | None:
    """Task ids waiting in `queues` (every queue by default) or delivered less than `fresh_s` ago and
    unacknowledged; None when the queues are too long to scan.

    An older unacknowledged message may belong to a dead worker, and Redis would hand it out again only
    after the whole visibility timeout: its job must not hide behind it (the claim makes a second message
    harmless). An older one that carries an `eta` less than `fresh_s` ago (or still ahead) is a retry its
    worker holds until then (a job waiting out a dependency outage): it counts as waiting, or every long
    outage would end with a second delivery of each job handed back during it."""
    names = [queues] if isinstance(queues, str) else [str(queue) for queue in queues]
    if sum(client.llen(name) for name in names) > limit or client.hlen(UNACKED_KEY) > limit:
        return None
    ids: set[str] = set()
    for name in names:
        for raw in client.lrange(name, 0, -1):
            ids.add(_task_id(raw))
    now = time.time()
    delivered = client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", "+inf", withscores=True)
    tags = [tag for tag, _ in delivered]
    for (_, at), raw in zip(delivered, client.hmget(UNACKED_KEY, tags) if tags else [], strict=True):
        if raw is None:
            continue
        try:
            message = json.loads(raw)[0]
            body = json.dumps(message) if isinstance(message, dict) else message
        except (ValueError, IndexError, TypeError):
            continue
        if at >= now - fresh_s or _eta(body) >= now - fresh_s:
            ids.add(_task_id(body))
    ids.discard("")
    return ids


def _eta(raw: str) -> float:
    """The POSIX time a Celery message is due (its `eta` header), or 0 when it has none."""
    try:
        eta = json.loads(raw).get("headers", {}).get("eta")
        return datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else 0.0
    except (ValueError, AttributeError, TypeError):
        return 0.0


def _task_id(raw: bytes | str) -> str:
    try:
        message = json.loads(raw)
        return str(message.get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""
