"""Reading request bodies off the wire: a multipart form or a JSON object, size-capped before it is parsed.

Nothing here trusts the client: the declared Content-Length is checked before a byte is read, the body is read
through a hard cap (a chunked or lying request stops at the cap) and a deadline per chunk (a slow sender is 408),
and JSON is parsed strictly. What the fields mean is the reader's business (api/submissions.py); this module only
gets them off the wire safely.

Memory stays bounded by design: an uploaded file is spooled to a temporary file as it arrives (in memory only up
to `SPOOL_MEMORY_BYTES`), hashed on the way (`SpooledUpload.sha256`, the blob store's key), and a multipart body
is read only with room in the process's `UploadBudget` (MODTAG_UPLOAD_BYTES_IN_FLIGHT): past it the request waits
MODTAG_UPLOAD_WAIT_S, then is 503 `busy` with Retry-After. The temporary disk is bounded the same way: every multipart
body also holds its whole declared length of a second budget (MODTAG_UPLOAD_SPOOL_BYTES), so concurrent video
uploads, which hold only an image's share of the first, cannot fill the disk between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from core.errors import BadRequest, InvalidField, ModtagError, PayloadTooLarge

# Room in a multipart body for the form fields and part headers beside the images themselves.
MULTIPART_SLACK_BYTES = 64 * 1024
# Room in a JSON body for the URLs and the policy name beside the context.
JSON_SLACK_BYTES = 16 * 1024
# How much of an uploaded file stays in memory before its spool moves to a temporary file on disk.
SPOOL_MEMORY_BYTES = 64 * 1024
# How many first bytes of an uploaded file are kept to tell what it is (magic bytes) while it arrives.
HEAD_BYTES = 64
Body = TypeVar("Body")
BodyModel = TypeVar("BodyModel", bound=BaseModel)


@dataclass(frozen=True)
class BodyLimits:
    """How much of each kind of body a route reads, and what it answers past that."""

    multipart_cap: int
    multipart_too_large: tuple[str, str]  # (code, message) of the 413
    max_files: int
    max_fields: int
    json_cap: int
    json_too_large: str
    expected: str  # what to send instead of an unsupported Content-Type
    too_many_files: str | None = None  # the 422 `too_many_images` message; None: a malformed body (400)
    # The cap of one file by what its first bytes are (`HEAD_BYTES` of them, fewer for a shorter file):
    # (cap, code, message of the 413). None: the body's cap alone. A video may be far larger than an image.
    file_cap: Callable[[bytes], tuple[int, str, str]] | None = None
    # The most one request holds of the upload budget; None: its whole declared length. A route whose largest files
    # are never read whole into memory (a video streams from its spool) holds only what an image would.
    budget_bytes: int | None = None


class UploadsBusy(ModtagError, code="busy", http_status=503, retryable=True):
    """The process's upload budget stayed full (503 `busy`); `retry_after_s` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UploadBudget:
    """At most `total` bytes of multipart bodies being received and stored at once by one API process.

    A request holds its declared Content-Length (the route's cap when it declares none; the whole budget at most,
    so a body larger than it runs alone) from before its first byte is read until its response: the temporary
    files, the one photo read whole for its header checks and the store's buffers all live within that time.
    """

    def __init__(self, total: int, wait_s: float, *, setting: str = "MODTAG_UPLOAD_BYTES_IN_FLIGHT") -> None:
        self.total = total
        self.wait_s = wait_s
        self.setting = setting  # named in the 503, so an operator knows which limit to raise
        self.held = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        wanted = min(size, self.total)
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self.held + wanted <= self.total), self.wait_s)
            except TimeoutError:
                raise UploadsBusy(
                    f"the server is receiving as many uploads as it holds at once ({self.total} bytes, "
                    f"{self.setting}); retry shortly",
                    retry_after_s=max(1, math.ceil(self.wait_s)),
                ) from None
            self.held += wanted
        try:
            yield
        finally:
            async with changed:
                self.held -= wanted
                changed.notify_all()

    def _condition(self) -> asyncio.Condition:
        # A condition belongs to one event loop; a test may serve the same app from several loops in turn.
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed


