"""Videos by URL: the worker streams an `image_url` to disk, capped by what its first bytes are, and a video file or
an animation found there is probed, stored like an upload and recorded on the job (`media: video`). Served by a real
HTTP server, on SQLite and PostgreSQL; the last test runs the whole path through an API and a worker process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.blobs import LocalBlobStore
from core.db import session_scope
from core.dependencies import DependencyRecord
from core.errors import FetchError, VideoError
from core.jobs import NewJob, create_job
from core.settings import Settings
from core.tables import Job
from tests.support import videos
from tests.support.deployment import Deployment, wait_final
from tests.support.photos import photo_bytes, photo_image
from worker.url_media import fetch_url_media


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving the files of a directory: (its base URL, the directory)."""
    root = tmp_path_factory.mktemp("served")
    handler = partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fetching(database_url: str, tmp_path: Path) -> tuple[Settings, LocalBlobStore]:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=database_url,
        fetch_allow_private=True,
        max_upload_bytes=50_000,
        max_video_bytes=400_000,
        max_video_seconds=20,
    )
    return settings, LocalBlobStore(tmp_path / "blobs")


def url_job(settings: Settings, url: str) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job, _ = create_job(
            session, NewJob(tenant="default", policy="moderation", policy_version=None, source="url", image_url=url)
        )
        session.expunge(job)
        return job


def fetched(settings: Settings, blobs: LocalBlobStore, url: str) -> tuple[Job, bytes | None]:
    job = url_job(settings, url)
    return job, fetch_url_media(job, settings, blobs, DependencyRecord())


def stored_row(settings: Settings, job: Job) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Job, job.id)
        assert row is not None
        session.expunge(row)
        return row


def test_a_video_url_is_stored_and_recorded_as_a_video(
    served: tuple[str, Path], fetching: tuple[Settings, LocalBlobStore]
) -> None:
    base, root = served
    settings, blobs = fetching
    clip = videos.shots_clip(root, ["astronaut", "coffee"], 1.5)
    job, data = fetched(settings, blobs, f"{base}/{clip.name}")
    assert data is None
    row = stored_row(settings, job)
    assert (row.media, row.image_format, row.image_bytes) == ("video", "MP4", clip.stat().st_size)
    assert (row.image_width, row.image_height) == (160, 120)
    assert row.blob_key is not None and blobs.get(row.blob_key) == clip.read_bytes()
    assert (job.media, job.blob_key) == ("video", row.blob_key)  # the running job sees it too


def test_an_animation_url_is_a_video_and_a_photo_stays_bytes(
    served: tuple[str, Path], fetching: tuple[Settings, LocalBlobStore]
) -> None:
    base, root = served
    settings, blobs = fetching
    animated = videos.animated_image(root, "WEBP")
    job, data = fetched(settings, blobs, f"{base}/{animated.name}")
    assert data is None and stored_row(settings, job).media == "video"
    photo = photo_bytes("chelsea", size=(120, 90))
    (root / "chelsea.jpg").write_bytes(photo)
    job, data = fetched(settings, blobs, f"{base}/chelsea.jpg")
    assert data == photo
    row = stored_row(settings, job)
    assert (row.media, row.blob_key) == ("image", None)


def test_caps_follow_what_the_body_is(served: tuple[str, Path], fetching: tuple[Settings, LocalBlobStore]) -> None:
    base, root = served
    settings, blobs = fetching
    # A video under the video cap but over the image cap is taken...
    clip = videos.write_clip(root / "pan.mp4", [videos.Shot(6.0, photo_image("astronaut"), pan=0.3)])
    assert 50_000 < clip.stat().st_size < 400_000, clip.stat().st_size
    assert fetched(settings, blobs, f"{base}/pan.mp4")[1] is None
    # ...a PNG of the same size is not, nor a video over the video cap.
    (root / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(60_000))
    with pytest.raises(FetchError, match="MODTAG_MAX_UPLOAD_BYTES") as image:
        fetched(settings, blobs, f"{base}/big.png")
    assert (image.value.code, image.value.http_status) == ("fetch_too_large", 413)
    (root / "huge.mp4").write_bytes(clip.read_bytes() + b"\x00\x00\x00\x08free" * 45_000)
    with pytest.raises(FetchError, match="MODTAG_MAX_VIDEO_BYTES") as video:
        fetched(settings, blobs, f"{base}/huge.mp4")
    assert video.value.code == "fetch_too_large"


@pytest.mark.parametrize(
    ("make", "code"),
    [(videos.corrupt_clip, "video_corrupt"), (videos.unsupported_codec_clip, "video_codec_unsupported")],
)
def test_a_bad_video_url_fails_with_its_code_and_stores_nothing(
    served: tuple[str, Path], fetching: tuple[Settings, LocalBlobStore], make: Any, code: str
) -> None:
    base, root = served
    settings, blobs = fetching
    path = make(root)
    with pytest.raises(VideoError) as caught:
        fetched(settings, blobs, f"{base}/{path.name}")
    assert caught.value.code == code and not caught.value.retryable
    assert not [item for item in (settings.data_dir / "blobs").rglob("*") if item.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the path through the processes, once
def test_a_video_url_is_decided_on_its_frames(deployment: Deployment, served: tuple[str, Path]) -> None:
    base, root = served
    clip = videos.shots_clip(root, ["chelsea", "rocket"], 1.5)
    deployment.start_api()
    deployment.start_worker()
    response = httpx.post(
        f"{deployment.api_url}/v1/jobs", json={"image_url": f"{base}/{clip.name}"}, headers=deployment.headers
    )
    assert response.status_code == 202, response.text
    assert response.json()["media"] == "image"  # not known until the worker has fetched it
    final = wait_final(deployment, response.json()["id"], timeout_s=120)
    assert final["status"] == "done", final
    assert final["media"] == "video"
    assert [frame["time_s"] for frame in final["decision"]["frames"]] == [0.0, 1.5]
