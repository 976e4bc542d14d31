"""The image store: where uploaded and fetched image bytes live until the worker has judged them.

One interface, two backends chosen by `MODTAG_BLOB_URL` (`open_blob_store`): a directory (`file:///path`,
what one machine and `modtag up` use) and S3-compatible object storage (`s3://bucket/prefix`: AWS S3,
MinIO, R2, Ceph, GCS's S3 API), so API and workers share no directory. S3 goes through boto3: the
conservative choice, whose credential chain covers what a cluster hands a pod (the `AWS_*` variables,
web identity tokens, instance profiles), which honours AWS_ENDPOINT_URL(_S3) as every AWS SDK does,
whose standard retry mode absorbs the store's throttling, and against which moto (the tests' S3
server) is built. obstore would add GCS and Azure natively with one small wheel, but it is young
(0.x), asks for an explicit allow-http option per client, and every store named above speaks S3.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from core.dependencies import Dependency
from core.errors import ConfigError, DependencyUnavailable, NotFound, TransientError
from core.settings import Settings

_KEY = re.compile(r"^[0-9a-f]{64}$")


class BlobStore(Protocol):
    """Content-addressed storage: `put` returns a key that `get` accepts on any process sharing the store."""

    def put(self, data: bytes) -> str: ...

    def put_file(self, source: BinaryIO) -> str:
        """`put` the bytes from `source`'s position to its end, streamed in chunks (never whole in memory); the
        same key `put` would give. `source` must be seekable (an upload's spool)."""
        ...

    def get(self, key: str) -> bytes: ...

    def size(self, key: str) -> int:
        """The blob's length in bytes; NotFound `blob_missing` when it is not there."""
        ...

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes `start` to `end` (exclusive) of the blob, in chunks of at most CHUNK_BYTES: a video served
        with range requests or copied to a worker's file, never whole in memory."""
        ...

    def delete(self, key: str) -> None: ...

    def ping(self) -> None:
        """Reach the store cheaply (a stat, a HEAD of the bucket); DependencyUnavailable when it cannot be."""
        ...

    def keys_older_than(self, cutoff: datetime) -> Iterator[str]:
        """The keys of the blobs last stored before `cutoff` (for the orphan sweep, core/erasure.py)."""
        ...

    def modified_at(self, key: str) -> datetime | None:
        """When the blob was last stored (a `put` of the same bytes counts), or None when it is not there."""
        ...


def open_blob_store(settings: Settings) -> BlobStore:
    """The store MODTAG_BLOB_URL names (`file://` or `s3://`; default the blob directory); ConfigError for another."""
    url = settings.resolved_blob_url
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(unquote(parts.path)))
    if parts.scheme == "s3" and parts.netloc:
        # Enough connections for every task thread of a worker to read at once.
        connections = max(10, settings.resolved_worker_concurrency)
        return S3BlobStore(parts.netloc, parts.path.strip("/"), max_connections=connections)
    raise ConfigError(f"blob store URL {url!r} is neither file:///path nor s3://bucket/prefix", code="blob_url_invalid")


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# What a streaming put reads at a time.
CHUNK_BYTES = 1024 * 1024


