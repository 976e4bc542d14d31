"""One intake for jobs and listings: read the body at the edge, then validate, store, insert and enqueue once.

A job is one photo judged against a policy; a listing is up to `listing_max_images` photos judged against the
listing's text, one job per photo. Both go through `accept`: cheapest checks first (photo count, image headers,
policy, context, URLs), an Idempotency-Key lookup before any blob is written, the blobs, one committed insert,
then the Celery tasks. A crash between commit and enqueue loses nothing: the reconciler enqueues queued jobs.
What differs between the two is said by their `Submission` subclass: how the body reads, what the context is,
where the records go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from fastapi import Depends, Header, Request, Response, status
from pydantic import BaseModel
from sqlmodel import Session
from starlette.datastructures import FormData, UploadFile

from api import quotas
from api.auth import Submitter
from api.bodies import (
    JSON_SLACK_BYTES,
    MULTIPART_SLACK_BYTES,
    BodyLimits,
    SpooledUpload,
    form_text,
    json_type,
    open_body,
    refuse_unknown_fields,
    spooled_upload,
    strict_json,
    validate_body,
)
from api.deps import Services, ServicesDep, SessionDep, SettingsDep, resolve_policy
from api.errors import error_responses
from api.schemas import MAX_DESCRIPTION_CHARS, MAX_TITLE_CHARS, PRIORITY_SCHEMA, JobRequest, ListingRequest
from api.upload_media import UploadHeader, check_upload, file_cap, upload_limit
from core.broker import enqueue_job
from core.errors import BadRequest, Conflict, FetchError, InvalidField, ModtagError, PayloadTooLarge, PolicyError
from core.images import ImageLimits
from core.jobs import NewJob, create_job, find_by_idempotency_key, mark_enqueued
from core.listings import (
    NewListing,
    create_listing,
    find_listing_by_idempotency_key,
    listing_context,
    listing_jobs,
)
from core.logs import log_fields
from core.metrics import JOBS_SUBMITTED
from core.principals import Principal
from core.public import ErrorBody, JobPublic, ListingPublic
from core.queues import Priority
from core.settings import Settings
from core.tables import Job, Listing
from core.urls import check_callback_url, validate_image_url
from core.video import VideoLimits
from policies import Policy

logger = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
MAX_CONTEXT_DEPTH = 16
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_CHARS = 200
_IDEMPOTENCY_KEY_MAX = 255
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
# `image_url` is listed so that a form with both it and `image` gets the clearer `ambiguous_image`.
_JOB_FORM_FIELDS = frozenset({"image", "image_url", "policy", "context", "callback_url", "priority"})
_LISTING_FORM_FIELDS = frozenset({"images", "policy", "title", "description", "attributes", "callback_url", "priority"})
Record = TypeVar("Record", Job, Listing)


@dataclass(frozen=True)
class Fingerprint:
    """What makes two submissions the same request: an Idempotency-Key may only be replayed with the same one."""

    policy: str
    images: tuple[str, ...]  # each upload's SHA-256, then each URL, in order
    context: dict[str, Any] | None
    callback_url: str | None
    # A key replayed with the other lane would answer a bulk request with an interactive job, or the reverse.
    priority: str


@dataclass(frozen=True)
class Submission(ABC, Generic[Record]):
    """Photos to judge against a policy, as read off the wire: sizes capped, nothing else validated yet."""

    # How the route documents itself: the answer's model, both request bodies, the replayed answer's description.
    public: ClassVar[type[BaseModel]]
    form: ClassVar[dict[str, Any]]
    json_body: ClassVar[type[BaseModel]]
    replayed: ClassVar[str]
    takes_video: ClassVar[bool] = False  # a video file or an animated image becomes a `media: video` job

    policy: str
    uploads: list[SpooledUpload]  # spooled by the body reader, open until the response
    urls: list[str]
    callback_url: str | None
    # `interactive` or `bulk`, checked as the body is read (read_priority): quotas give each its own budget.
    priority: Priority = Priority.INTERACTIVE

    def check_count(self, settings: Settings) -> None:
        """Refuse a submission with no photo, or too many."""

    def photo_label(self, index: int) -> str | None:
        """How an error names the upload at `index` (None: the only one)."""
        return None

    @abstractmethod
    def url_field(self, index: int) -> str:
        """How an error names the URL at `index`."""

    @abstractmethod
    def read_context(self, settings: Settings) -> dict[str, Any] | None:
        """The context every photo's job carries, validated."""

    @abstractmethod
    def find(self, session: Session, tenant: str, key: str) -> Record | None:
        """The record an earlier submission with this Idempotency-Key made."""

    @abstractmethod
    def fingerprint_of(self, session: Session, record: Record) -> Fingerprint:
        """The fingerprint of the request that made `record`."""

    @abstractmethod
    def insert(
        self, session: Session, photos: list[NewJob], key: str | None, callback_url: str | None
    ) -> tuple[Record, list[Job], bool]:
        """Insert and commit the record and its jobs; False (and the winner's record) when a racing twin won."""


