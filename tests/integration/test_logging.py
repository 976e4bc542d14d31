"""MODTAG_LOG_FORMAT=json and X-Request-ID: one request followed through the API and the worker's log lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.deployment import Deployment, wait_final
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


def _lines(deployment: Deployment, name: str) -> list[dict[str, Any]]:
    """The JSON lines of a process's output (Celery's start-up banner on stdout is not a log line)."""
    text = (deployment.log_dir / f"{name}.log").read_text(errors="replace")
    lines = text.splitlines()
    assert not [line for line in lines if " INFO " in line or " WARNING " in line], text[-2000:]  # no text-format lines
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_a_request_id_is_echoed_and_follows_the_job_into_the_worker_log(deployment: Deployment) -> None:
    deployment.env["MODTAG_LOG_FORMAT"] = "json"
    deployment.start_api()
    deployment.start_worker()
    sent = deployment.client.post(
        "/v1/jobs", files={"image": ("a.jpg", photo_bytes("coffee"))}, headers={"X-Request-ID": "req-follow-me-42"}
    )
    assert sent.status_code == 202 and sent.headers["x-request-id"] == "req-follow-me-42"
    job_id = sent.json()["id"]
    assert wait_final(deployment, job_id)["status"] == "done"

    def job_lines() -> list[dict[str, Any]]:
        return [line for line in _lines(deployment, "worker") if line.get("job_id") == job_id]

    wait_for(lambda: any("finished" in line["message"] for line in job_lines()), 30, "the worker's line for the job")
    for line in job_lines():
        assert line["request_id"] == "req-follow-me-42" and line["tenant"] == "default", line
        assert {"time", "level", "logger", "message"} <= set(line)
    api_lines = _lines(deployment, "api")
    assert api_lines and all("message" in line for line in api_lines)

    # A request without one gets a fresh id; an unusable one is replaced, never echoed.
    fresh = deployment.client.get("/healthz")
    assert len(fresh.headers["x-request-id"]) == 32
    hostile = deployment.client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 300})
    assert hostile.headers["x-request-id"] != "a b\tc" + "x" * 300 and len(hostile.headers["x-request-id"]) == 32
