"""Queue and task names: the one source for routing, worker `-Q` flags and autoscaling."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    """Celery queues. `inference` jobs need the model families. The reconciler and the webhook sender are
    threads of every worker (core/reconcile.py, worker/callbacks.py), not tasks: they need no queue."""

    INFERENCE = "modtag.inference"


class TaskName(StrEnum):
    """Task names, so the API can enqueue by name without importing the worker (and torch)."""

    PROCESS_JOB = "modtag.process_job"
