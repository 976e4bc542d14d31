"""Request bodies of the HTTP API and the patterns its paths and queries are checked against.

What the API answers with is in `core.public` (shared with the worker's callbacks).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# Policy and category names are slugs (ids: core.tables.ID_PATTERN).
SLUG_PATTERN = r"^[a-z0-9_-]+$"


class JobRequest(BaseModel):
    """`POST /v1/jobs` as JSON: the image is fetched from `image_url` by a worker."""

    model_config = ConfigDict(extra="forbid")

    # URL lengths are checked with the URL itself, so every bad URL is reported as `url_invalid`.
    image_url: str = Field(description="http(s) URL of the image, at most 2048 characters.")
    policy: str = Field(default="moderation", min_length=1, max_length=64)
    # Typed loosely so that a non-object is reported as `invalid_context`, like the multipart form does.
    context: Annotated[Any, WithJsonSchema({"type": "object", "description": "Listing text and attributes."})] = None
    callback_url: str | None = Field(default=None, description="http(s) URL, at most 2048 characters.")


class ResolveRequest(BaseModel):
    """A person's call on a queued item, kept beside the machine decision."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["allow", "block"]
    reason: str = Field(min_length=1, max_length=2000, description="Why; kept with the resolution.")


class ReopenRequest(BaseModel):
    """An appeal: why the resolved item goes back to the queue."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
