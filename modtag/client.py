"""The one HTTP client of the CLI, bench and tests: submit jobs and listings, poll them until final, read /metrics.

`ApiClient` is an `httpx.Client` with the API's base URL and key, so a caller that needs a route this module
does not wrap still sends through it. A transport failure (nothing listening, a reset, a timeout) becomes
`ApiUnreachable`, a `ModtagError`, so the CLI prints one line instead of an httpx traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from core.errors import ModtagError
from core.tables import FINAL_STATUSES

# Polling gently: in the embedded stack the API shares the cores with the worker it is waiting for.
POLL_INTERVAL_S = 0.2
# An idle connection is dropped here before the API closes it (MODTAG_KEEP_ALIVE_TIMEOUT_S, 5 s by default): at
# equal timeouts a request sent as the server closes the connection meets "connection reset by peer".
KEEPALIVE_EXPIRY_S = 2.0


class ApiUnreachable(ModtagError):
    """No answer from the API at all (as opposed to an answer that refuses the request)."""

    code = "api_unreachable"


@dataclass(frozen=True)
class Reply:
    """An API answer as status and JSON object; a body that is not a JSON object becomes a `bad_response` error."""

    status: int
    body: dict[str, Any]
    retry_after_s: float | None = None  # a 429's or 503's Retry-After, in seconds

    @classmethod
    def of(cls, response: httpx.Response) -> Reply:
        retry_after = _seconds(response.headers.get("Retry-After"))
        try:
            body = response.json()
        except ValueError:
            return cls(response.status_code, {"code": "bad_response", "detail": response.text[:200]}, retry_after)
        if not isinstance(body, dict):
            return cls(response.status_code, {"code": "bad_response", "detail": str(body)[:200]}, retry_after)
        return cls(response.status_code, body, retry_after)

    @property
    def accepted(self) -> bool:
        return self.status in (200, 202)

    @property
    def auth_refused(self) -> bool:
        return self.status in (401, 403)


class ApiClient(httpx.Client):
    """A modtag API at `base_url`, called with `key` (sent as `Authorization: Bearer`) when given."""

    def __init__(
        self,
        base_url: str,
        *,
        key: str | None = None,
        timeout_s: float = 60,
        poll_interval_s: float = POLL_INTERVAL_S,
        headers: dict[str, str] | None = None,
    ) -> None:
        sent = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        super().__init__(base_url=base_url, timeout=timeout_s, headers=sent, limits=limits)
        self.poll_interval_s = poll_interval_s

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return super().send(request, **kwargs)
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise ApiUnreachable(
                f"cannot reach the modtag API at {request.url.scheme}://{request.url.netloc.decode()}: {reason}. "
                "Is it running, and is the URL (--api) right?"
            ) from exc

    def submit_job(
        self,
        image: bytes | Path,
        *,
        filename: str | None = None,
        policy: str = "moderation",
        mime: str = "application/octet-stream",
        context: dict[str, Any] | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
        wait_s: int | None = None,
        on_sent: Callable[[int], object] | None = None,
    ) -> Reply:
        """POST /v1/jobs with an upload (bytes, or a file read as it is sent); `wait_s` asks for the decision in the
        answer (`Prefer: wait=N`: 200 with the decided job when it is decided in time, else 202). `on_sent` is told
        the bytes of a file as they are read for sending (a progress bar for a large video)."""
        name = filename or (image.name if isinstance(image, Path) else "image")
        data = {"policy": policy}
        if context is not None:
            data["context"] = json.dumps(context)
        if priority is not None:
            data["priority"] = priority
        headers = _submission_headers(idempotency_key, wait_s)
        if isinstance(image, Path):
            with image.open("rb") as handle:
                sent: BinaryIO = handle if on_sent is None else _Reported(handle, on_sent)  # type: ignore[assignment]
                files = {"image": (name, sent, mime)}
                return Reply.of(self.post("/v1/jobs", files=files, data=data, headers=headers))
        return Reply.of(self.post("/v1/jobs", files={"image": (name, image, mime)}, data=data, headers=headers))

    def submit_url_job(
        self,
        url: str,
        *,
        policy: str = "moderation",
        context: dict[str, Any] | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
        wait_s: int | None = None,
    ) -> Reply:
        """POST /v1/jobs as JSON: the image at `url`, fetched by a worker."""
        body: dict[str, Any] = {"image_url": url, "policy": policy}
        if context is not None:
            body["context"] = context
        if priority is not None:
            body["priority"] = priority
        return Reply.of(self.post("/v1/jobs", json=body, headers=_submission_headers(idempotency_key, wait_s)))

    def create_bank(self, name: str, description: str | None = None, kind: str = "block") -> Reply:
        """POST /v1/banks (admin): `kind` block, or allow for an allow-list."""
        return Reply.of(self.post("/v1/banks", json={"name": name, "description": description, "kind": kind}))

    def import_bank_items(self, name: str, items: list[dict[str, str]]) -> Reply:
        """POST /v1/banks/{name}/import: items of {"pdq" or "sha256", optional "note"}."""
        return Reply.of(self.post(f"/v1/banks/{name}/import", json={"items": items}))

    def import_bank_file(self, name: str, content: bytes, *, fmt: str = "hma", signal_type: str | None = None) -> Reply:
        """POST /v1/banks/{name}/import with a hash list file (`fmt` hma or csv) (admin)."""
        params = {"format": fmt, **({"signal_type": signal_type} if signal_type else {})}
        files = {"file": (f"{name}.{'csv' if fmt == 'csv' else 'txt'}", content, "text/plain")}
        return Reply.of(self.post(f"/v1/banks/{name}/import", params=params, files=files))

    def export_bank(self, name: str, out: BinaryIO, *, fmt: str = "hma") -> Reply:
        """GET /v1/banks/{name}/export written to `out` as it arrives (admin); on 200 the body says how many bytes."""
        with self.stream("GET", f"/v1/banks/{name}/export", params={"format": fmt}) as response:
            if response.status_code != 200:
                response.read()
                return Reply.of(response)
            written = 0
            for chunk in response.iter_bytes():
                out.write(chunk)
                written += len(chunk)
        return Reply(200, {"bytes": written})

    def policy(self, name: str) -> Reply:
        """GET /v1/policies/{name}: the loaded policy in full, with its version."""
        return Reply.of(self.get(f"/v1/policies/{name}"))

    def calibration(
        self, policy: str, category: str, *, since: str, block_precision: float, review_recall: float
    ) -> Reply:
        """GET /v1/calibration: one category's precision-recall curve from the tenant's review labels."""
        params: dict[str, str | float] = {
            "policy": policy,
            "category": category,
            "since": since,
            "block_precision": block_precision,
            "review_recall": review_recall,
        }
        return Reply.of(self.get("/v1/calibration", params=params))

    def labels(self, *, since: str, cursor: str | None = None, limit: int = 500) -> Reply:
        """GET /v1/labels: one page of the tenant's labelled jobs, oldest first."""
        params: dict[str, str | int] = {"since": since, "limit": limit, **({"cursor": cursor} if cursor else {})}
        return Reply.of(self.get("/v1/labels", params=params))

    def quotas(self) -> Reply:
        """GET /v1/quotas: the settings' limits and the tenants' overrides (admin)."""
        return Reply.of(self.get("/v1/quotas"))

    def quota(self, tenant: str) -> Reply:
        """GET /v1/quotas/{tenant}: the limits in force and the override behind them (admin)."""
        return Reply.of(self.get(f"/v1/quotas/{quote(tenant, safe='')}"))

    def put_quota(self, tenant: str, override: dict[str, Any]) -> Reply:
        """PUT /v1/quotas/{tenant}: replace the tenant's override (admin of the quota admin tenant)."""
        return Reply.of(self.put(f"/v1/quotas/{quote(tenant, safe='')}", json=override))

    def delete_quota(self, tenant: str) -> Reply:
        """DELETE /v1/quotas/{tenant}: the settings apply again (admin of the quota admin tenant)."""
        return Reply.of(self.delete(f"/v1/quotas/{quote(tenant, safe='')}"))

    def erase_job(self, job_id: str) -> Reply:
        """DELETE /v1/jobs/{id}: erase the image and content, keep the tombstone."""
        return Reply.of(self.delete(f"/v1/jobs/{job_id}"))

    def job(self, job_id: str) -> dict[str, Any]:
        return Reply.of(self.get(f"/v1/jobs/{job_id}")).body

    def wait_jobs(
        self,
        job_ids: Sequence[str],
        *,
        timeout_s: float,
        on_final: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Poll until every job is final or `timeout_s` passed; the final jobs by id (a late one is missing).

        Jobs finish roughly in the order they were sent, so each round stops at the first one still
        pending: asking about every later one would only keep the API busy.
        """
        final: dict[str, dict[str, Any]] = {}
        pending = list(job_ids)
        deadline = time.monotonic() + timeout_s
        while pending:
            still: list[str] = []
            for index, job_id in enumerate(pending):
                job = self.job(job_id)
                if job.get("status") not in FINAL_STATUSES:
                    still = pending[index:]
                    break
                final[job_id] = job
                if on_final is not None:
                    on_final(job)
            pending = still
            if pending:
                if time.monotonic() >= deadline:
                    break
                time.sleep(self.poll_interval_s)
        return final

    def wait_job(self, job_id: str, *, timeout_s: float = 60) -> dict[str, Any]:
        """The job once final; ModtagError `api_timeout` when it is not within `timeout_s`."""
        final = self.wait_jobs([job_id], timeout_s=timeout_s)
        if job_id not in final:
            status = self.job(job_id).get("status")
            raise ModtagError(f"job {job_id} was not final after {timeout_s:.0f}s: {status}", code="api_timeout")
        return final[job_id]

    def submit_listing(
        self,
        images: Sequence[Path],
        *,
        title: str,
        description: str | None = None,
        attributes: dict[str, Any] | None = None,
        policy: str = "listing",
    ) -> Reply:
        """POST /v1/listings with the photos (multipart `images`) and the listing's text."""
        data = {"title": title, "attributes": json.dumps(attributes or {}), "policy": policy}
        if description:
            data["description"] = description
        handles = [path.open("rb") for path in images]
        try:
            files = [
                ("images", (path.name, handle, "application/octet-stream"))
                for path, handle in zip(images, handles, strict=True)
            ]
            return Reply.of(self.post("/v1/listings", files=files, data=data))
        finally:
            for handle in handles:
                handle.close()

    def listing(self, listing_id: str) -> dict[str, Any]:
        return Reply.of(self.get(f"/v1/listings/{listing_id}")).body

    def wait_listing(self, listing_id: str, *, timeout_s: float) -> dict[str, Any]:
        """The listing once its verdict is final, or as it stands after `timeout_s` (`verdict.status` pending)."""
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.listing(listing_id)
            if body.get("verdict", {}).get("status") != "pending" or time.monotonic() >= deadline:
                return body
            time.sleep(self.poll_interval_s)

    def metrics(self) -> str:
        """The Prometheus exposition at /metrics (of the API, or of a worker's metrics port as base URL)."""
        response = self.get("/metrics")
        response.raise_for_status()
        return response.text


def _submission_headers(idempotency_key: str | None, wait_s: int | None) -> dict[str, str]:
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    if wait_s is not None:
        headers["Prefer"] = f"wait={wait_s}"
    return headers


def _seconds(value: str | None) -> float | None:
    """A Retry-After in delta-seconds (the form modtag sends); None when absent or another form."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class _Reported:
    """A file being uploaded that tells `on_sent` how many bytes each read took (httpx streams it in chunks)."""

    def __init__(self, handle: BinaryIO, on_sent: Callable[[int], object]) -> None:
        self._handle = handle
        self._on_sent = on_sent

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._on_sent(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()