class LocalBlobStore:
    """Blobs as files under one directory (a local disk or a shared volume), keyed by SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        try:
            return self._put(data)
        except OSError as exc:  # a full or failing disk is the store's outage, not the image's
            raise _disk_unavailable(exc) from exc

    def _put(self, data: bytes) -> str:
        key = blob_key(data)
        path = self.root / _relative(key)
        if path.exists():
            try:
                os.utime(path)  # stored again now: the orphan sweep measures a blob's age from its last put
                return key
            except FileNotFoundError:
                pass  # deleted in between: store it again
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file and two writers cannot collide.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def put_file(self, source: BinaryIO) -> str:
        try:
            return self._put_file(source)
        except OSError as exc:
            raise _disk_unavailable(exc) from exc

    def _put_file(self, source: BinaryIO) -> str:
        # Hashed while copied to a temporary file in the store, then renamed to its key (or dropped: already there).
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            key = digest.hexdigest()
            path = self.root / _relative(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)  # the same bytes under the same name: replacing an existing blob also dates it now
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        try:
            return (self.root / _relative(key)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(key) from None
        except OSError as exc:
            raise _disk_unavailable(exc) from exc

    def size(self, key: str) -> int:
        try:
            return (self.root / _relative(key)).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(key) from None
        except OSError as exc:
            raise _disk_unavailable(exc) from exc

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        try:
            handle = (self.root / _relative(key)).open("rb")
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(key) from None
        except OSError as exc:
            raise _disk_unavailable(exc) from exc
        return _chunks_of(handle, start, end)

    def delete(self, key: str) -> None:
        try:
            (self.root / _relative(key)).unlink(missing_ok=True)
        except OSError as exc:
            raise _disk_unavailable(exc) from exc

    def keys_older_than(self, cutoff: datetime) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if _KEY.match(path.name) and (modified := self.modified_at(path.name)) is not None and modified < cutoff:
                yield path.name

    def modified_at(self, key: str) -> datetime | None:
        try:
            return datetime.fromtimestamp((self.root / _relative(key)).stat().st_mtime, UTC)
        except FileNotFoundError:
            return None

    def ping(self) -> None:
        try:
            if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
                raise DependencyUnavailable(Dependency.BLOB_STORE, f"{self.root} is not a writable directory")
        except OSError as exc:
            raise _disk_unavailable(exc) from exc


class S3BlobStore:
    """Blobs as objects `prefix/ab/<sha256>` in one bucket. Region, endpoint and credentials come from the
    standard AWS variables (AWS_REGION, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): an `http://` endpoint
    is used only when AWS_ENDPOINT_URL names one. An unreachable store is a TransientError: the job retries."""

    def __init__(self, bucket: str, prefix: str = "", *, max_connections: int = 10) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        config = Config(
            # One connection per task thread that may read at once; "standard" retries back off on throttling.
            max_pool_connections=max_connections,
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=5,
            read_timeout=30,
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
            config=config,
        )

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        with self._errors(key):
            # The key is the content's hash, so writing it again is harmless: no read-before-write round trip.
            self._client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)
        return key

    def put_file(self, source: BinaryIO) -> str:
        from boto3.s3.transfer import TransferConfig

        start = source.tell()
        digest = hashlib.sha256()
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
        key = digest.hexdigest()
        source.seek(start)
        # One part in memory at a time: a multipart upload past 8 MB, read from the file part by part.
        config = TransferConfig(
            multipart_threshold=8 * CHUNK_BYTES, multipart_chunksize=8 * CHUNK_BYTES, use_threads=False
        )
        with self._errors(key):
            self._client.upload_fileobj(source, self.bucket, self._name(key), Config=config)
        return key

    def get(self, key: str) -> bytes:
        with self._errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
            return bytes(response["Body"].read())

    def size(self, key: str) -> int:
        with self._errors(key):
            return int(self._client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return iter(())
        with self._errors(key):
            span = f"bytes={start}-{end - 1}"
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key), Range=span)
        return self._streamed(key, response["Body"])

    def _streamed(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            with self._errors(key):
                yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def keys_older_than(self, cutoff: datetime) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        with self._errors(""):
            for page in pages:
                for entry in page.get("Contents", []):
                    name = str(entry["Key"]).rsplit("/", 1)[-1]
                    if _KEY.match(name) and entry["LastModified"] < cutoff:
                        yield name

    def modified_at(self, key: str) -> datetime | None:
        try:
            with self._errors(key):
                modified: datetime = self._client.head_object(Bucket=self.bucket, Key=self._name(key))["LastModified"]
        except NotFound:
            return None
        return modified

    def ping(self) -> None:
        try:
            with self._errors(""):
                self._client.head_bucket(Bucket=self.bucket)
        except NotFound:  # HEAD answers a bare 404 for a missing bucket
            raise ConfigError(f"object storage has no bucket {self.bucket!r}", code="blob_store_denied") from None

    def _name(self, key: str) -> str:
        return self.prefix + _relative(key)

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """botocore's exceptions as the store's: a missing object, a refusal to fix, the store unreachable or
        overloaded (refused, timed out, 5xx, throttled: an outage, DependencyUnavailable), or another transient
        failure of this request."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "404"):
                raise _missing(key) from None
            if status in (401, 403) or code == "NoSuchBucket":
                raise ConfigError(
                    f"object storage refused s3://{self.bucket}: {code} (check the bucket and the AWS_* credentials)",
                    code="blob_store_denied",
                ) from exc
            if status >= 500 or status == 429 or code in _OVERLOADED:
                raise DependencyUnavailable(Dependency.BLOB_STORE, f"object storage answered {code or status}") from exc
            raise TransientError(f"object storage answered {code or status}", code="blob_store_error") from exc
        except BotoCoreError as exc:
            # Refused, reset, timed out, or no credentials to sign with: nothing about this job's image.
            raise DependencyUnavailable(Dependency.BLOB_STORE, f"object storage: {exc.__class__.__name__}") from exc


def _chunks_of(handle: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The bytes [start, end) of an open file in chunks, closing it when done (or when the reader stops)."""
    with handle:
        handle.seek(start)
        left = end - start
        while left > 0 and (chunk := handle.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
            yield chunk


def _relative(key: str) -> str:
    if not _KEY.match(key):
        raise NotFound(f"{key!r} is not a blob key", code="blob_missing")
    return f"{key[:2]}/{key}"


# What S3 and its look-alikes answer when they shed load (with 503, or 400 for RequestTimeout).
_OVERLOADED = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout"}
)


def _disk_unavailable(exc: OSError) -> DependencyUnavailable:
    """A directory store's I/O error (EIO, ENOSPC, EACCES, a stale NFS handle...): the store's, not the image's."""
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return DependencyUnavailable(Dependency.BLOB_STORE, f"{name} ({exc.strerror or exc})")


def _missing(key: str) -> NotFound:
    return NotFound(f"image {key[:12]}... is no longer in the blob store", code="blob_missing")
