"""A real S3 HTTP server as a fixture: moto's server mode in a child process, a fresh bucket per test.

MinIO is what production-like setups would run, but it is not installable here (no registry ships it);
moto speaks the same S3 REST API over real HTTP, so boto3 and the blob store run their real code paths.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modtag.servers import free_port, wait_for_port

# moto accepts any credentials; these only keep boto3 from looking for real ones.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "modtag-test", "AWS_SECRET_ACCESS_KEY": "modtag-test-secret"}


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on the test server: the AWS_* variables that reach it and the blob URL naming it."""

    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    @property
    def blob_url(self) -> str:
        return f"s3://{self.bucket}/images"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server over HTTP on a free port, for the session."""
    port = free_port()
    log = (Path(tmp_path_factory.mktemp("s3")) / "moto.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port("127.0.0.1", port, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new, empty bucket; this process's AWS_* variables point at it for the test."""
    import boto3

    bucket = S3Bucket(s3_endpoint, f"modtag-{uuid.uuid4().hex[:12]}")
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket.bucket)
    return bucket


def object_names(bucket: S3Bucket) -> list[str]:
    """Every object name in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=bucket.endpoint, region_name="us-east-1")  # s3_bucket set the keys
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
