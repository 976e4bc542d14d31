"""Calibration forgets erased jobs (SQLite and PostgreSQL, real HTTP): an erased job's labels leave the curve and
its audit sample leaves the measured precision, as it leaves the labels export."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.api import Api
from tests.support.labels import decided_job, load_probe_policy, probe_policy

pytestmark = pytest.mark.timeout(120)

POLICY = load_probe_policy(probe_policy())


@pytest.fixture(scope="module")
def api_overrides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    policies = tmp_path_factory.mktemp("policies")
    (policies / "calib.yaml").write_text(probe_policy())
    return {"policies_dir": policies}


def weapons(api: Api) -> dict[str, Any]:
    response = api.client.get("/v1/calibration", params={"policy": "calib", "category": "weapons"})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_an_erased_jobs_labels_and_audit_sample_no_longer_count(api: Api) -> None:
    before = weapons(api)
    jobs = {}
    # An automatic block and an automatic allow (audit samples: audit_rate 1), and a review item between.
    for name, score, labels in (
        ("block", 0.9, {"weapons": True, "drugs": False}),
        ("allow", 0.1, {"weapons": False, "drugs": False}),
        ("review", 0.5, {"weapons": True, "drugs": False}),
    ):
        job_id, decision = decided_job(api.db_url, POLICY, {"weapons": score, "drugs": 0.1}, audit_rate=1.0)
        assert decision.action == name
        action = "block" if labels["weapons"] else "allow"
        body = {"action": action, "reason": "labelled by the test", "categories": labels}
        resolved = api.client.post(f"/v1/review/{job_id}/resolve", json=body)
        assert resolved.status_code == 200, resolved.text
        jobs[name] = job_id
    labelled = weapons(api)
    assert labelled["labelled"] == before["labelled"] + 3 and labelled["positives"] == before["positives"] + 2
    assert labelled["audit"]["block"]["sampled"] == before["audit"]["block"]["sampled"] + 1
    assert 0.9 in {point["threshold"] for point in labelled["points"]}

    assert api.client.delete(f"/v1/jobs/{jobs['block']}").status_code == 200
    forgotten = weapons(api)
    assert forgotten["labelled"] == labelled["labelled"] - 1 and forgotten["positives"] == labelled["positives"] - 1
    assert forgotten["audit"]["block"] == before["audit"]["block"]
    assert forgotten["audit"]["allow"] == labelled["audit"]["allow"]
    assert 0.9 not in {point["threshold"] for point in forgotten["points"]}