class SpooledUpload(UploadFile):
    """An uploaded file as it arrived: spooled (on disk past SPOOL_MEMORY_BYTES) and hashed on the way."""

    def __init__(self, source: UploadFile) -> None:
        super().__init__(source.file, size=0, filename=source.filename, headers=source.headers)
        self._digest = hashlib.sha256()
        self.head = b""  # its first HEAD_BYTES bytes: what it is, read without touching the spool
        self.received = 0
        self.cap: tuple[int, str, str] | None = None  # (bytes, code, message) once the head is known

    @property
    def sha256(self) -> str:
        """The SHA-256 of the bytes received (hex): the blob store's key for them."""
        return self._digest.hexdigest()

    def read_whole(self) -> bytes:
        """All its bytes, for the header checks (the caller reads one upload at a time and drops them)."""
        self.file.seek(0)
        return self.file.read()

    def rewound(self) -> Any:
        """Its spool from the first byte, to stream to the blob store."""
        self.file.seek(0)
        return self.file


async def read_body(
    request: Request,
    limits: BodyLimits,
    *,
    from_form: Callable[[FormData], Awaitable[Body]],
    from_json: Callable[[dict[str, Any]], Body],
) -> Body:
    """Dispatch on Content-Type: a multipart form (closed once `from_form` is done) or a JSON object."""
    async with open_body(request, limits, from_form=from_form, from_json=from_json) as body:
        return body


@asynccontextmanager
async def open_body(
    request: Request,
    limits: BodyLimits,
    *,
    from_form: Callable[[FormData], Awaitable[Body]],
    from_json: Callable[[dict[str, Any]], Body],
) -> AsyncIterator[Body]:
    """`read_body` for a reader that uses the uploads after `from_form`: a multipart body holds its room in the
    upload budget, and its spooled files stay open, until the block ends."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        code, message = limits.multipart_too_large
        declared = _check_declared_length(request, limits.multipart_cap, code, message)
        budget: UploadBudget = request.app.state.upload_budget
        spool: UploadBudget = request.app.state.spool_budget
        wanted = limits.multipart_cap if declared is None else declared
        async with spool.hold(wanted), budget.hold(min(wanted, limits.budget_bytes or wanted)):
            form = await _read_form(request, limits)
            try:
                yield await from_form(form)
            finally:
                await form.close()
        return
    if media_type == "application/json" or media_type.endswith("+json"):
        _check_declared_length(request, limits.json_cap, "payload_too_large", limits.json_too_large)
        yield from_json(await read_json_object(request, limits.json_cap, limits.json_too_large))
        return
    raise ModtagError(
        f"unsupported Content-Type {media_type[:100]!r}: send {limits.expected}",
        code="unsupported_media_type",
        http_status=415,
    )


async def read_json_object(request: Request, cap: int, too_large: str) -> dict[str, Any]:
    """A JSON object body read under a hard size cap and parsed strictly (400/413/422 with a code otherwise)."""
    body = bytearray()
    async for chunk in _capped_stream(request, cap, "payload_too_large", too_large):
        body += chunk
    try:
        document = strict_json(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(document, dict):
        raise InvalidField(f"the JSON body must be an object, not {json_type(document)}", code="invalid_field")
    return document


def validate_body(model: type[BodyModel], document: dict[str, Any]) -> BodyModel:
    """`document` as `model`, its errors reported like FastAPI's own body validation (422, `loc` from "body");
    a field the model does not have is 422 `unknown_field` naming it."""
    unknown = [name for name in document if name not in model.model_fields]
    if unknown:
        raise _unknown_field(unknown[0], sorted(model.model_fields))
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


async def read_upload(upload: UploadFile, limit: int, what: str) -> bytes:
    """An uploaded file's bytes, refused (413 `image_too_large`) past `limit` without reading further."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes", code="image_too_large")
    return data


def spooled_upload(upload: UploadFile, limit: int, what: str) -> SpooledUpload:
    """An uploaded file left in its spool, refused (413 `image_too_large`) past `limit` bytes."""
    if not isinstance(upload, SpooledUpload):
        raise TypeError("uploads are spooled by this module's form parser")
    if (upload.size or 0) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes", code="image_too_large")
    return upload


def refuse_unknown_fields(form: FormData, allowed: frozenset[str]) -> None:
    """422 `unknown_field` naming the first form field the route does not take (a typo must not run defaults)."""
    for name in form:
        if name not in allowed:
            raise _unknown_field(name, sorted(allowed))


def form_text(form: FormData, field: str) -> str | None:
    """A text field of the form (None when absent); a file sent under its name is refused."""
    value = form.get(field)
    if isinstance(value, UploadFile):
        raise InvalidField(f"`{field}` must be a text field, not a file", code="invalid_field")
    return value


