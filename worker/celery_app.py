"""The worker's Celery app and its task. Start it with `modtag worker` (or `celery -A worker.celery_app`).

The pool is `threads` in one process: the models are loaded once per process and shared by the task
threads, whose images the batcher gathers into model batches. No fork happens after torch starts,
so CUDA is never initialised in a forked parent.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_received, task_revoked, worker_ready, worker_shutting_down

from core import metrics
from core.broker import enqueue_job_first, make_celery
from core.errors import ConfigError
from core.logs import log_context
from core.queues import Queue, TaskName
from core.reconcile import start_reconciler
from core.settings import Settings, get_settings
from worker.bulk_gate import BulkGate
from worker.callbacks import start_webhook_sender
from worker.lifecycle import RetryLater
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
# A broker outage is waited out however long it lasts: Celery's default gives up after 100 reconnection tries.
app.conf.broker_connection_max_retries = None

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_stop = threading.Event()  # ends the process's background threads (set when `supervise` returns)
_background = threading.Event()  # set once they are started: at the first consumer's worker_ready
# The bulk messages this worker holds at once; `consume` sets the cap from the task threads (`modtag worker`).
bulk_gate = BulkGate(Queue.INFERENCE_BULK.value, settings.batch_max_images)
DRAIN_POLL_S = 0.1  # how often a draining worker looks whether its running jobs have finished


def runtime() -> WorkerRuntime:
    """This process's runtime, created on first use (or handed in by `modtag worker` after preloading)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime.from_settings(settings)
        return _runtime


def install_runtime(instance: WorkerRuntime) -> None:
    global _runtime
    with _runtime_lock:
        _runtime = instance


@app.task(name=TaskName.PROCESS_JOB.value, bind=True, max_retries=None)
def process_job(self: Task, job_id: str) -> dict[str, Any]:
    """Judge one job. Permanent problems end the job `failed`; transient ones retry with backoff.

    The job row counts the attempts and decides when to give up (worker/lifecycle.py), not Celery's retries.
    """
    current = runtime()
    with log_context(job_id=job_id):
        outcome = _process(self, current, job_id)
        log.info("job %s finished: %s (%s)", job_id, outcome["outcome"], outcome["code"] or "no error")
        return outcome


def _process(self: Task, current: WorkerRuntime, job_id: str) -> dict[str, Any]:
    try:
        result = current.process(job_id)
    except RetryLater as exc:
        metrics.JOBS_RETRIED.labels(exc.code).inc()
        raise self.retry(exc=exc, countdown=exc.delay_s) from exc
    except SoftTimeLimitExceeded:
        current.give_up(job_id, "job_timeout", f"the job ran over {settings.job_timeout_s}s")
        return {"job_id": job_id, "outcome": "failed", "code": "job_timeout"}
    return {"job_id": result.job_id, "outcome": result.outcome, "code": result.code}


def consume(argv: list[str], *, bulk_held: int | None = None) -> int:
    """Run Celery's worker (the consumer and its thread pool) in this process until asked to stop; its exit status.

    Celery ends its worker on an error it does not expect (`Unrecoverable error` in its log: the audit saw kombu's
    Redis transport raise AttributeError in `restore_unacked` while it closed a connection Redis had dropped)
    and then returns status 1, which `worker_main` used to drop. Such a stop is restarted here, in this process,
    with the models and runtime kept, up to `worker_consumer_restarts` times in
    `worker_consumer_restart_window_s`; past that the process exits non-zero with one line saying why, so that
    `Restart=on-failure`, Kubernetes or `modtag up` starts a fresh one."""
    from celery.worker import state

    if bulk_held is not None:
        bulk_gate.reset(bulk_held)
    last_error = _LastError()
    logging.getLogger("celery.worker").addHandler(last_error)
    try:
        return supervise(
            lambda: _run_celery(argv),
            stopping=lambda: state.should_stop not in (None, False) or state.should_terminate not in (None, False),
            last_error=lambda: last_error.message,
            restarts=settings.worker_consumer_restarts,
            window_s=settings.worker_consumer_restart_window_s,
        )
    finally:
        logging.getLogger("celery.worker").removeHandler(last_error)


