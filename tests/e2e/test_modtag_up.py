"""`modtag up` as a user runs it: one command, driven over HTTP, stopped with SIGINT, started again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modtag.client import ApiClient
from modtag.servers import free_port
from tests.support.photos import photo_bytes
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Up:
    def __init__(self, data_dir: Path, models_cache: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODTAG_")}
        env.update(
            {
                "MODTAG_MODELS_CACHE_DIR": str(models_cache),
                "MODTAG_WORKER_METRICS_PORT": "0",
                "MODTAG_MAX_UPLOAD_BYTES": "2000000",
                **(extra_env or {}),
            }
        )
        self.log = (data_dir.parent / f"up-{self.port}.log").open("w+b")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modtag", "up", "--port", str(self.port), "--models", "tiny-random",
             "--data-dir", str(data_dir), "--workers", "1"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    @property
    def key(self) -> str:
        """The admin key `modtag up` printed (a new one each start)."""
        match = re.search(r"^admin key: (mtk_\S+)$", self.output(), re.M)
        assert match, self.output()
        return match.group(1)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_up(self, timeout_s: float = 180) -> None:
        def up() -> bool:
            assert self.process.poll() is None, self.output()
            return "modtag is up" in self.output()

        wait_for(up, timeout_s, "modtag up printing `modtag is up`")

    def client(self) -> ApiClient:
        """A client of this stack's API with the admin key it printed."""
        return ApiClient(self.url, key=self.key)

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)


@pytest.fixture
def up(tmp_path: Path, models_cache: Path) -> Iterator[Up]:
    stack = Up(tmp_path / "data", models_cache)
    yield stack
    if stack.process.poll() is None:
        stack.process.kill()
        stack.process.wait()


def test_up_judges_photos_refuses_bad_input_and_stops_cleanly(up: Up, tmp_path: Path, models_cache: Path) -> None:
    up.wait_up()
    assert up.url in up.output()
    assert f"dashboard: {up.url}/dashboard" in up.output()
    refused = httpx.post(f"{up.url}/v1/jobs", files={"image": ("a.png", photo_bytes("rocket", "PNG"))})
    assert refused.status_code == 401 and refused.json()["code"] == "auth_required"
    ids = []
    for name in ("astronaut", "chelsea", "coffee"):
        response = httpx.post(
            f"{up.url}/v1/jobs", files={"image": (f"{name}.png", photo_bytes(name, "PNG"))}, headers=up.headers
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    bad_inputs = {
        "empty": (b"", {400, 415, 422}, "image_empty"),
        "text": (b"hello, I am not an image", {415}, "image_unsupported"),
        "html": (b"<html><body>hi</body></html>", {415}, "image_unsupported"),
        "huge": (b"\xff\xd8\xff" + b"\0" * 2_500_000, {413}, "image_too_large"),
    }
    for name, (data, statuses, code) in bad_inputs.items():
        response = httpx.post(f"{up.url}/v1/jobs", files={"image": (name, data)}, headers=up.headers)
        assert response.status_code in statuses, (name, response.text)
        body = response.json()
        assert set(body) == {"detail", "code"} and body["detail"], (name, body)
        assert body["code"] == code, (name, body)
    with up.client() as client:
        for job_id in ids:
            final = client.wait_job(job_id, timeout_s=60)
            assert final["status"] == "done", final
    metrics = httpx.get(f"{up.url}/metrics").text  # open: Prometheus carries no key
    assert "modtag_jobs_submitted_total" in metrics

    # `modtag scan --api` against the running stack: a table, exit status 0 for the example photos.
    scan = subprocess.run(
        [sys.executable, "-m", "modtag", "scan", "--api", up.url, "--no-progress", "--api-key", up.key, str(EXAMPLES)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert scan.returncode == 0, scan.stdout + scan.stderr
    assert "decided, 0 failed" in scan.stdout
    # Without a key it stops at the first refusal and says what to do.
    keyless = subprocess.run(
        [sys.executable, "-m", "modtag", "scan", "--api", up.url, "--no-progress", str(EXAMPLES)],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "MODTAG_API_KEY"},
    )  # fmt: skip
    assert keyless.returncode == 3 and "--api-key" in keyless.stderr and "auth_required" in keyless.stderr
    first_key = up.key

    assert up.interrupt() == 0, up.output()
    assert "modtag stopped" in up.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{up.url}/healthz", timeout=2)

    # Started again on the same data directory: every decision is still there.
    again = Up(tmp_path / "data", models_cache)
    try:
        again.wait_up()
        assert again.key != first_key
        for job_id in ids:
            job = httpx.get(f"{again.url}/v1/jobs/{job_id}", headers=again.headers).json()
            assert job["status"] == "done" and job["decision"]["action"] in ("allow", "review", "block")
        # Only the key of the last `modtag up` works.
        stale = httpx.get(f"{again.url}/v1/jobs/{ids[0]}", headers={"Authorization": f"Bearer {first_key}"})
        assert stale.status_code == 401 and stale.json()["code"] == "auth_revoked"
        assert again.interrupt() == 0
    finally:
        if again.process.poll() is None:
            again.process.kill()


def test_scan_exits_nonzero_when_a_job_fails(up: Up, tmp_path: Path) -> None:
    up.wait_up()
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(photo_bytes("rocket"))
    (folder / "broken.jpg").write_bytes(photo_bytes("rocket")[:3000])
    scan = subprocess.run(
        [sys.executable, "-m", "modtag", "scan", "--api", up.url, "--no-progress", str(folder)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MODTAG_API_KEY": up.key},
    )  # fmt: skip
    assert scan.returncode == 1, scan.stdout + scan.stderr
    assert "broken.jpg" in scan.stdout and "image_truncated" in scan.stdout
    assert "1 decided, 1 failed" in scan.stdout
