"""Text read in listing photos and the main-photo rules, through real processes: `modtag api`, `modtag worker`
(tiny random BLIP, the real PP-OCR models from the rapidocr-onnxruntime wheel), Redis and a database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.deployment import Deployment, wait_listing
from tests.support.photos import product_photo

pytestmark = pytest.mark.timeout(300)


def post_listing(deployment: Deployment, photos: list[bytes]) -> dict[str, Any]:
    response = deployment.client.post(
        "/v1/listings",
        files=[("images", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(photos)],
        data={"title": "White coffee cup", "attributes": json.dumps({"color": "white"})},
    )
    assert response.status_code == 202, response.text
    return wait_listing(deployment, response.json()["id"])


def evidence(photo: dict[str, Any], category: str) -> dict[str, Any]:
    return next(entry for entry in photo["decision"]["evidence"] if entry["category"] == category)


def test_contact_details_in_a_photo_go_to_review_and_the_main_photo_rules_judge_the_main_photo(
    deployment: Deployment,
) -> None:
    deployment.start_api()
    deployment.start_worker()
    listing = post_listing(
        deployment,
        [
            product_photo(text="CALL 0176 5550 1423"),  # main photo: white background, a phone number on it
            product_photo(),  # the same photo without the text
            product_photo(background=(40, 90, 200)),  # not the main photo: its blue background is no rule's business
            product_photo(text="mail sales@cupshop.com"),  # an e-mail address
            product_photo(text="shop at www.cupshop.com"),  # a link
        ],
    )
    assert listing["verdict"]["status"] == "done"
    with_text, without_text, blue, with_email, with_link = listing["photos"]

    for photo, seen in ((with_text, "0176"), (with_email, "sales@cupshop.com"), (with_link, "www.cupshop.com")):
        contact = photo["decision"]["categories"]["contact_in_photo"]
        assert contact["fired"] and contact["action"] == "review", photo["decision"]["text"]
        line = evidence(photo, "contact_in_photo")
        assert seen in line["matched"] and line["score"] >= 0.5, line
    assert listing["verdict"]["categories"]["contact_in_photo"]["photos"] == [1, 4, 5]
    assert any("0176" in read["text"] for read in with_text["decision"]["text"])
    assert all(v >= 0 for read in with_text["decision"]["text"] for v in read["box"])
    assert not without_text["decision"]["categories"]["contact_in_photo"]["fired"]
    assert without_text["decision"]["text"] == []

    assert not blue["decision"]["categories"]["main_photo_rules"]["fired"]  # not the main photo
    assert "contact_in_photo" in listing["verdict"]["categories"]

    coloured = post_listing(deployment, [product_photo(background=(40, 90, 200)), product_photo()])
    main, other = coloured["photos"]
    rules = main["decision"]["categories"]["main_photo_rules"]
    assert rules["fired"] and rules["action"] == "review"
    measured = [e for e in main["decision"]["evidence"] if e["kind"] == "photo" and e["score"] == 1.0]
    assert any("white_background" in (e.get("scores") or {}) for e in measured)
    assert not other["decision"]["categories"]["main_photo_rules"]["fired"]
