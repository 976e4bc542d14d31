"""MODTAG_LOG_FORMAT=json and X-Request-ID: one request followed through the API and the worker's log lines."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import update

from core.db import session_scope
from core.jobs import NewJob, create_job
from core.tables import Job
from tests.support.api import assert_error
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


def test_every_access_line_carries_its_request_id_even_an_unexpected_error(deployment: Deployment) -> None:
    deployment.env["MODTAG_LOG_FORMAT"] = "json"
    deployment.start_api()
    # A row this API cannot read (written by hand, or by a newer version) makes its route fail unexpectedly.
    with session_scope(deployment.env["MODTAG_DATABASE_URL"]) as session:
        new = NewJob(tenant="default", policy="moderation", policy_version=None, source="url", image_url="https://a/b")
        job, _ = create_job(session, new)
        session.execute(update(Job).where(Job.id == job.id).values(status="archived"))  # type: ignore[arg-type]
    sent = {
        "req-ok": ("/healthz", 200),
        "req-refused": ("/v1/audit", 401),
        "req-unknown": ("/nowhere", 404),
        "req-broken": (f"/v1/jobs/{job.id}", 500),
    }
    for request_id, (path, status) in sent.items():
        headers = {"X-Request-ID": request_id}
        if status == 401:
            headers["Authorization"] = "Bearer mtk_wrong"
        response = deployment.client.get(path, headers=headers)
        assert response.status_code == status, response.text
        assert response.headers["x-request-id"] == request_id
    assert_error(response, 500, "internal_error")

    def access_lines() -> list[dict[str, Any]]:
        return [line for line in _lines(deployment, "api") if line["logger"] == "uvicorn.access"]

    wait_for(lambda: len(access_lines()) >= len(sent) + 1, 30, "the access lines")  # and start_api's /readyz
    for line in access_lines():
        assert line.get("request_id"), line
    for request_id, (path, status) in sent.items():
        [line] = [line for line in access_lines() if line["request_id"] == request_id]
        assert f'"GET {path} HTTP/1.1" {status}' in line["message"], line
    [error] = [line for line in _lines(deployment, "api") if line["message"].startswith("unexpected")]
    assert error["request_id"] == "req-broken" and error["level"] == "ERROR"
