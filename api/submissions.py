"""Reading a job submission off the wire: a multipart upload or JSON with `image_url`, size-capped, cheapest first.

Nothing here trusts the client: the declared Content-Length is checked before a byte is read, the body is read
through a hard cap (a chunked or lying request stops at the cap), and the image is sniffed from its header only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from api.deps import SettingsDep
from api.schemas import JobRequest
from core.errors import BadRequest, FetchError, InvalidField, ModtagError, NotFound, PayloadTooLarge, PolicyError
from core.settings import Settings
from core.urls import validate_image_url
from policies import Policy

# Room in a multipart body for the form fields and part headers beside the image itself.
MULTIPART_SLACK_BYTES = 64 * 1024
# Room in a JSON body for the URLs and the policy name beside the context.
JSON_SLACK_BYTES = 16 * 1024
MAX_URL_CHARS = 2048
MAX_CONTEXT_DEPTH = 16
_IDEMPOTENCY_KEY_MAX = 255
BodyModel = TypeVar("BodyModel", bound=BaseModel)


@dataclass(frozen=True)
class RawSubmission:
    """The request as read: sizes are capped, nothing else is validated yet."""

    source: str  # "upload" or "url"
    policy: str
    image: bytes | None = None
    image_url: str | None = None
    context: Any = None  # multipart: the JSON text; JSON body: the parsed value
    context_is_text: bool = False
    callback_url: str | None = None


async def read_submission(request: Request, settings: SettingsDep) -> RawSubmission:
    """Dispatch on Content-Type; reject a body whose declared length is over the limit before reading it."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        cap = settings.max_upload_bytes + settings.max_context_bytes + MULTIPART_SLACK_BYTES
        _check_declared_length(request, cap, "image_too_large", _too_large_image_message(settings))
        return await _read_multipart(request, settings, cap)
    if media_type == "application/json" or media_type.endswith("+json"):
        cap = settings.max_context_bytes + JSON_SLACK_BYTES
        message = f"the JSON body is over {cap} bytes; the context may be at most {settings.max_context_bytes}"
        _check_declared_length(request, cap, "payload_too_large", message)
        return await _read_json(request, cap, message)
    raise ModtagError(
        f"unsupported Content-Type {media_type[:100]!r}: send multipart/form-data with an `image` file, "
        "or application/json with an `image_url`",
        code="unsupported_media_type",
        http_status=415,
    )


def idempotency_key(
    key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retrying with the same key returns the same job."),
    ] = None,
) -> str | None:
    """The optional Idempotency-Key header: 1 to 255 printable ASCII characters."""
    if key is None:
        return None
    if not 0 < len(key) <= _IDEMPOTENCY_KEY_MAX or not all(" " <= char <= "~" for char in key):
        raise InvalidField(
            f"the Idempotency-Key header must be 1 to {_IDEMPOTENCY_KEY_MAX} printable ASCII characters",
            code="invalid_idempotency_key",
        )
    return key


def resolve_policy(policies: Mapping[str, Policy], name: str) -> Policy:
    policy = policies.get(name)
    if policy is None:
        available = ", ".join(sorted(policies)) or "none"
        raise NotFound(f"no policy named {name[:64]!r}; available: {available}", code="policy_not_found")
    return policy


def parse_context(submission: RawSubmission, limit: int) -> dict[str, Any] | None:
    """The job's context: a JSON object of at most `limit` bytes (413), well-formed (400), an object (422)."""
    value = submission.context
    if submission.context_is_text:
        text = str(value or "")
        if not text.strip():
            return None
        if len(text.encode()) > limit:
            raise _context_too_large(limit)
        try:
            value = strict_json(text)
        except ValueError as exc:
            raise BadRequest(f"`context` is not valid JSON: {exc}", code="invalid_context") from None
    elif value is not None and len(json.dumps(value, separators=(",", ":")).encode()) > limit:
        raise _context_too_large(limit)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField(f"`context` must be a JSON object, not {_json_type(value)}", code="invalid_context")
    if _depth(value) > MAX_CONTEXT_DEPTH:
        raise InvalidField(f"`context` is nested deeper than {MAX_CONTEXT_DEPTH} levels", code="invalid_context")
    return value


def require_context(policy: Policy, context: Mapping[str, Any] | None) -> None:
    """Refuse (422 `context_missing`) a job whose context lacks a field the policy's checks require."""
    missing = policy.missing_context(context or {})
    if missing:
        raise PolicyError(
            f"policy '{policy.name}' needs context this job does not have: {'; '.join(missing)}. "
            "Send it in `context` (a listing's title, description and attributes)",
            code="context_missing",
        )


