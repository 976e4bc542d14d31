"""Marketplace listings: `POST /v1/listings` (photos + title, description, attributes), `GET /v1/listings/{id}`.

A listing becomes one job per photo, each carrying the listing's text as its context, so a photo is
judged exactly as `POST /v1/jobs` would judge it; the listing adds the verdict that reads them together.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from api.auth import Reader, Submitter
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.errors import error_responses
from api.submissions import (
    JSON_SLACK_BYTES,
    MAX_URL_CHARS,
    MULTIPART_SLACK_BYTES,
    IdempotencyKeyDep,
    _capped_stream,
    _FormParser,
    check_url,
    read_json_object,
    require_context,
    resolve_policy,
    strict_json,
    validate_body,
)
from core.broker import enqueue_job
from core.errors import BadRequest, InvalidField, ModtagError, NotFound, PayloadTooLarge
from core.images import ImageLimits, sniff_image
from core.jobs import NewJob
from core.listings import NewListing, create_listing, get_listing, listing_context, listing_jobs
from core.metrics import JOBS_SUBMITTED
from core.public import ListingPublic
from core.settings import Settings
from core.tables import ID_PATTERN
from policies.listing import listing_public

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/listings", tags=["listings"])

MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 20_000
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_CHARS = 200
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


class ListingRequest(BaseModel):
    """`POST /v1/listings` as JSON: the photos are fetched from `image_urls` by workers."""

    model_config = ConfigDict(extra="forbid")

    image_urls: list[str] = Field(description="http(s) URLs of the listing's photos, in order.")
    title: str = Field(description=f"The listing's title, at most {MAX_TITLE_CHARS} characters.")
    description: str | None = Field(default=None, description=f"At most {MAX_DESCRIPTION_CHARS} characters.")
    # Typed loosely so that a non-object is reported as `invalid_attributes`, like the multipart form does.
    attributes: Annotated[Any, WithJsonSchema({"type": "object", "description": 'e.g. {"color": "red"}'})] = None
    policy: str = Field(default="listing", min_length=1, max_length=64)
    callback_url: str | None = Field(
        default=None, description="http(s) URL, at most 2048 characters: POSTed the listing once every photo is final."
    )


_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images", "title"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "The photos."},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "attributes": {"type": "string", "description": 'A JSON object, e.g. {"color": "red", "count": 2}.'},
        "policy": {"type": "string", "default": "listing"},
        "callback_url": {"type": "string", "format": "uri"},
    },
}
_SUBMIT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": ListingRequest.model_json_schema()},
        },
    },
}


@dataclass(frozen=True)
class _RawListing:
    source: str  # upload or url
    images: list[bytes]
    image_urls: list[str]
    title: Any
    description: Any
    attributes: Any  # multipart: JSON text; JSON body: the parsed value
    attributes_is_text: bool
    policy: str
    callback_url: str | None = None


async def read_listing(request: Request, settings: SettingsDep) -> _RawListing:
    """The listing as sent, size-capped before a byte is parsed: multipart photos, or JSON with image_urls."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        cap = settings.listing_max_images * settings.max_upload_bytes + settings.max_context_bytes
        return await _read_multipart(request, settings, cap + MULTIPART_SLACK_BYTES)
    if media_type == "application/json" or media_type.endswith("+json"):
        cap = settings.max_context_bytes + settings.listing_max_images * MAX_URL_CHARS + JSON_SLACK_BYTES
        return await _read_json(request, cap)
    raise ModtagError(
        f"unsupported Content-Type {media_type[:100]!r}: send multipart/form-data with `images` files, "
        "or application/json with `image_urls`",
        code="unsupported_media_type",
        http_status=415,
    )