@dataclass(frozen=True)
class Accepted(Generic[Record]):
    """A submission's outcome: its record (a job or a listing), the jobs it made, and whether it is new."""

    record: Record
    jobs: list[Job]
    created: bool

    def answer(self, response: Response, location: str) -> None:
        """202 for a new record; 200 with `Idempotent-Replayed: true` for one an earlier request made."""
        response.headers["Location"] = location
        if not self.created:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"


@dataclass(frozen=True)
class Intake:
    """What a submission route needs besides its body: who submits, the Idempotency-Key, where the records go."""

    principal: Principal
    idempotency_key: str | None
    services: Services
    session: Session
    response: Response

    def accept(self, submission: Submission[Record], collection: str) -> Accepted[Record]:
        """`accept` the submission, answered 202 (200 when replayed) with its Location under `collection`."""
        accepted = accept(
            submission,
            principal=self.principal,
            idempotency_key=self.idempotency_key,
            services=self.services,
            session=self.session,
        )
        accepted.answer(self.response, f"{collection}/{accepted.record.id}")
        return accepted


def accept(
    submission: Submission[Record],
    *,
    principal: Principal,
    idempotency_key: str | None,
    services: Services,
    session: Session,
) -> Accepted[Record]:
    """Validate (cheapest first), store the images, insert and commit the records, then enqueue one task per job."""
    settings = services.settings
    submission.check_count(settings)
    limits = ImageLimits.from_settings(settings)
    # One photo in memory at a time, only for its header checks; the store streams each from its spool.
    videos = VideoLimits.from_settings(settings) if submission.takes_video else None
    headers = [
        _sniff(upload, limits, videos, submission.photo_label(index)) for index, upload in enumerate(submission.uploads)
    ]
    policy = resolve_policy(services.policies, submission.policy)
    context = submission.read_context(settings)
    require_context(policy, context)
    urls: list[str] = [check_url(url, submission.url_field(index)) for index, url in enumerate(submission.urls)]
    callback_url = check_url(submission.callback_url, "callback_url") if submission.callback_url else None
    if callback_url:
        check_callback_url(callback_url, allow_private=settings.fetch_allow_private)

    digests = [upload.sha256 for upload in submission.uploads]
    fingerprint = Fingerprint(
        policy=policy.name,
        images=tuple(digests + urls),
        context=context,
        callback_url=callback_url,
        priority=submission.priority.value,
    )
    if idempotency_key and (existing := submission.find(session, principal.tenant, idempotency_key)) is not None:
        return _replay(submission, session, existing, fingerprint, idempotency_key)
    # A replay costs nothing; a new submission one token per photo, before any image is stored (api/quotas.py).
    quotas.charge(services, session, principal, lane=submission.priority.value, photos=len(fingerprint.images))

    common: dict[str, Any] = {
        "tenant": principal.tenant,
        "policy": policy.name,
        "policy_version": policy.version,
        "context": context,
        "submitted_by": principal.key_id,
        "request_id": log_fields().get("request_id"),
        "priority": submission.priority.value,
    }
    uploads = zip(submission.uploads, headers, strict=True)
    photos = [_upload_job(services, upload, header, common) for upload, header in uploads]
    photos.extend(NewJob(**common, source="url", image_url=url) for url in urls)
    record, jobs, created = submission.insert(session, photos, idempotency_key, callback_url)
    if not created and idempotency_key:  # a racing twin with the same key won: it must have been this request
        return _replay(submission, session, record, fingerprint, idempotency_key)
    _enqueue(services, session, jobs)
    return Accepted(record, jobs, created)


