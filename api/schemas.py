"""Request bodies of the HTTP API and the patterns its paths and queries are checked against.

What the API answers with is in `core.public` (shared with the worker's callbacks).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, WithJsonSchema

from core.moments import parse_since

# Policy and category names are slugs (ids: core.tables.ID_PATTERN).
SLUG_PATTERN = r"^[a-z0-9_-]+$"
MAX_TITLE_CHARS = 500
MAX_DESCRIPTION_CHARS = 20_000
MAX_LABELS = 200  # per-category labels in one resolution: more categories than any policy has


# An age as the API takes it: at most 5 digits (99999 weeks still lands after year 1) and no spaces, so that the
# documented pattern and the parser agree exactly.
_AGE = r"^[0-9]{1,5}[smhdwSMHDW]$"


def _moment(value: object) -> object:
    # Anything that is not an age is left to pydantic's datetime parsing (ISO 8601), as before ages were taken.
    return parse_since(value) if isinstance(value, str) and re.match(_AGE, value) else value


# A `since` query: ISO 8601 (naive: UTC) or an age such as 7d, 12h, 30m, read as the CLI's `--since` is.
Moment = Annotated[
    datetime,
    BeforeValidator(_moment),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "pattern": _AGE}]}),
]
SINCE_HELP = "ISO 8601 (naive times are UTC) or an age: 7d, 12h, 30m."
# Typed loosely in the bodies so that a bad value is 422 `invalid_priority`, as in the multipart form.
PRIORITY_SCHEMA = {
    "type": "string",
    "enum": ["interactive", "bulk"],
    "default": "interactive",
    "description": "`bulk` goes to its own queue, taken only while no `interactive` job waits (backfills).",
}


class JobRequest(BaseModel):
    """`POST /v1/jobs` as JSON: the image is fetched from `image_url` by a worker."""

    model_config = ConfigDict(extra="forbid")

    # URL lengths are checked with the URL itself, so every bad URL is reported as `url_invalid`.
    image_url: str = Field(description="http(s) URL of the image, at most 2048 characters.")
    policy: str = Field(default="moderation", min_length=1, max_length=64)
    # Typed loosely so that a non-object is reported as `invalid_context`, like the multipart form does.
    context: Annotated[Any, WithJsonSchema({"type": "object", "description": "Listing text and attributes."})] = None
    callback_url: str | None = Field(default=None, description="http(s) URL, at most 2048 characters.")
    priority: Annotated[Any, WithJsonSchema(PRIORITY_SCHEMA)] = None


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
    priority: Annotated[Any, WithJsonSchema(PRIORITY_SCHEMA)] = None


class ResolveRequest(BaseModel):
    """A person's call on a queued item, kept beside the machine decision."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["allow", "block"]
    reason: str = Field(min_length=1, max_length=2000, description="Why; kept with the resolution.")
    add_to_bank: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="With `block`: also add the image's hashes to this bank of the tenant, so copies are blocked.",
    )
    categories: dict[Annotated[str, Field(max_length=64)], StrictBool] | None = Field(
        default=None,
        max_length=MAX_LABELS,
        description="Per category of the decision's policy, whether it applies (true) or not (false); categories not "
        "given follow the action (block: the fired ones apply; allow: none does). Feeds calibration.",
    )


class ReopenRequest(BaseModel):
    """An appeal: why the resolved item goes back to the queue."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


class BankRequest(BaseModel):
    """`POST /v1/banks`: a new hash bank of the caller's tenant."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    description: str | None = Field(default=None, max_length=2000)
    kind: Literal["block", "allow"] = Field(
        default="block", description="`allow`: an allow-list; a match in it suppresses the block banks' matches."
    )


class BankItemRequest(BaseModel):
    """`POST /v1/banks/{name}/items` as JSON: a known image by its PDQ hash or its SHA-256 (or both)."""

    model_config = ConfigDict(extra="forbid")

    pdq: str | None = Field(default=None, description="64 hex digits, as ThreatExchange and HMA write PDQ.")
    sha256: str | None = Field(default=None, description="64 hex digits: the image file's SHA-256.")
    note: str | None = Field(default=None, max_length=2000, description="Why it is banked; shown with the item.")


class BankImportRequest(BaseModel):
    """`POST /v1/banks/{name}/import`: many items at once (what `modtag banks import` sends)."""

    model_config = ConfigDict(extra="forbid")

    items: list[BankItemRequest] = Field(min_length=1, max_length=100_000)


def _json_number(value: object) -> object:
    # A string or a boolean is refused, not read as a number; 13.0 is the integer 13, as JSON Schema has it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return value


# Quota numbers: JSON numbers only, finite, within core.settings' bounds.
_QuotaRate = Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False), BeforeValidator(_json_number)]
_QuotaCount = Annotated[int, Field(ge=1, le=1_000_000_000), BeforeValidator(_json_number)]


class QuotaRequest(BaseModel):
    """`PUT /v1/quotas/{tenant}`: the tenant's override. A field given as a number sets that limit, `null` makes it
    unlimited, a field left out follows the MODTAG_TENANT_* setting."""

    model_config = ConfigDict(extra="forbid")

    rate: _QuotaRate | None = Field(default=None, description="Submissions (photos) per second, interactive lane.")
    burst: _QuotaCount | None = Field(default=None, description="How many at once above the rate.")
    bulk_rate: _QuotaRate | None = Field(default=None, description="Submissions per second in the bulk lane.")
    bulk_burst: _QuotaCount | None = Field(default=None, description="The bulk lane's burst.")
    daily_cap: Annotated[int, Field(ge=0, le=1_000_000_000), BeforeValidator(_json_number)] | None = Field(
        default=None, description="Submissions per UTC day, both lanes together; 0 stops the tenant's submissions."
    )


class ExampleSetRequest(BaseModel):
    """`POST /v1/example-sets`: a new example set of the caller's tenant."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    description: str | None = Field(default=None, max_length=2000)


class ExampleItemRequest(BaseModel):
    """`POST /v1/example-sets/{name}/items` as JSON: one of the tenant's jobs, labelled."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(min_length=1, max_length=64)
    label: Literal["positive", "negative"]


class BankFramesRequest(BaseModel):
    """`POST /v1/review/{job_id}/bank-frames`: a video's judged frames into one of the tenant's banks."""

    model_config = ConfigDict(extra="forbid")

    bank: str = Field(max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    times: list[Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]] | None = Field(
        default=None,
        max_length=1000,
        description="The frames to bank, by their `time_s`; default the frames on which a category fired "
        "(all of them when none fired).",
    )
    note: str | None = Field(default=None, max_length=500, description="Kept on each bank item with the frame's time.")
