"""POST /v1/jobs with videos and animated images, over real HTTP on SQLite and PostgreSQL: accepted as `media: video`
after a probe, refused with a code (and nothing stored, nothing queued) when corrupt, too long, too large or in a
codec modtag does not take; a 500 MiB upload through a real API process leaves its memory where it was."""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from core.db import session_scope
from core.tables import Job
from modtag.memory import process_memory_mb
from tests.support import videos
from tests.support.api import Api, assert_error, running_api
from tests.support.deployment import Deployment
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

MAX_UPLOAD = 200_000
MAX_VIDEO = 600_000
MAX_SECONDS = 5


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"max_upload_bytes": MAX_UPLOAD, "max_video_bytes": MAX_VIDEO, "max_video_seconds": MAX_SECONDS}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


def blob_files(api: Api) -> set[Path]:
    root = api.settings.blob_dir
    assert root is not None
    return {path for path in root.rglob("*") if path.is_file()}


def upload(api: Api, path: Path, mime: str = "application/octet-stream") -> httpx.Response:
    return api.upload(path.read_bytes(), filename=path.name, mime=mime)


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda d: videos.shots_clip(d, ["astronaut", "coffee"], 1.5), "MP4"),
        (lambda d: videos.shots_clip(d, ["astronaut", "coffee"], 1.5, codec="vp9"), "WEBM"),
        (lambda d: videos.shots_clip(d, ["astronaut", "coffee"], 1.5, codec="mpeg4"), "MOV"),
        (lambda d: videos.animated_image(d, "GIF"), "GIF"),
        (lambda d: videos.animated_image(d, "WEBP"), "WEBP"),
        (lambda d: videos.animated_image(d, "PNG"), "PNG"),
    ],
)
def test_videos_and_animations_are_accepted_as_video(api: Api, clips: Path, make: Any, fmt: str) -> None:
    path = make(clips)
    response = upload(api, path, mime="video/mp4" if fmt == "GIF" else "application/octet-stream")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["media"] == "video" and job["status"] == "queued"
    assert job["hashes"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert api.client.get(f"/v1/jobs/{job['id']}").json()["media"] == "video"
    assert job["id"] in [message["headers"]["id"].removeprefix("job-") for message in api.messages()]
    with session_scope(api.db_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert (row.media, row.image_format, row.image_bytes) == ("video", fmt, path.stat().st_size)
        assert (row.image_width, row.image_height) in ((160, 120), (96, 72))


def test_a_still_image_stays_an_image(api: Api, clips: Path) -> None:
    still = ((photo_bytes("coffee", size=(120, 90)), "coffee.jpg"), (photo_bytes("rocket", "GIF", (64, 48)), "x.gif"))
    for data, name in still:
        response = api.upload(data, filename=name)
        assert response.status_code == 202, response.text
        assert response.json()["media"] == "image"


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (videos.corrupt_clip, 422, "video_corrupt"),
        (videos.truncated_clip, 422, "video_corrupt"),
        (videos.audio_only, 422, "video_no_stream"),
        (videos.unsupported_codec_clip, 422, "video_codec_unsupported"),
        (lambda d: videos.huge_frames_clip(d, side=4200), 422, "video_frame_too_large"),
        (lambda d: videos.static_clip(d, seconds=MAX_SECONDS + 1), 422, "video_too_long"),
        (lambda d: videos.animated_image(d, "GIF", frame_ms=2000), 422, "video_too_long"),  # 8 s of GIF
    ],
)
def test_bad_videos_are_refused_with_a_code_and_nothing_is_kept(
    api: Api, clips: Path, make: Any, status: int, code: str
) -> None:
    path = make(clips)
    before_jobs, before_blobs, before_messages = api.job_count(), blob_files(api), len(api.messages())
    body = assert_error(upload(api, path), status, code)
    assert body["detail"]
    assert api.job_count() == before_jobs
    assert blob_files(api) == before_blobs
    assert len(api.messages()) == before_messages


def test_a_video_over_its_byte_limit_is_413_while_it_arrives(api: Api, clips: Path) -> None:
    clip = videos.shots_clip(clips, ["astronaut"], 0.5).read_bytes()
    big = clip + _free_box(MAX_VIDEO)  # a valid MP4 (a trailing `free` box) over the video limit
    before = api.job_count()
    assert_error(api.upload(big, filename="big.mp4", mime="video/mp4"), 413, "video_too_large")
    # Chunked: no Content-Length to check, the file's own cap stops it.
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    chunked = api.client.post("/v1/jobs", files={"image": ("big.mp4", _Chunks(chunks), "video/mp4")})
    assert_error(chunked, 413, "video_too_large")
    # An image in the same body cap still stops at the image limit.
    image = b"\x89PNG\r\n\x1a\n" + b"\x00" * MAX_UPLOAD
    assert_error(api.upload(image, filename="x.png", mime="image/png"), 413, "image_too_large")
    assert api.job_count() == before