def _replay(
    submission: Submission[Record], session: Session, record: Record, fingerprint: Fingerprint, key: str
) -> Accepted[Record]:
    """The earlier record of `key` when this is the same request; 409 `idempotency_conflict` when it is not.

    Answering another request with the first one's record would hand an image the decision of another image.
    """
    if submission.fingerprint_of(session, record) != fingerprint:
        raise Conflict(
            f"the Idempotency-Key {key[:64]!r} was used for a different request (another image, policy, context, "
            "callback_url or priority); use a new key for a new request",
            code="idempotency_conflict",
        )
    return Accepted(record, [], created=False)


@dataclass(frozen=True)
class JobSubmission(Submission[Job]):
    """`POST /v1/jobs`: one image (an upload or an `image_url`) and an optional JSON context."""

    public = JobPublic
    form = {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "string",
                "format": "binary",
                "description": "JPEG, PNG, WebP, GIF...; or a video: MP4, MOV, WebM, an animated GIF, WebP or PNG.",
            },
            "policy": {"type": "string", "default": "moderation"},
            "context": {"type": "string", "description": "A JSON object, e.g. the listing's title and attributes."},
            "callback_url": {"type": "string", "format": "uri"},
            "priority": PRIORITY_SCHEMA,
        },
    }
    json_body = JobRequest
    replayed = "A job with this Idempotency-Key already exists; it is returned."
    takes_video = True
    context: Any = None  # multipart: the JSON text; JSON body: the parsed value
    context_is_text: bool = False

    def url_field(self, index: int) -> str:
        return "image_url"

    def read_context(self, settings: Settings) -> dict[str, Any] | None:
        """A JSON object of at most `max_context_bytes` (413), well-formed (400), an object (422), or nothing."""
        limit = settings.max_context_bytes
        value = self.context
        if self.context_is_text:
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
            raise InvalidField(f"`context` must be a JSON object, not {json_type(value)}", code="invalid_context")
        if _depth(value) > MAX_CONTEXT_DEPTH:
            raise InvalidField(f"`context` is nested deeper than {MAX_CONTEXT_DEPTH} levels", code="invalid_context")
        return value

    def find(self, session: Session, tenant: str, key: str) -> Job | None:
        return find_by_idempotency_key(session, tenant, key)

    def fingerprint_of(self, session: Session, record: Job) -> Fingerprint:
        return Fingerprint(record.policy, (_image_of(record),), record.context, record.callback_url, record.priority)

    def insert(
        self, session: Session, photos: list[NewJob], key: str | None, callback_url: str | None
    ) -> tuple[Job, list[Job], bool]:
        (photo,) = photos
        job, created = create_job(session, dataclasses.replace(photo, idempotency_key=key, callback_url=callback_url))
        return job, [job], created


@dataclass(frozen=True)
class ListingSubmission(Submission[Listing]):
    """`POST /v1/listings`: a listing's photos with its title, description and attributes."""

    public = ListingPublic
    form = {
        "type": "object",
        "required": ["images", "title"],
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "The photos."},
            "title": {"type": "string"},
            "description": {"type": "string"},
            "attributes": {"type": "string", "description": 'A JSON object, e.g. {"color": "red", "count": 2}.'},
            "policy": {"type": "string", "default": "listing"},
            "callback_url": {"type": "string", "format": "uri"},
            "priority": PRIORITY_SCHEMA,
        },
    }
    json_body = ListingRequest
    replayed = "A listing with this Idempotency-Key already exists."
    title: Any = None
    description: Any = None
    attributes: Any = None  # multipart: the JSON text; JSON body: the parsed value
    attributes_is_text: bool = False

    def check_count(self, settings: Settings) -> None:
        count = len(self.uploads) + len(self.urls)
        if count == 0:
            raise InvalidField("the listing has no photos: send `images` files, or `image_urls`", code="image_missing")
        if count > settings.listing_max_images:
            raise InvalidField(
                f"the listing has {count} photos; at most {settings.listing_max_images} are accepted per listing",
                code="too_many_images",
            )

    def photo_label(self, index: int) -> str | None:
        return f"photo {index + 1}"

    def url_field(self, index: int) -> str:
        return f"image_urls[{index}]"

    def read_context(self, settings: Settings) -> dict[str, Any]:
        """What the listing says, as the checks read it: its title (required), description and attributes."""
        title = _text(self.title, "title", MAX_TITLE_CHARS)
        if title is None:
            raise InvalidField("`title` is missing: a listing needs its title", code="title_missing")
        description = _text(self.description, "description", MAX_DESCRIPTION_CHARS)
        context = listing_context(title, description, _attributes(self.attributes, self.attributes_is_text))
        if len(json.dumps(context, separators=(",", ":")).encode()) > settings.max_context_bytes:
            raise PayloadTooLarge(
                f"the title, description and attributes are larger than {settings.max_context_bytes} bytes",
                code="context_too_large",
            )
        return context

    def find(self, session: Session, tenant: str, key: str) -> Listing | None:
        return find_listing_by_idempotency_key(session, tenant, key)

    def fingerprint_of(self, session: Session, record: Listing) -> Fingerprint:
        jobs = [job for job, _ in listing_jobs(session, record.id)]
        uploads = [_image_of(job) for job in jobs if job.source == "upload"]
        urls = [_image_of(job) for job in jobs if job.source != "upload"]
        context = listing_context(record.title, record.description, record.attributes)
        priority = jobs[0].priority if jobs else Priority.INTERACTIVE.value  # every photo's job has the listing's
        return Fingerprint(record.policy, (*uploads, *urls), context, record.callback_url, priority)

    def insert(
        self, session: Session, photos: list[NewJob], key: str | None, callback_url: str | None
    ) -> tuple[Listing, list[Job], bool]:
        first = photos[0]
        context = first.context or {}
        listing = NewListing(
            tenant=first.tenant,
            policy=first.policy,
            policy_version=first.policy_version,
            title=context.get("title"),
            description=context.get("description"),
            attributes=context.get("attributes", {}),
            idempotency_key=key,
            submitted_by=first.submitted_by,
            callback_url=callback_url,
        )
        return create_listing(session, listing, photos)


