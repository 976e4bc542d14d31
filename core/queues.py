"""Queue and task names: the one source for routing, worker `-Q` flags and autoscaling."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    """Celery queues, in the order a worker takes from them: a worker pops `inference.bulk` only while `inference` is
    empty (kombu's `priority` queue order, core/broker.py). The reconciler and the webhook sender are threads of
    every worker (core/reconcile.py, worker/callbacks.py), not tasks: they need no queue."""

    INFERENCE = "modtag.inference"  # interactive jobs: live uploads, moderate-now calls
    INFERENCE_BULK = "modtag.inference.bulk"  # bulk jobs: backfills, catalogue re-checks


class Priority(StrEnum):
    """How urgent a job is: `interactive` (the default) or `bulk`, which waits while any interactive job waits."""

    INTERACTIVE = "interactive"
    BULK = "bulk"

    @property
    def queue(self) -> Queue:
        return Queue.INFERENCE_BULK if self is Priority.BULK else Queue.INFERENCE

    @classmethod
    def of(cls, value: str | None) -> Priority:
        """A stored priority; anything unknown (a row from before the column) is interactive."""
        try:
            return cls(value or cls.INTERACTIVE)
        except ValueError:
            return cls.INTERACTIVE


class TaskName(StrEnum):
    """Task names, so the API can enqueue by name without importing the worker (and torch)."""

    PROCESS_JOB = "modtag.process_job"