def strict_json(data: str | bytes | bytearray) -> Any:
    """Parse standard JSON only: no NaN/Infinity, no unpaired surrogate escapes (the database refuses both).

    Raises ValueError with a short reason.
    """
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("it contains an unpaired surrogate escape (\\ud800-\\udfff) that is not text") from None
    return value


def json_type(value: object) -> str:
    """How a JSON value is named in an error: "an array", "a string"..."""
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class _FormParser(MultiPartParser):
    """Starlette's multipart parser, its files spooled to disk past SPOOL_MEMORY_BYTES and hashed as they arrive,
    noting whether the closing boundary arrived: a cut-off body is malformed."""

    complete = False
    spool_max_size = SPOOL_MEMORY_BYTES
    file_cap: Callable[[bytes], tuple[int, str, str]] | None = None

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is not None:
            part.file = SpooledUpload(part.file)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        super().on_part_data(data, start, end)
        upload = self._current_part.file
        if isinstance(upload, SpooledUpload):
            upload._digest.update(data[start:end])
            upload.received += end - start
            if len(upload.head) < HEAD_BYTES:
                upload.head += data[start : min(end, start + HEAD_BYTES - len(upload.head))]
            self._check_file_cap(upload)

    def on_part_end(self) -> None:
        upload = self._current_part.file
        if isinstance(upload, SpooledUpload):
            self._check_file_cap(upload, ended=True)  # a file shorter than HEAD_BYTES is judged by what came
        super().on_part_end()

    def _check_file_cap(self, upload: SpooledUpload, *, ended: bool = False) -> None:
        """Refuse a file past its own cap as soon as it passes it: an image's bytes stop at the image limit while
        the body may carry a video's."""
        if self.file_cap is None:
            return
        if upload.cap is None and (ended or len(upload.head) >= HEAD_BYTES):
            upload.cap = self.file_cap(upload.head)
        if upload.cap is not None and upload.received > upload.cap[0]:
            _, code, message = upload.cap
            raise PayloadTooLarge(message, code=code)

    def on_end(self) -> None:
        self.complete = True


async def _read_form(request: Request, limits: BodyLimits) -> FormData:
    cap = limits.multipart_cap
    body = _capped_stream(request, cap, *limits.multipart_too_large)
    parser = _FormParser(
        request.headers, body, max_files=limits.max_files, max_fields=limits.max_fields, max_part_size=cap
    )
    parser.file_cap = limits.file_cap
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if limits.too_many_files is not None and "Too many files" in exc.message:
            raise InvalidField(limits.too_many_files, code="too_many_images") from None
        raise BadRequest(f"the multipart body is malformed: {exc.message}", code="invalid_multipart") from None
    if not parser.complete:
        await form.close()
        raise BadRequest(
            "the multipart body ended before its closing boundary (truncated, or a wrong Content-Length)",
            code="invalid_multipart",
        )
    return form


async def _capped_stream(request: Request, cap: int, code: str, message: str) -> AsyncGenerator[bytes, None]:
    """The body in chunks, aborting as soon as more than `cap` bytes arrived, whatever the headers said, or when
    it has not all arrived MODTAG_BODY_READ_TIMEOUT_S after its first read (408 `body_timeout`: a slow sender
    would hold its connection and its room in the upload budget for as long as it liked)."""
    timeout_s: float = request.app.state.settings.body_read_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s
    received = 0
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), deadline - asyncio.get_running_loop().time())
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _SlowBody(
                    f"the request body did not arrive within {timeout_s:g} s (MODTAG_BODY_READ_TIMEOUT_S)"
                ) from None
            received += len(chunk)
            if received > cap:
                raise PayloadTooLarge(message, code=code)
            yield chunk
    except ClientDisconnect:
        raise BadRequest("the client disconnected before the body was complete", code="client_disconnected") from None


class _SlowBody(ModtagError, code="body_timeout", http_status=408):
    """A request body whose sender stalled (408); the connection is not reused."""


def _check_declared_length(request: Request, cap: int, code: str, message: str) -> int | None:
    """The declared Content-Length (None when chunked), refused past `cap`."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None  # chunked: the capped stream enforces the limit
    try:
        length = int(declared)
    except ValueError:
        raise BadRequest("the Content-Length header is not a number", code="bad_request") from None
    if length > cap:
        raise PayloadTooLarge(message, code=code)
    return length


def _unknown_field(name: str, allowed: list[str]) -> InvalidField:
    return InvalidField(f"unknown field {name[:64]!r}: this route takes {', '.join(allowed)}", code="unknown_field")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