# Documented on both answers of a submission: the `Prefer: wait` the API honoured (api/moderate_now.py).
_PREFERENCE_APPLIED = {
    "Preference-Applied": {
        "description": "`wait=N` (or `respond-async, wait=N`): the wait honoured, when `Prefer: wait` asked for one.",
        "schema": {"type": "string"},
    }
}


def submission_route(kind: type[Submission[Any]]) -> dict[str, Any]:
    """The `router.post` arguments of a submission route: 202 (200 when replayed), and both request bodies
    documented (the body is read by hand, so FastAPI cannot infer them)."""
    content = {
        "multipart/form-data": {"schema": kind.form},
        "application/json": {"schema": kind.json_body.model_json_schema()},
    }
    return {
        "status_code": status.HTTP_202_ACCEPTED,
        "response_model": kind.public,
        "openapi_extra": {"requestBody": {"required": True, "content": content}},
        "responses": {
            200: {
                "model": kind.public,
                "description": f"{kind.replayed} Or, with `Prefer: wait=N`, decided within the wait.",
                "headers": _PREFERENCE_APPLIED,
            },
            202: {"description": "Accepted: decided later.", "headers": _PREFERENCE_APPLIED},
            **error_responses(400, 401, 403, 404, 409, 413, 415, 422),
            429: {
                "model": ErrorBody,
                "description": "The tenant is past its submission quota (`quota_exceeded`: a rate or the daily cap), "
                "or too many failed key checks (`too_many_failures`)",
                "headers": {"Retry-After": {"description": "Whole seconds to wait.", "schema": {"type": "integer"}}},
            },
        },
    }


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Retrying the same request with the same key returns the same record (200); another "
            "request under a used key is 409 `idempotency_conflict`. 1 to 255 printable ASCII characters.",
            # Documented, not enforced here: `idempotency_key` refuses with its own code.
            json_schema_extra={"minLength": 1, "maxLength": _IDEMPOTENCY_KEY_MAX, "pattern": "^[ -~]+$"},
        ),
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