def test_a_listing_takes_no_video(api: Api, clips: Path) -> None:
    clip = videos.shots_clip(clips, ["astronaut"], 0.5).read_bytes()
    response = api.client.post("/v1/listings", files={"images": ("clip.mp4", clip, "video/mp4")}, data={"title": "x"})
    assert_error(response, 415, "image_unsupported")


def test_concurrent_videos_share_one_cap_on_the_temporary_disk(api: Api, clips: Path) -> None:
    """A video holds only an image's share of the bytes in flight (it is never read whole), but its whole length of
    MODTAG_UPLOAD_SPOOL_BYTES while it sits on the API's disk: a second video past that waits, then is 503 `busy`."""
    settings = api.settings.model_copy(update={"upload_spool_bytes": 700_000, "upload_wait_s": 0.3})
    app = create_app(settings)
    clip = videos.shots_clip(clips, ["astronaut"], 0.5).read_bytes()
    boundary = "modtag-spool-boundary"
    first = _multipart(clip + _free_box(500_000 - len(clip)), boundary)
    second = clip + _free_box(250_000 - len(clip))
    release = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield first[:1000]
        assert release.wait(60), "the test never let the first upload finish"
        yield first[1000:]

    with running_api(settings, app) as served, ThreadPoolExecutor(1) as pool:
        headers = {
            "Authorization": f"Bearer {served.key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(first)),  # declared: what it holds of the spool budget from its first byte
        }
        pending = pool.submit(httpx.post, f"{served.base_url}/v1/jobs", content=stalled(), headers=headers, timeout=60)
        try:
            wait_for(lambda: app.state.spool_budget.held >= len(first), 10, "the first video holding its disk room")
            assert app.state.upload_budget.held < len(first)  # the bytes-in-flight budget holds an image's share
            refused = served.upload(second, filename="second.mp4", mime="video/mp4")
            body = assert_error(refused, 503, "busy")
            assert "MODTAG_UPLOAD_SPOOL_BYTES" in body["detail"] and int(refused.headers["retry-after"]) >= 1
        finally:
            release.set()
        assert pending.result().status_code == 202, pending.result().text
        accepted = served.upload(second, filename="second.mp4", mime="video/mp4")
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["media"] == "video"
        # Each gives its room back as its answer ends (just after the client has it).
        wait_for(lambda: app.state.spool_budget.held == app.state.upload_budget.held == 0, 10, "the room given back")


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the API's memory, not the database, is measured
def test_a_500_mib_upload_does_not_raise_the_api_memory(deployment: Deployment, tmp_path: Path) -> None:
    """A real API process receives a 500 MiB MP4 (a real clip and a 500 MiB trailing box), streamed from a generator:
    its peak resident memory (VmHWM) rises by a few MiB at most, and the video is stored whole."""
    api = deployment.start_api()
    clip = videos.shots_clip(tmp_path, ["astronaut", "coffee"], 0.5).read_bytes()
    total = 500 * 1024 * 1024
    padding = total - len(clip)
    zeros = bytes(1024 * 1024)

    def body() -> Iterator[bytes]:
        yield clip
        yield struct.pack(">I", padding) + b"free"
        left = padding - 8
        while left:
            piece = zeros[: min(left, len(zeros))]
            left -= len(piece)
            yield piece

    digest = hashlib.sha256()
    for piece in body():
        digest.update(piece)
    # A small video first: the API loads FFmpeg's libraries on its first probe, which is not the upload's cost.
    warm_up = httpx.post(
        f"{deployment.api_url}/v1/jobs", files={"image": ("clip.mp4", clip, "video/mp4")}, headers=deployment.headers
    )
    assert warm_up.status_code == 202, warm_up.text
    before = process_memory_mb(api.pid)
    boundary = "modtag-video-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.mp4"\r\n'
    head += "Content-Type: video/mp4\r\n\r\n"

    def multipart() -> Iterator[bytes]:
        yield head.encode()
        yield from body()
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{deployment.api_url}/v1/jobs",
        content=multipart(),
        headers={**deployment.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=120,
    )
    after = process_memory_mb(api.pid)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["media"] == "video"
    assert job["hashes"]["sha256"] == digest.hexdigest()
    assert after["VmHWM"] - before["VmHWM"] < 8, (before, after)


class _Chunks:
    """A file-like object httpx streams in pieces (no length: a chunked upload)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def _multipart(data: bytes, boundary: str) -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="first.mp4"\r\n'
    return (head + "Content-Type: video/mp4\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def _free_box(size: int) -> bytes:
    return struct.pack(">I", size) + b"free" + bytes(size - 8)
