"""The API's peak memory under the audit's upload load: concurrent 10-photo listings against a real `modtag api`.

`python -m modtag.bench.upload_memory` starts a Redis and a `modtag api` child process (SQLite and a blob
directory in a temporary folder), sends `--listings` concurrent listings of `--photos` photos of about
`--photo-mb` MB each, `--rounds` times, and prints a JSON report: the API's resident memory when idle and its
peak (VmHWM from /proc/<pid>/status), and how the listings were answered (202, or 503 `busy` past
MODTAG_UPLOAD_BYTES_IN_FLIGHT). Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from modtag.memory import process_memory_mb
from modtag.servers import RedisServer, free_port, wait_for_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listings", type=int, default=5, help="concurrent listings (default 5)")
    parser.add_argument("--photos", type=int, default=10, help="photos per listing (default 10)")
    parser.add_argument("--photo-mb", type=float, default=2.0, help="size of each photo in MB (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="waves of concurrent listings (default 3)")
    parser.add_argument("--s3", action="store_true", help="store the blobs in moto's S3 server (a child process)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.listings, args.photos, args.photo_mb, args.rounds, s3=args.s3), indent=2))
    return 0


def measure(listings: int, photos: int, photo_mb: float, rounds: int, *, s3: bool = False) -> dict[str, object]:
    """Start the API, send the load, and report its memory (MB) and the answers' status codes."""
    with tempfile.TemporaryDirectory(prefix="modtag-upload-memory-") as folder, contextlib.ExitStack() as stack:
        root = Path(folder)
        redis = RedisServer(root / "redis", persist=False).start()
        stack.callback(redis.stop)
        store_env = stack.enter_context(_moto_bucket(root)) if s3 else {}
        key = "bench-" + secrets.token_urlsafe(32)
        port = free_port()
        env = {
            **os.environ,
            "MODTAG_DATA_DIR": str(root / "data"),
            "MODTAG_REDIS_URL": redis.url,
            "MODTAG_ADMIN_KEY": key,
            "MODTAG_LOG_FORMAT": "text",
            **store_env,
        }
        log = (root / "api.log").open("wb")
        api = subprocess.Popen(
            [sys.executable, "-m", "modtag", "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_ready(base, api)
            idle = process_memory_mb(api.pid)
            images = [_photo(photo_mb, seed) for seed in range(photos)]
            statuses: Counter[str] = Counter()
            started = time.perf_counter()
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
                for round_ in range(rounds):
                    titles = [f"{round_}-{n}" for n in range(listings)]
                    with ThreadPoolExecutor(listings) as pool:
                        statuses.update(pool.map(lambda title: _send(client, images, title), titles))
            elapsed = time.perf_counter() - started
            after = process_memory_mb(api.pid)
        finally:
            api.terminate()
            api.wait(15)
            log.close()
    return {
        "blob_store": "s3 (moto)" if s3 else "directory",
        "listings": listings,
        "photos_per_listing": photos,
        "photo_bytes": len(images[0]),
        "rounds": rounds,
        "answers": dict(statuses),
        "seconds": round(elapsed, 1),
        "api_rss_idle_mb": idle["VmRSS"],
        "api_rss_after_mb": after["VmRSS"],
        "api_peak_rss_mb": after["VmHWM"],
    }


def _send(client: httpx.Client, images: list[bytes], title: str) -> str:
    files = [("images", (f"photo{index}.jpg", data, "image/jpeg")) for index, data in enumerate(images)]
    response = client.post("/v1/listings", files=files, data={"title": f"listing {title}"})
    if response.status_code >= 400:
        return f"{response.status_code} {response.json().get('code')}"
    return str(response.status_code)


def _photo(megabytes: float, seed: int) -> bytes:
    """A JPEG of about `megabytes` MB: noise compresses badly, so the size follows the pixel count."""
    side = int((megabytes * 1e6 / 0.9) ** 0.5)
    noise = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    noise.save(out, "JPEG", quality=90)
    return out.getvalue()


@contextlib.contextmanager
def _moto_bucket(root: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server in a child process with one bucket; the environment that points the API at it."""
    import boto3

    port = free_port()
    log = (root / "moto.log").open("wb")
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "MODTAG_BLOB_URL": "s3://bench/images",
    }
    try:
        wait_for_port("127.0.0.1", port, 30)
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        client.create_bucket(Bucket="bench")
        yield env
    finally:
        moto.terminate()
        moto.wait(15)
        log.close()


def _wait_ready(base: str, api: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise RuntimeError("the API exited before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the API was not ready within 60 s")


if __name__ == "__main__":
    sys.exit(main())
