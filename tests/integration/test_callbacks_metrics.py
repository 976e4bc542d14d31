"""A job's callback reaches the caller's server, and the worker's own /metrics shows its work."""

from __future__ import annotations

from typing import Any

import pytest

from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def test_callback_and_worker_metrics(deployment: Deployment, receiver: tuple[str, list[dict[str, Any]]]) -> None:
    hook, received = receiver
    metrics_port = free_port()
    deployment.start_api()
    deployment.start_worker(MODTAG_WORKER_METRICS_PORT=str(metrics_port))
    done = submit(deployment, photo_bytes("coffee"), callback_url=hook)
    failed = submit(deployment, photo_bytes("coffee")[:2000], "cut.jpg", callback_url=hook)
    assert wait_final(deployment, done["id"])["status"] == "done"
    assert wait_final(deployment, failed["id"])["status"] == "failed"
    # The worker posts a job's webhook after it commits the final state: a final job may not have called yet.
    wait_for(lambda: len(received) >= 2, 60, "both webhooks")
    types = {body["data"]["id"]: body["type"] for body in received}
    assert types == {done["id"]: "job.decided", failed["id"]: "job.failed"}
    by_id = {body["data"]["id"]: body["data"] for body in received}
    assert by_id[done["id"]]["status"] == "done" and by_id[done["id"]]["decision"]["action"]
    assert by_id[failed["id"]]["error"]["code"] == "image_truncated"

    with ApiClient(f"http://127.0.0.1:{metrics_port}") as worker:
        exposition = worker.metrics()
    assert 'modtag_jobs_completed_total{outcome="done",policy="moderation"} 1.0' in exposition
    assert 'modtag_jobs_failed_total{code="image_truncated",policy="moderation"} 1.0' in exposition
    assert 'modtag_callbacks_total{outcome="delivered"} 2.0' in exposition
    assert 'modtag_model_load_seconds{model="vqa"}' in exposition
    assert "modtag_batch_size_images_count" in exposition
    # Model compute per model and stage: the moderation policy captions, probes and matches.
    for model, stage in (("all", "vision"), ("caption", "caption"), ("vqa", "probes"), ("itm", "matches")):
        assert f'modtag_model_inference_seconds_count{{model="{model}",stage="{stage}"}} 1.0' in exposition
    assert 'modtag_build_info{component="worker"' in exposition
