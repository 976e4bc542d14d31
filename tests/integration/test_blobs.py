"""The blob store's one contract on both backends: a directory and S3 over real HTTP (moto's server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.blobs import BlobStore, LocalBlobStore, S3BlobStore, open_blob_store
from core.errors import ConfigError, NotFound, TransientError
from core.settings import Settings
from modtag.servers import free_port
from tests.support.s3 import S3Bucket, object_names


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each backend as `open_blob_store` builds it from MODTAG_BLOB_URL."""
    s3 = request.param == "s3"
    url = request.getfixturevalue("s3_bucket").blob_url if s3 else (tmp_path / "blobs").as_uri()
    return open_blob_store(Settings(_env_file=None, data_dir=tmp_path, blob_url=url))


def test_put_get_delete_round_trip_by_content_address(store: BlobStore) -> None:
    data = b"\x89PNG not really, but bytes all the same" * 100
    key = store.put(data)
    assert len(key) == 64 and store.put(data) == key  # the same content, the same key, written once
    assert store.get(key) == data
    store.delete(key)
    with pytest.raises(NotFound) as missing:
        store.get(key)
    assert missing.value.code == "blob_missing"
    store.delete(key)  # deleting what is gone is no error: a second eraser does not fail


def test_a_key_that_is_not_a_hash_never_reaches_the_store(store: BlobStore) -> None:
    for key in ("../../etc/passwd", "ab/" + "0" * 64, "0" * 63):
        with pytest.raises(NotFound):
            store.get(key)


def test_s3_objects_live_under_the_prefix(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    store = open_blob_store(Settings(_env_file=None, data_dir=tmp_path, blob_url=s3_bucket.blob_url))
    assert isinstance(store, S3BlobStore)
    key = store.put(b"one image")
    assert object_names(s3_bucket) == [f"images/{key[:2]}/{key}"]
    assert not (tmp_path / "blobs").exists()  # nothing on the local disk


def test_an_unreachable_store_is_transient_and_a_missing_bucket_is_not(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(TransientError) as down:
        S3BlobStore(s3_bucket.bucket).put(b"data")
    assert down.value.code == "blob_store_unavailable" and down.value.retryable
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    with pytest.raises(ConfigError) as denied:
        S3BlobStore("no-such-bucket-here").put(b"data")
    assert denied.value.code == "blob_store_denied"


def test_the_default_store_is_the_blob_directory(tmp_path: Path) -> None:
    store = open_blob_store(Settings(_env_file=None, data_dir=tmp_path))
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path.resolve() / "blobs"


def test_ranged_reads_stream_the_bytes_asked_for(store: BlobStore) -> None:
    """Video serving and the worker's copy read blobs in ranges, chunk by chunk, on both backends."""
    from core.blobs import CHUNK_BYTES

    data = bytes(range(256)) * (CHUNK_BYTES // 128)  # two chunks and a bit more
    data += b"tail"
    key = store.put(data)
    assert store.size(key) == len(data)
    whole = list(store.read_range(key, 0, len(data)))
    assert b"".join(whole) == data and max(len(chunk) for chunk in whole) <= CHUNK_BYTES and len(whole) >= 3
    assert b"".join(store.read_range(key, 100, 1000)) == data[100:1000]
    assert b"".join(store.read_range(key, len(data) - 4, len(data))) == b"tail"
    assert b"".join(store.read_range(key, 5, 5)) == b""
    store.delete(key)
    with pytest.raises(NotFound):
        store.size(key)
    with pytest.raises(NotFound):
        b"".join(store.read_range(key, 0, 10))