def check_url(url: str, field: str) -> str:
    """A syntactically acceptable http(s) URL (the worker checks where it resolves when it fetches)."""
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"`{field}` is longer than {MAX_URL_CHARS} characters", code="url_invalid")
    try:
        normalised = validate_image_url(url)
    except FetchError as exc:
        raise FetchError(f"`{field}`: {exc.message}", code=exc.code, http_status=exc.http_status) from None
    if len(normalised) > MAX_URL_CHARS:  # an internationalised host grows when spelled in ASCII
        raise FetchError(f"`{field}` is longer than {MAX_URL_CHARS} characters once normalised", code="url_invalid")
    return normalised


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


SubmissionDep = Annotated[RawSubmission, Depends(read_submission)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


async def _read_multipart(request: Request, settings: Settings, cap: int) -> RawSubmission:
    stream = _capped_stream(request, cap, "image_too_large", _too_large_image_message(settings))
    parser = _FormParser(request.headers, stream, max_files=1, max_fields=8, max_part_size=cap)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"the multipart body is malformed: {exc.message}", code="invalid_multipart") from None
    if not parser.complete:
        await form.close()
        raise BadRequest(
            "the multipart body ended before its closing boundary (truncated, or a wrong Content-Length)",
            code="invalid_multipart",
        )
    try:
        image = form.get("image")
        image_url = form.get("image_url")
        if image is not None and image_url is not None:
            raise BadRequest("send either an `image` file or an `image_url`, not both", code="ambiguous_image")
        if not isinstance(image, UploadFile):
            raise InvalidField(
                "the `image` file is missing: send the image as a multipart file field named `image`",
                code="image_missing",
            )
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(_too_large_image_message(settings), code="image_too_large")
        return RawSubmission(
            source="upload",
            image=data,
            policy=_text_field(form.get("policy")) or "moderation",
            context=_text_field(form.get("context")),
            context_is_text=True,
            callback_url=_text_field(form.get("callback_url")) or None,
        )
    finally:
        await form.close()


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
        raise InvalidField(f"the JSON body must be an object, not {_json_type(document)}", code="invalid_field")
    return document


def validate_body(model: type[BodyModel], document: dict[str, Any]) -> BodyModel:
    """`document` as `model`, its errors reported like FastAPI's own body validation (422, `loc` from "body")."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


async def _read_json(request: Request, cap: int, too_large: str) -> RawSubmission:
    document = await read_json_object(request, cap, too_large)
    if "image_url" not in document:
        raise InvalidField(
            "`image_url` is missing: send it in a JSON body, or upload the file as multipart field `image`",
            code="image_missing",
        )
    parsed = validate_body(JobRequest, document)
    return RawSubmission(
        source="url",
        image_url=parsed.image_url,
        policy=parsed.policy,
        context=parsed.context,
        callback_url=parsed.callback_url,
    )


class _FormParser(MultiPartParser):
    """Starlette's multipart parser, noting whether the closing boundary arrived: a cut-off body is malformed."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def _capped_stream(request: Request, cap: int, code: str, message: str) -> AsyncGenerator[bytes, None]:
    """The body in chunks, aborting as soon as more than `cap` bytes arrived, whatever the headers said."""
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise PayloadTooLarge(message, code=code)
            yield chunk
    except ClientDisconnect:
        raise BadRequest("the client disconnected before the body was complete", code="client_disconnected") from None


def _check_declared_length(request: Request, cap: int, code: str, message: str) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return  # chunked: the capped stream enforces the limit
    try:
        length = int(declared)
    except ValueError:
        raise BadRequest("the Content-Length header is not a number", code="bad_request") from None
    if length > cap:
        raise PayloadTooLarge(message, code=code)


def _too_large_image_message(settings: Settings) -> str:
    return f"the image is larger than the limit of {settings.max_upload_bytes} bytes"


def _context_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"`context` is larger than {limit} bytes", code="context_too_large")


def _text_field(value: str | UploadFile | None) -> str | None:
    if isinstance(value, UploadFile):
        raise InvalidField("only `image` may be a file; send the other fields as text", code="invalid_field")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _depth(value: object, level: int = 1) -> int:
    if level > MAX_CONTEXT_DEPTH:
        return level  # deep enough to reject; don't walk a hostile structure further
    if isinstance(value, dict):
        return max((_depth(item, level + 1) for item in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(item, level + 1) for item in value), default=level)
    return level
