"""Videos through real processes (API and Celery worker, tiny random models): a banked shot blocks the clip with its
time, an animated GIF is judged frame by frame, the thumbnail is the filmstrip, the video is served in ranges, and
an erasure takes the video, its filmstrip and its frames' hashes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from modtag.scan import find_images, print_table, scan
from tests.support.dashboard import csrf_of, signed_in
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_bytes, photo_image
from tests.support.videos import Shot, animated_image, write_clip
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SIZE = (160, 120)


def test_a_video_through_api_and_worker(
    deployment: Deployment,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    deployment.start_api()
    deployment.start_worker()
    client = deployment.client
    assert client.create_bank("known_bad", "removed before").status == 201
    banked = client.post("/v1/banks/known_bad/items", files={"image": ("a.png", photo_bytes("astronaut", "PNG", SIZE))})
    assert banked.status_code == 201, banked.text

    timeline = (("coffee", 3), ("astronaut", 2), ("chelsea", 2))
    shots = [Shot(seconds, photo_image(name, SIZE)) for name, seconds in timeline]
    clip_path = write_clip(tmp_path / "clip.mp4", shots, size=SIZE, fps=5)
    clip = clip_path.read_bytes()
    hook, received = receiver
    accepted = submit(deployment, clip, name="clip.mp4", callback_url=hook)
    assert accepted["media"] == "video", accepted
    job = wait_final(deployment, accepted["id"])
    decision = job["decision"]
    assert job["status"] == "done" and decision["action"] == "block", job
    assert decision["models"] == {} and decision["evidence"][0]["kind"] == "hash"
    assert decision["evidence"][0]["time_s"] == pytest.approx(3, abs=0.3)
    [segment] = decision["segments"]
    assert segment["category"] == "known_bad" and segment["start_s"] == pytest.approx(3, abs=0.3)
    assert segment["end_s"] == pytest.approx(5, abs=0.3)

    # Its webhook carries the frames and segments.
    [event] = wait_for(lambda: received, what="the clip's webhook")
    assert event["type"] == "job.decided" and event["data"]["decision"]["segments"] == decision["segments"]
    assert event["data"]["decision"]["frames"] == decision["frames"]

    # The thumbnail is the filmstrip of the judged frames; the video itself comes in ranges.
    strip = client.get(f"/v1/jobs/{job['id']}/thumbnail")
    assert strip.status_code == 200 and strip.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(strip.content)) as picture:
        assert picture.width >= len(decision["frames"]) * 60 and picture.height == 90
    part = client.get(f"/v1/jobs/{job['id']}/video", headers={"Range": "bytes=0-15"})
    assert part.status_code == 206 and part.content == clip[:16]

    # The job page plays the video (the cookie session reads it in ranges), lists the segments, and banks the frames.
    with signed_in(deployment.api_url, deployment.key) as browser:
        page = browser.get(f"/dashboard/jobs/{job['id']}")
        assert page.status_code == 200 and f'src="/v1/jobs/{job["id"]}/video"' in page.text
        segments = page.text.split('data-testid="segments"', 1)[1].split("</table>", 1)[0]
        assert "known_bad" in segments and "3.0 s" in segments
        assert browser.get(f"/v1/jobs/{job['id']}/video", headers={"Range": "bytes=0-9"}).status_code == 206
        pressed = browser.post(
            f"/dashboard/review/{job['id']}/bank-frames",
            data={"csrf_token": csrf_of(page), "next": f"/dashboard/jobs/{job['id']}", "bank": "known_bad"},
            follow_redirects=False,
        )
        assert pressed.status_code == 303 and pressed.headers["location"].endswith("notice=banked")
    [bank] = client.get("/v1/banks").json()["data"]
    assert bank["items"] == 2  # the photo banked first, and the one fired frame (its own PDQ hash, near the photo's)
    audit = client.get("/v1/audit", params={"action": "bank.import"}).json()["data"]
    assert audit and audit[0]["after"]["video_job"] == job["id"]

    # An animated GIF is judged on its frames (the models run on each), not its first.
    gif = animated_image(tmp_path, "GIF", names=("coffee", "chelsea", "rocket"), frame_ms=1000, size=SIZE)
    animated = wait_final(deployment, submit(deployment, gif.read_bytes(), name="a.gif")["id"])
    assert animated["status"] == "done" and animated["media"] == "video", animated
    assert [frame["time_s"] for frame in animated["decision"]["frames"]] == [0.0, 1.0, 2.0]
    assert animated["decision"]["models"]["random"] is True

    # `modtag scan` takes video files, with an upload bar per video, and names the segments in its table.
    results = scan(client, find_images([tmp_path]), timeout_s=120, progress=True)
    assert [result.path.name for result in results] == ["animated.gif", "clip.mp4"]
    assert all(result.job and result.job["status"] == "done" for result in results), results
    assert "clip.mp4" in capsys.readouterr().err  # its own bar
    table = io.StringIO()
    print_table(results, table)
    assert "known_bad 3-5 s" in table.getvalue() or "known_bad 3." in table.getvalue(), table.getvalue()
    assert "2 files: 2 decided, 0 failed" in table.getvalue()

    # Erasure takes the video and the filmstrip; the frames keep their scores, not their hashes.
    assert client.erase_job(job["id"]).status == 200
    for path in ("video", "thumbnail"):
        gone = client.get(f"/v1/jobs/{job['id']}/{path}")
        assert gone.status_code == 404 and gone.json()["code"] == "job_erased"
    erased = client.job(job["id"])["decision"]
    assert erased["frames"] and all("pdq" not in frame or frame["pdq"] is None for frame in erased["frames"])
    # The scan's copy of the clip has the same bytes and the same filmstrip: both stay until it is erased too.
    blobs = Path(deployment.env["MODTAG_DATA_DIR"]) / "blobs"
    prefix = strip.headers["etag"].strip('"')
    assert len(prefix) == 32 and [path for path in blobs.rglob(f"{prefix}*") if path.is_file()]
    [again] = [result.job for result in results if result.path.name == "clip.mp4" and result.job]
    assert client.get(f"/v1/jobs/{again['id']}/thumbnail").content == strip.content
    assert client.erase_job(again["id"]).status == 200
    assert not [path for path in blobs.rglob(f"{prefix}*") if path.is_file()]
    assert not [path for path in blobs.rglob(f"{hashlib.sha256(clip).hexdigest()}*") if path.is_file()]