def read_intake(
    principal: Submitter,  # first: the body is not read for a caller who may not submit
    idempotency_key: IdempotencyKeyDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> Intake:
    """A submission route's first dependency: the role check runs before its body is read."""
    return Intake(principal, idempotency_key, services, session, response)


async def read_job_submission(request: Request, settings: SettingsDep) -> AsyncIterator[JobSubmission]:
    """`POST /v1/jobs` off the wire: a multipart upload or JSON with `image_url`, refused past its size first; the
    upload stays spooled (and its room in the upload budget held) until the route is done."""
    cap = settings.max_context_bytes + JSON_SLACK_BYTES
    limits = BodyLimits(
        multipart_cap=max(settings.max_upload_bytes, settings.max_video_bytes)
        + settings.max_context_bytes
        + MULTIPART_SLACK_BYTES,
        multipart_too_large=("image_too_large", _image_too_large(settings)),
        max_files=1,
        max_fields=8,
        json_cap=cap,
        json_too_large=f"the JSON body is over {cap} bytes; the context may be at most {settings.max_context_bytes}",
        expected="multipart/form-data with an `image` file, or application/json with an `image_url`",
        file_cap=file_cap(settings),  # an image stops at its limit, a video file at the video limit
        # A video is never read whole (probed and stored from its spool): it holds what an image would.
        budget_bytes=settings.max_upload_bytes + settings.max_context_bytes + MULTIPART_SLACK_BYTES,
    )

    async def from_form(form: FormData) -> JobSubmission:
        refuse_unknown_fields(form, _JOB_FORM_FIELDS)
        image = form.get("image")
        if image is not None and form.get("image_url") is not None:
            raise BadRequest("send either an `image` file or an `image_url`, not both", code="ambiguous_image")
        if not isinstance(image, UploadFile):
            raise InvalidField(
                "the `image` file is missing: send the image as a multipart file field named `image`",
                code="image_missing",
            )
        return JobSubmission(
            policy=form_text(form, "policy") or "moderation",
            uploads=[spooled_upload(image, upload_limit(image, settings), "the image")],
            urls=[],
            callback_url=form_text(form, "callback_url") or None,
            priority=read_priority(form_text(form, "priority") or None),
            context=form_text(form, "context"),
            context_is_text=True,
        )

    def from_json(document: dict[str, Any]) -> JobSubmission:
        if "image_url" not in document:
            raise InvalidField(
                "`image_url` is missing: send it in a JSON body, or upload the file as multipart field `image`",
                code="image_missing",
            )
        parsed = validate_body(JobRequest, document)
        return JobSubmission(
            policy=parsed.policy,
            uploads=[],
            urls=[parsed.image_url],
            callback_url=parsed.callback_url,
            priority=read_priority(parsed.priority),
            context=parsed.context,
        )

    async with open_body(request, limits, from_form=from_form, from_json=from_json) as submission:
        yield submission


async def read_listing_submission(request: Request, settings: SettingsDep) -> AsyncIterator[ListingSubmission]:
    """`POST /v1/listings` off the wire: multipart `images` or JSON `image_urls`, refused past its size first; the
    uploads stay spooled (and their room in the upload budget held) until the route is done."""
    most = settings.listing_max_images
    multipart_cap = most * settings.max_upload_bytes + settings.max_context_bytes + MULTIPART_SLACK_BYTES
    json_cap = settings.max_context_bytes + most * MAX_URL_CHARS + JSON_SLACK_BYTES
    limits = BodyLimits(
        multipart_cap=multipart_cap,
        multipart_too_large=(
            "payload_too_large",
            f"the listing is larger than {multipart_cap} bytes ({most} photos of at most "
            f"{settings.max_upload_bytes} bytes)",
        ),
        max_files=most + 1,
        max_fields=16,
        json_cap=json_cap,
        json_too_large=f"the JSON body is over {json_cap} bytes",
        expected="multipart/form-data with `images` files, or application/json with `image_urls`",
        too_many_files=f"too many photos: at most {most} are accepted per listing",
    )

    async def from_form(form: FormData) -> ListingSubmission:
        files = form.getlist("images")
        uploads = [item for item in files if isinstance(item, UploadFile)]
        if len(uploads) != len(files):
            raise InvalidField("`images` must be files (multipart file fields named `images`)", code="invalid_field")
        others = [key for key, item in form.multi_items() if isinstance(item, UploadFile) and key != "images"]
        if others:
            raise InvalidField(f"unexpected file field {others[0]!r}: photos go in `images`", code="invalid_field")
        refuse_unknown_fields(form, _LISTING_FORM_FIELDS)
        if len(uploads) > most:
            raise InvalidField(
                f"the listing has {len(uploads)} photos; at most {most} are accepted", code="too_many_images"
            )
        images = [
            spooled_upload(upload, settings.max_upload_bytes, f"photo {index + 1}")
            for index, upload in enumerate(uploads)
        ]
        return ListingSubmission(
            policy=form_text(form, "policy") or "listing",
            uploads=images,
            urls=[],
            callback_url=form_text(form, "callback_url") or None,
            priority=read_priority(form_text(form, "priority") or None),
            title=form_text(form, "title"),
            description=form_text(form, "description"),
            attributes=form_text(form, "attributes"),
            attributes_is_text=True,
        )

    def from_json(document: dict[str, Any]) -> ListingSubmission:
        parsed = validate_body(ListingRequest, document)
        return ListingSubmission(
            policy=parsed.policy,
            uploads=[],
            urls=parsed.image_urls,
            callback_url=parsed.callback_url,
            priority=read_priority(parsed.priority),
            title=parsed.title,
            description=parsed.description,
            attributes=parsed.attributes,
        )

    async with open_body(request, limits, from_form=from_form, from_json=from_json) as submission:
        yield submission


def read_priority(value: object) -> Priority:
    """The `priority` field: `interactive` (also when absent) or `bulk`; anything else is 422 `invalid_priority`."""
    if value is None:
        return Priority.INTERACTIVE
    if isinstance(value, str):
        try:
            return Priority(value.strip())
        except ValueError:
            pass
    shown = repr(value[:32]) if isinstance(value, str) else json_type(value)
    raise InvalidField(f'`priority` must be "interactive" or "bulk", not {shown}', code="invalid_priority")


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


JobSubmissionDep = Annotated[JobSubmission, Depends(read_job_submission)]
ListingSubmissionDep = Annotated[ListingSubmission, Depends(read_listing_submission)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
IntakeDep = Annotated[Intake, Depends(read_intake)]


def _image_of(job: Job) -> str:
    return (job.image_sha256 if job.source == "upload" else job.image_url) or ""


def _sniff(upload: SpooledUpload, limits: ImageLimits, videos: VideoLimits | None, label: str | None) -> UploadHeader:
    try:
        return check_upload(upload, limits, videos)
    except ModtagError as exc:
        if label is None:
            raise
        raise ModtagError(f"{label}: {exc.message}", code=exc.code, http_status=exc.http_status) from None


def _upload_job(services: Services, upload: SpooledUpload, header: UploadHeader, common: dict[str, Any]) -> NewJob:
    blob_key = services.blobs.put_file(upload.rewound())  # streamed from the spool, hashed again on the way
    if blob_key != upload.sha256:
        raise ModtagError("the upload changed while it was stored", code="internal_error", http_status=500)
    return NewJob(
        **common,
        source="upload",
        blob_key=blob_key,
        image_sha256=blob_key,  # the blob store is content-addressed by SHA-256
        image_bytes=upload.size or 0,
        image_width=header.width,
        image_height=header.height,
        image_format=header.format,
        media=header.media,
    )


def _enqueue(services: Services, session: Session, jobs: Sequence[Job]) -> None:
    """Enqueue the committed jobs and record which reached the broker. A failure is not the client's: the jobs are
    committed, the answer stays 202, and the reconciler's outbox sweep enqueues the rest within seconds."""
    enqueued: list[str] = []
    broker_failed = False
    for job in jobs:
        JOBS_SUBMITTED.labels(policy=job.policy, source=job.source).inc()
        if broker_failed:
            continue  # it just failed this request: the sweep enqueues the rest, without one more wait per job
        try:
            enqueue_job(services.celery, job.id, Priority.of(job.priority))
        except Exception as exc:
            broker_failed = True
            logger.warning("job %s stored but not enqueued (%s); the reconciler will enqueue it", job.id, exc)
            continue
        enqueued.append(job.id)
    try:
        mark_enqueued(session, *enqueued)
    except Exception as exc:  # the sweep enqueues them a second time: the claim makes the duplicate harmless
        session.rollback()
        logger.warning("could not record the enqueue of %d job(s) (%s)", len(enqueued), exc)


def _image_too_large(settings: Settings) -> str:
    most = max(settings.max_upload_bytes, settings.max_video_bytes)
    return (
        f"the upload is larger than the limit of {most} bytes (an image may be at most {settings.max_upload_bytes} "
        f"bytes, MODTAG_MAX_UPLOAD_BYTES; a video {settings.max_video_bytes}, MODTAG_MAX_VIDEO_BYTES)"
    )


def _context_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"`context` is larger than {limit} bytes", code="context_too_large")


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


def _depth(value: object, level: int = 1) -> int:
    if level > MAX_CONTEXT_DEPTH:
        return level  # deep enough to reject; don't walk a hostile structure further
    if isinstance(value, dict):
        return max((_depth(item, level + 1) for item in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(item, level + 1) for item in value), default=level)
    return level
