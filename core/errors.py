"""Error types with stable snake_case codes, shared by the API, the worker and the CLI.

Every error a user can see carries a `code` that scripts can rely on and a sentence a person can act
on. `http_status` is what the API answers with; `retryable` tells the worker whether trying again
could help (a broker hiccup) or not (a broken image).
"""

from __future__ import annotations


class ModtagError(Exception):
    """Base error: a stable code, a human message, an HTTP status and whether a retry may help."""

    code: str = "internal_error"
    http_status: int = 500
    retryable: bool = False

    def __init_subclass__(
        cls, *, code: str | None = None, http_status: int | None = None, retryable: bool | None = None
    ) -> None:
        # The class statement is the table row: each kind of error is one line below, not three.
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status
        if retryable is not None:
            cls.retryable = retryable

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def to_dict(self) -> dict[str, str]:
        return {"detail": self.message, "code": self.code}

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class BadRequest(ModtagError, code="bad_request", http_status=400):
    """The request cannot be read."""


class NotFound(ModtagError, code="not_found", http_status=404):
    """No such record."""


class InvalidField(ModtagError, code="invalid_field", http_status=422):
    """A field of the request has a value that is not allowed."""


class PayloadTooLarge(ModtagError, code="payload_too_large", http_status=413):
    """The request body is larger than the limit."""


class ImageError(ModtagError, code="image_invalid", http_status=415):
    """The image cannot be used: empty, not an image, truncated, too big, a decompression bomb...

    Permanent: the same bytes will fail the same way, so the worker never retries it.
    """


class VideoError(ModtagError, code="video_invalid", http_status=422):
    """A video or an animated image cannot be used: too long, an unsupported codec, corrupt, frames too large...

    Permanent like ImageError: the same bytes fail the same way. 413 for bytes over MODTAG_MAX_VIDEO_BYTES.
    """


class FetchError(ModtagError, code="fetch_failed", http_status=422):
    """An `image_url` could not be fetched (refused address, timeout, too large, HTTP error).

    Timeouts, refused connections and 5xx/429 answers may pass: those are retried by the worker.
    """

    _TRANSIENT_CODES = frozenset({"fetch_timeout", "fetch_connect"})

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.retryable = self.code in self._TRANSIENT_CODES


class PolicyError(ModtagError, code="policy_invalid", http_status=422):
    """A policy file is invalid or a policy name is unknown."""


class ConfigError(ModtagError, code="config_invalid", http_status=500):
    """A setting or a command-line argument is wrong; raised before anything starts."""


class ModelError(ModtagError, code="model_unavailable", http_status=503):
    """Model weights cannot be found or loaded."""


class NotReady(ModtagError, code="not_ready", http_status=503):
    """A dependency the request needs is not ready yet."""


class TransientError(ModtagError, code="transient", http_status=503, retryable=True):
    """Something outside the job failed (database, broker, out of memory): retrying may succeed."""


class DependencyUnavailable(TransientError, code="dependency_unavailable"):
    """A dependency (`database`, `blob_store`, `broker`) cannot be reached: an outage, never the job's fault.

    The worker waits for it with capped backoff and does not spend one of the job's attempts on it.
    """

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency.replace('_', ' ')} unreachable: {reason}", code=f"{dependency}_unavailable")
        self.dependency = dependency
        self.reason = reason


class AuthError(ModtagError, code="auth_required", http_status=401):
    """No key, a wrong key or a revoked key (401); `code` says which."""


class Forbidden(ModtagError, code="forbidden", http_status=403):
    """A valid key whose role does not allow this (403)."""


class Conflict(ModtagError, code="conflict", http_status=409):
    """The record is not in a state that allows this (a review item claimed by someone else, already resolved...)."""


class QuotaExceeded(ModtagError, code="quota_exceeded", http_status=429):
    """The tenant is past its submission quota (429); `retry_after_s` says when the next submission fits."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyFailures(ModtagError, code="too_many_failures", http_status=429):
    """Too many failed key checks from one client address (429); `retry_after_s` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