ListingDep = Annotated[_RawListing, Depends(read_listing)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ListingPublic,
    openapi_extra=_SUBMIT_OPENAPI,
    responses={
        200: {"model": ListingPublic, "description": "A listing with this Idempotency-Key already exists."},
        **error_responses(400, 401, 403, 404, 413, 415, 422),
    },
)
def submit_listing(
    principal: Submitter,  # first: the body is not read for a caller who may not submit
    idempotency_key: IdempotencyKeyDep,
    raw: ListingDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> ListingPublic:
    """Submit a listing's photos with its title, description and attributes: one job per photo (role submit)."""
    settings = services.settings
    count = len(raw.images) + len(raw.image_urls)
    if count == 0:
        raise InvalidField("the listing has no photos: send `images` files, or `image_urls`", code="image_missing")
    if count > settings.listing_max_images:
        raise InvalidField(
            f"the listing has {count} photos; at most {settings.listing_max_images} are accepted per listing",
            code="too_many_images",
        )
    limits = ImageLimits.from_settings(settings)
    headers = [_sniff(index, data, limits) for index, data in enumerate(raw.images)]
    policy = resolve_policy(services.policies, raw.policy)
    title, description, attributes = _listing_text(raw)
    context = listing_context(title, description, attributes)
    if len(json.dumps(context, separators=(",", ":")).encode()) > settings.max_context_bytes:
        raise PayloadTooLarge(
            f"the title, description and attributes are larger than {settings.max_context_bytes} bytes",
            code="context_too_large",
        )
    require_context(policy, context)
    urls = [check_url(url, f"image_urls[{index}]") for index, url in enumerate(raw.image_urls)]
    callback_url = check_url(raw.callback_url, "callback_url") if raw.callback_url else None

    photos: list[NewJob] = []
    base: dict[str, Any] = {"tenant": principal.tenant, "policy": policy.name, "policy_version": policy.version}
    for data, header in zip(raw.images, headers, strict=True):
        blob_key = services.blobs.put(data)
        photos.append(
            NewJob(
                **base,
                source="upload",
                blob_key=blob_key,
                image_sha256=blob_key,
                image_bytes=len(data),
                image_width=header.width,
                image_height=header.height,
                image_format=header.format,
                context=context,
                submitted_by=principal.key_id,
            )
        )
    photos.extend(
        NewJob(**base, source="url", image_url=url, context=context, submitted_by=principal.key_id) for url in urls
    )
    listing, jobs, created = create_listing(
        session,
        NewListing(
            tenant=principal.tenant,
            policy=policy.name,
            policy_version=policy.version,
            title=title,
            description=description,
            attributes=attributes,
            idempotency_key=idempotency_key,
            submitted_by=principal.key_id,
            callback_url=callback_url,
        ),
        photos,
    )
    response.headers["Location"] = f"/v1/listings/{listing.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
        return listing_public(listing, listing_jobs(session, listing.id))
    for job in jobs:
        try:
            enqueue_job(services.celery, job.id)
        except Exception as exc:  # committed: the reconciler enqueues queued jobs no worker picked up
            logger.warning("job %s of listing %s not enqueued (%s); the reconciler will", job.id, listing.id, exc)
        JOBS_SUBMITTED.labels(policy=policy.name, source=job.source).inc()
    return listing_public(listing, [(job, None) for job in jobs])


@router.get("/{listing_id}", response_model=ListingPublic, responses=error_responses(401, 403, 404, 422))
def read_listing_result(listing_id: str, session: SessionDep, principal: Reader) -> ListingPublic:
    """The listing with each photo's result and the listing-level verdict (pending until every photo is final)."""
    listing = get_listing(session, listing_id, principal.tenant) if ID_PATTERN.match(listing_id) else None
    if listing is None:  # another tenant's listing is unknown here, never forbidden
        raise NotFound(f"no listing with id {listing_id[:64]!r}", code="listing_not_found")
    return listing_public(listing, listing_jobs(session, listing.id))


def _sniff(index: int, data: bytes, limits: ImageLimits) -> Any:
    try:
        return sniff_image(data, limits)
    except ModtagError as exc:
        raise ModtagError(f"photo {index + 1}: {exc.message}", code=exc.code, http_status=exc.http_status) from None


def _listing_text(raw: _RawListing) -> tuple[str, str | None, dict[str, Any]]:
    title = _text(raw.title, "title", MAX_TITLE_CHARS)
    if title is None:
        raise InvalidField("`title` is missing: a listing needs its title", code="title_missing")
    description = _text(raw.description, "description", MAX_DESCRIPTION_CHARS)
    return title, description, _attributes(raw.attributes, raw.attributes_is_text)


def _text(value: Any, field: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(f"`{field}` must be text", code="invalid_field")
    value = value.strip()
    if "\x00" in value:
        raise InvalidField(f"`{field}` contains a NUL character", code="invalid_field")
    if len(value) > limit:
        raise InvalidField(f"`{field}` is {len(value)} characters; at most {limit} are accepted", code="invalid_field")
    return value or None


def _attributes(value: Any, is_text: bool) -> dict[str, Any]:
    if is_text:
        if value is None or not str(value).strip():
            return {}
        try:
            value = strict_json(str(value))
        except ValueError as exc:
            raise BadRequest(f"`attributes` is not valid JSON: {exc}", code="invalid_attributes") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField('`attributes` must be a JSON object such as {"color": "red"}', code="invalid_attributes")
    if len(value) > MAX_ATTRIBUTES:
        raise InvalidField(
            f"`attributes` has {len(value)} entries; at most {MAX_ATTRIBUTES}", code="invalid_attributes"
        )
    attributes: dict[str, Any] = {}
    for name, item in value.items():
        if not _ATTRIBUTE_NAME.match(name):
            raise InvalidField(
                f"attribute name {name[:64]!r} must be lowercase letters, digits and '_' (color, product_type)",
                code="invalid_attributes",
            )
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise InvalidField(f"attribute {name!r} must be text or a number", code="invalid_attributes")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidField(f"attribute {name!r} must be a finite number", code="invalid_attributes")
        if isinstance(item, str):
            item = item.strip()
            if "\x00" in item or len(item) > MAX_ATTRIBUTE_CHARS:
                raise InvalidField(
                    f"attribute {name!r} must be at most {MAX_ATTRIBUTE_CHARS} characters without NUL",
                    code="invalid_attributes",
                )
        attributes[name] = item
    return attributes


async def _read_multipart(request: Request, settings: Settings, cap: int) -> _RawListing:
    too_large = f"the listing is larger than {cap} bytes ({settings.listing_max_images} photos of at most " + (
        f"{settings.max_upload_bytes} bytes)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(too_large, code="payload_too_large")
    stream = _capped_stream(request, cap, "payload_too_large", too_large)
    parser = _FormParser(
        request.headers, stream, max_files=settings.listing_max_images + 1, max_fields=16, max_part_size=cap
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise InvalidField(
                f"too many photos: at most {settings.listing_max_images} are accepted per listing",
                code="too_many_images",
            ) from None
        raise BadRequest(f"the multipart body is malformed: {exc.message}", code="invalid_multipart") from None
    try:
        if not parser.complete:
            raise BadRequest("the multipart body ended before its closing boundary", code="invalid_multipart")
        files = form.getlist("images")
        if any(not isinstance(item, UploadFile) for item in files):
            raise InvalidField("`images` must be files (multipart file fields named `images`)", code="invalid_field")
        others = [key for key, item in form.multi_items() if isinstance(item, UploadFile) and key != "images"]
        if others:
            raise InvalidField(f"unexpected file field {others[0]!r}: photos go in `images`", code="invalid_field")
        if len(files) > settings.listing_max_images:
            raise InvalidField(
                f"the listing has {len(files)} photos; at most {settings.listing_max_images} are accepted",
                code="too_many_images",
            )
        images: list[bytes] = []
        for index, upload in enumerate(files):
            assert isinstance(upload, UploadFile)
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"photo {index + 1} is larger than the limit of {settings.max_upload_bytes} bytes",
                    code="image_too_large",
                )
            images.append(data)
        names = ("title", "description", "attributes", "policy", "callback_url")
        fields = {key: _form_text(form.get(key), key) for key in names}
        return _RawListing(
            source="upload",
            images=images,
            image_urls=[],
            title=fields["title"],
            description=fields["description"],
            attributes=fields["attributes"],
            attributes_is_text=True,
            policy=fields["policy"] or "listing",
            callback_url=fields["callback_url"] or None,
        )
    finally:
        await form.close()


async def _read_json(request: Request, cap: int) -> _RawListing:
    document = await read_json_object(request, cap, f"the JSON body is over {cap} bytes")
    parsed = validate_body(ListingRequest, document)
    return _RawListing(
        source="url",
        images=[],
        image_urls=parsed.image_urls,
        title=parsed.title,
        description=parsed.description,
        attributes=parsed.attributes,
        attributes_is_text=False,
        policy=parsed.policy,
        callback_url=parsed.callback_url,
    )


def _form_text(value: Any, field: str) -> str | None:
    if isinstance(value, UploadFile):
        raise InvalidField(f"`{field}` must be a text field, not a file", code="invalid_field")
    return value