def supervise(
    run: Callable[[], int],
    *,
    stopping: Callable[[], bool],
    last_error: Callable[[], str],
    restarts: int,
    window_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Call `run` (one Celery worker's life: its exit status) again each time it ends on its own with a non-zero
    status, at most `restarts` times within `window_s`; the status it ended with otherwise."""
    recent: deque[float] = deque()
    try:
        while True:
            status = run()
            if status == 0 or stopping():
                return status
            now = clock()
            while recent and now - recent[0] > window_s:
                recent.popleft()
            if len(recent) >= restarts:
                why = last_error() or f"exit status {status}"
                print(
                    f"modtag worker: the Celery consumer stopped on an error {len(recent) + 1} times in {window_s:g} s "
                    f"(last: {why}); exiting with status {status} for the supervisor to start a fresh process",
                    file=sys.stderr,
                )
                return status
            recent.append(now)
            log.warning(
                "the Celery consumer stopped on an error (%s); restarting it, models kept", last_error() or status
            )
    finally:
        # The reconciler, webhook sender and lease renewals live as long as the process, not one consumer: a consumer
        # ended by a broker outage must not take with it the renewals of the jobs still running nor the reconciler
        # that notices the broker come back empty.
        _stop.set()


def _run_celery(argv: list[str]) -> int:
    """`celery worker` in this process; its exit status (`app.start` and `worker_main` drop it)."""
    from celery.bin.celery import celery as command
    from click.exceptions import Exit

    command.params[0].default = app
    try:
        status = command.main(args=argv, standalone_mode=False)
    except Exit as exc:
        status = exc.exit_code
    finally:
        command.params[0].default = None
    return status if isinstance(status, int) else 0


class _LastError(logging.Handler):
    """Keeps the message of Celery's last `Unrecoverable error`: the one line a giving-up worker prints."""

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Unrecoverable error"):  # not the other CRITICAL lines (a failed ack)
            self.message = message


def serve_metrics(settings: Settings) -> None:
    """Serve /metrics on `worker_metrics_host` (default: the API's host) and `worker_metrics_port`, before any job
    is taken; a taken port is ConfigError: a worker nobody can scrape must not run unnoticed."""
    if not settings.worker_metrics_port:
        return
    from prometheus_client import start_http_server

    host = settings.resolved_worker_metrics_host
    try:
        start_http_server(settings.worker_metrics_port, addr=host)
    except OSError as exc:
        raise ConfigError(
            f"the worker metrics port {host}:{settings.worker_metrics_port} is unavailable ({exc.strerror or exc}); "
            "set MODTAG_WORKER_METRICS_PORT to a free port (each worker on a host needs its own), or 0 to disable it",
            code="metrics_port_taken",
        ) from None
    log.info("worker metrics on %s:%d/metrics", host, settings.worker_metrics_port)


@task_received.connect
def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is not None:
        bulk_gate.received(sender, request.id, (request.delivery_info or {}).get("routing_key"))


@task_postrun.connect
def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        bulk_gate.finished(task_id)


@task_revoked.connect
def _on_revoked(request: Any = None, **_: Any) -> None:
    if request is not None:
        bulk_gate.finished(request.id)


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    metrics.set_build_info("worker")
    bulk_gate.reset()  # this consumer consumes every queue of its -Q, the bulk one too
    with _runtime_lock:
        if _background.is_set():  # a consumer restarted by `supervise`: the threads of the first one go on
            return
        _background.set()
    start_reconciler(settings, app, _stop)
    start_webhook_sender(settings, _stop)
    runtime().lifecycle.start_renewing(_stop)


@worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    bulk_gate.close()
    # SIGTERM (a pod evicted, a node drained): Celery stops taking messages and waits for the running tasks;
    # this bounds the wait, so the process exits inside the orchestrator's grace period.
    threading.Thread(target=_drain, args=(runtime(),), name="modtag-drain", daemon=True).start()


def _drain(current: WorkerRuntime) -> None:
    """Let the running jobs finish for `worker_drain_s`; then hand them back to the queue and exit."""
    deadline = time.monotonic() + settings.worker_drain_s
    while current.lifecycle.held and time.monotonic() < deadline:
        time.sleep(DRAIN_POLL_S)
    if not current.lifecycle.held:
        return  # Celery's own warm shutdown acknowledges the finished tasks and exits
    returned = current.lifecycle.hand_back()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    for job_id, priority in returned.items():
        try:  # at the head of its own queue: these jobs have waited their turn already
            enqueue_job_first(app, client, job_id, priority)
        except Exception as exc:  # queued in the database: the reconciler enqueues it once its grace passed
            log.warning("could not hand job %s back to the queue (%s)", job_id, exc)
    log.warning(
        "drain ran past %gs: handed %d job(s) back to the queue; exiting", settings.worker_drain_s, len(returned)
    )
    logging.shutdown()
    # The task threads are still inside the model: only leaving the process ends them. Their messages stay
    # unacknowledged in Redis, and the claim turns a later redelivery of a decided job into nothing.
    os._exit(0)
