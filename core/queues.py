"""Queue and task names: the one source for routing, worker `-Q` flags and autoscaling."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    """Celery queues. `inference` jobs need the BLIP models; `maintenance` tasks do not."""

    INFERENCE = "modtag.inference"
    MAINTENANCE = "modtag.maintenance"


class TaskName(StrEnum):
    """Task names, so the API can enqueue by name without importing the worker (and torch)."""

    PROCESS_JOB = "modtag.process_job"
    RECONCILE = "modtag.reconcile"
