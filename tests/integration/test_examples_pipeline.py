"""An `examples` policy end to end: examples uploaded through the API, embedded by a real worker (tiny random BLIP
models), then an image near the positives scores above one near the negatives, its evidence naming the examples.

With random weights, "near" is made by construction: the same photo slightly brightened or cropped.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_image
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
POLICY = """
name: bags
description: Counterfeit bags, taught by the tenant's examples.
categories:
  - name: counterfeit
    description: Looks like the tenant's known fakes.
    review: 0.5
    block: 0.99
    checks:
      - kind: examples
        set: fakes
        k: 10
"""


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def variants(name: str) -> list[bytes]:
    image = photo_image(name)
    return [
        jpeg(image),
        jpeg(ImageEnhance.Brightness(image).enhance(1.08)),
        jpeg(image.crop((8, 8, image.width - 8, image.height - 8))),
    ]


def test_an_image_near_the_positive_examples_scores_above_one_near_the_negatives(
    deployment: Deployment, tmp_path: Path
) -> None:
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / "bags.yaml").write_text(POLICY, encoding="utf-8")
    deployment.env["MODTAG_POLICIES_DIR"] = str(policies_dir)
    deployment.start_api()
    deployment.start_worker()
    client = deployment.client
    assert client.post("/v1/example-sets", json={"name": "fakes"}).status_code == 201

    examples: dict[str, list[str]] = {"positive": [], "negative": []}
    for label, photo in (("positive", "chelsea"), ("negative", "rocket")):
        for data in variants(photo):
            added = client.post(
                "/v1/example-sets/fakes/items",
                files={"image": ("e.jpg", data, "image/jpeg")},
                data={"label": label, "policy": "bags"},
            )
            assert added.status_code == 201, added.text
            examples[label].append(added.json()["job_id"])
    for job_id in examples["positive"] + examples["negative"]:
        assert wait_final(deployment, job_id)["status"] == "done"
    wait_for(lambda: client.get("/v1/example-sets/fakes").json()["pending"] == 0, 30, "every example embedded")

    near_positive = submit(
        deployment, jpeg(ImageEnhance.Brightness(photo_image("chelsea")).enhance(0.95)), policy="bags"
    )
    near_negative = submit(
        deployment, jpeg(ImageEnhance.Brightness(photo_image("rocket")).enhance(0.95)), policy="bags"
    )
    judged = {}
    for name, job in (("positive", near_positive), ("negative", near_negative)):
        final = wait_final(deployment, job["id"])
        assert final["status"] == "done", final
        (evidence,) = final["decision"]["evidence"]
        assert evidence["kind"] == "examples" and evidence["query"] == "fakes"
        judged[name] = evidence
    assert judged["positive"]["score"] > 0.5 > judged["negative"]["score"]
    assert judged["positive"]["matched"] in examples["positive"] and judged["positive"]["field"] == "positive"
    assert judged["negative"]["matched"] in examples["negative"] and judged["negative"]["field"] == "negative"
    voters = {f"{label}:{job_id}" for label, ids in examples.items() for job_id in ids}
    assert set(judged["positive"]["scores"]) == voters  # the six examples, each named with its label

    similar = client.get(f"/v1/jobs/{near_positive['id']}/similar", params={"limit": 3}).json()["data"]
    assert {row["job_id"] for row in similar} == set(examples["positive"])

    # Deleting the positives takes their votes away at once: the worker reloads the changed set.
    for job_id in examples["positive"]:
        assert client.delete(f"/v1/example-sets/fakes/items/{job_id}").status_code == 204
    again = wait_final(
        deployment, submit(deployment, jpeg(photo_image("chelsea").crop((4, 4, 500, 400))), policy="bags")["id"]
    )
    assert again["decision"]["evidence"][0]["field"] == "negative"
    assert again["decision"]["evidence"][0]["score"] == 0.0
