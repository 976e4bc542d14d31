"""Signed, retried webhooks (Standard Webhooks) from a real worker to a real receiver, verified with the
`standardwebhooks` package; the secret, its rotation and the delivery log over the API."""

from __future__ import annotations

import json

import pytest
from standardwebhooks.webhooks import Webhook

from core import __version__
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_bytes
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)

FAST_RETRIES = {"MODTAG_WEBHOOK_RETRY_INTERVALS_S": "[0.2, 0.2, 0.2]", "MODTAG_WEBHOOK_POLL_S": "0.1"}


def test_a_refused_webhook_is_retried_with_the_same_id_and_signed(
    deployment: Deployment, webhook_receiver: WebhookReceiver
) -> None:
    deployment.start_api()
    deployment.start_worker(**FAST_RETRIES)
    secret = deployment.client.get("/v1/webhooks/secret").json()["secret"]
    assert secret.startswith("whsec_")
    webhook_receiver.refuse = 2  # the receiver is down for the first two attempts
    job = submit(deployment, photo_bytes("coffee"), callback_url=webhook_receiver.url)
    assert wait_final(deployment, job["id"])["status"] == "done"
    wait_for(lambda: len(webhook_receiver.attempts) >= 3, 60, "the third attempt")

    ids = {headers["webhook-id"] for headers, _ in webhook_receiver.attempts}
    assert len(ids) == 1 and next(iter(ids)).startswith("msg_")
    bodies = {body for _, body in webhook_receiver.attempts}
    assert len(bodies) == 1
    for headers, body in webhook_receiver.attempts:
        verified = Webhook(secret).verify(body, headers)
        assert verified["type"] == "job.decided" and verified["data"]["id"] == job["id"]
        assert verified["data"]["status"] == "done" and verified["data"]["decision"]["action"]
        assert headers["user-agent"] == f"modtag-webhooks/{__version__}"
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "QUFB" * 8).verify(body, headers)

    def delivered() -> bool:
        page = deployment.client.get("/v1/webhooks/deliveries").json()["data"]
        return bool(page) and page[0]["status"] == "delivered"

    wait_for(delivered, 30, "the delivery log says delivered")
    (entry,) = deployment.client.get("/v1/webhooks/deliveries").json()["data"]
    assert entry["id"] in ids and entry["subject_id"] == job["id"] and entry["event_type"] == "job.decided"
    assert entry["attempts"] == 3 and entry["last_status_code"] == 204


def test_a_webhook_is_abandoned_after_the_last_retry(deployment: Deployment, webhook_receiver: WebhookReceiver) -> None:
    deployment.start_api()
    deployment.start_worker(**FAST_RETRIES)
    webhook_receiver.refuse = 1000
    job = submit(deployment, photo_bytes("coffee"), callback_url=webhook_receiver.url)
    wait_final(deployment, job["id"])

    def failed() -> bool:
        page = deployment.client.get("/v1/webhooks/deliveries", params={"status": "failed"}).json()["data"]
        return len(page) == 1

    wait_for(failed, 60, "the delivery given up")
    (entry,) = deployment.client.get("/v1/webhooks/deliveries", params={"status": "failed"}).json()["data"]
    assert entry["attempts"] == 4 and entry["last_status_code"] == 503 and "503" in entry["last_error"]
    assert len(webhook_receiver.attempts) == 4


def test_after_a_rotation_both_secrets_sign(deployment: Deployment, webhook_receiver: WebhookReceiver) -> None:
    deployment.start_api()
    deployment.start_worker(**FAST_RETRIES)
    old = deployment.client.get("/v1/webhooks/secret").json()["secret"]
    rotated = deployment.client.post("/v1/webhooks/secret/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_valid_until"]
    assert deployment.client.get("/v1/webhooks/secret").json()["secret"] == new
    job = submit(deployment, photo_bytes("coffee"), callback_url=webhook_receiver.url)
    wait_final(deployment, job["id"])
    wait_for(lambda: len(webhook_receiver.attempts) >= 1, 30, "the webhook")
    headers, body = webhook_receiver.attempts[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert json.loads(body) == Webhook(secret).verify(body, headers)


def test_a_final_job_whose_webhook_was_never_recorded_gets_it(
    deployment: Deployment, webhook_receiver: WebhookReceiver
) -> None:
    from core.db import session_scope
    from core.jobs import NewJob, create_job, fail_job

    # A worker that died between failing the job and recording its webhook leaves exactly this behind.
    with session_scope(deployment.env["MODTAG_DATABASE_URL"]) as session:
        job, _ = create_job(
            session,
            NewJob(
                tenant="default",
                policy="moderation",
                policy_version=None,
                source="url",
                image_url="https://img.example/a.jpg",
                callback_url=webhook_receiver.url,
            ),
        )
        fail_job(session, job.id, "fetch_dns", "the host img.example has no address")
    deployment.start_api()
    deployment.start_worker(**FAST_RETRIES, MODTAG_QUEUED_GRACE_S="1")
    wait_for(lambda: len(webhook_receiver.attempts) >= 1, 60, "the recovered webhook")
    secret = deployment.client.get("/v1/webhooks/secret").json()["secret"]
    headers, body = webhook_receiver.attempts[0]
    verified = Webhook(secret).verify(body, headers)
    assert verified["type"] == "job.failed" and verified["data"]["id"] == job.id
    assert verified["data"]["error"]["code"] == "fetch_dns"
