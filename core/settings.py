"""The one settings object, read from `MODTAG_*` environment variables (and an optional `.env`)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

# The largest quota numbers taken (settings and the quota API): far above any real need, small enough for Redis's
# Lua numbers (doubles) to stay exact.
QUOTA_MAX_RATE = 1_000_000.0
QUOTA_MAX_COUNT = 1_000_000_000

# A key chosen by an operator (MODTAG_ADMIN_KEY): long and printable, so it fits a header and is hard to guess.
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{32,256}$")


class Settings(BaseSettings):
    """Everything an operator can set. Defaults run the whole stack on one machine."""

    model_config = SettingsConfigDict(env_prefix="MODTAG_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(
        default_factory=lambda: default_data_dir(),
        description="Where the SQLite file and blobs live; default the user's data directory (not the working one).",
    )
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")
    redis_url: str = "redis://localhost:6379/0"
    blob_dir: Path | None = Field(default=None, description="Image store; default data_dir/blobs.")
    blob_url: str | None = Field(
        default=None,
        description="Image store as a URL: file:///path or s3://bucket/prefix (AWS_* variables); default blob_dir.",
    )
    db_pool_size: int = Field(default=5, ge=1, le=200, description="PostgreSQL connections kept open per process.")
    db_max_overflow: int = Field(default=5, ge=0, le=200, description="Extra PostgreSQL connections under load.")
    migrate_on_start: bool = Field(
        default=True, description="API and workers migrate the database at start; false where `modtag migrate` runs."
    )
    policies_dir: Path | None = Field(default=None, description="Extra policy YAML files beside the built-ins.")

    # BLIP models: a preset (worker/families/blip/presets.py) or a directory of three model folders.
    models: str = "base"
    models_cache_dir: Path | None = Field(default=None, description="Where built random models are kept.")
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    torch_threads: int = Field(default=0, ge=0, description="0: torch's default.")
    native_kernels: bool = Field(
        default=True, description="The vision attention's AVX-512 kernel, built with the C compiler on first use."
    )
    cuda_graphs: bool = Field(
        default=True, description="On CUDA, each caption decoding step replays one captured CUDA graph; false: eager."
    )
    int8_stages: str | None = Field(
        default=None,
        description="With dtype int8: the stages run at int8, comma-separated among vision, caption, probes, matches "
        "(empty: none); the others at bf16. Default: where `modtag bench` measured int8 to pay (the README).",
    )
    int8_calibration: Path | None = Field(
        default=None,
        description="With dtype int8: a file of static input scales (`modtag int8-calibrate`); unset: dynamic scales.",
    )

    # Limits on inputs.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_side: int = Field(default=16_384, gt=0)
    min_image_side: int = Field(default=8, gt=0)
    max_context_bytes: int = Field(default=64 * 1024, gt=0)
    # Videos and animated images (core/video.py).
    max_video_bytes: int = Field(default=500 * 1024 * 1024, gt=0, description="Largest video upload or download.")
    max_video_seconds: float = Field(default=600.0, gt=0, description="Longest video accepted (422 video_too_long).")
    max_video_side: int = Field(
        default=4096, gt=0, description="Largest side of a video's frames (422 video_frame_too_large)."
    )
    video_fps: float = Field(default=1.0, gt=0, le=30, description="Frames sampled per second of video.")
    video_scene_threshold: float = Field(
        default=0.15, ge=0, le=1, description="Mean grey change (0-1) that keeps a frame between samples; 0: off."
    )
    video_pdq_skip: int = Field(
        default=20, ge=0, le=128, description="A frame this close (PDQ bits) to the last kept one is skipped."
    )
    video_max_frames: int = Field(
        default=300, ge=1, le=10_000, description="Frames judged per video at most; a long video's interval stretches."
    )
    video_decode_threads: int = Field(default=0, ge=0, le=64, description="Decoder threads per video; 0: up to 4.")
    listing_max_images: int = Field(default=10, gt=0, le=100, description="Photos one POST /v1/listings may carry.")
    max_body_bytes: int = Field(
        default=64 * 1024, gt=0, description="Largest request body of a route that takes no image (413 past it)."
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="Largest request line and headers the API reads (431/400 past it)."
    )
    upload_bytes_in_flight: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="Upload bytes one API process receives and stores at once (each upload counts its Content-Length); "
        "past it an upload waits `upload_wait_s`, then is 503 `busy` with Retry-After.",
    )
    upload_spool_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024,
        gt=0,
        description="Bytes of uploads one API process keeps on its temporary disk at once (each upload counts its "
        "Content-Length, a video its whole length); past it an upload waits `upload_wait_s`, then is 503 `busy`. "
        "An upload larger than it runs alone.",
    )
    upload_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="How long an upload waits for room under upload_bytes_in_flight and upload_spool_bytes.",
    )
    body_read_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A request body must have arrived this long after its first read (408 past it).",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="How long the API keeps an idle connection, and waits for a request's headers."
    )
    api_max_connections: int | None = Field(
        default=None,
        gt=0,
        description="Connections and requests one API process serves at once (503 past it); unset: no limit.",
    )
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    fetch_allow_private: bool = Field(default=False, description="Allow image_url on loopback/private nets.")

    # Jobs and queues.
    job_timeout_s: int = Field(default=300, gt=0, description="Hard limit for one job in the worker.")
    visibility_timeout_s: int | None = Field(
        default=None,
        gt=0,
        description="Redis redelivers an unacknowledged message after this; default follows the lease.",
    )
    running_lease_s: int = Field(
        default=60, gt=0, description="A running job whose worker has not renewed its lease for this long is retried."
    )
    lease_renew_s: float | None = Field(
        default=None, gt=0, description="How often a worker renews its running jobs' leases; default a quarter lease."
    )
    worker_drain_s: float = Field(
        default=60.0, gt=0, description="After SIGTERM, how long running jobs may finish before they are handed back."
    )
    max_prefer_wait_s: float = Field(
        default=30.0,
        ge=0,
        le=300,
        description="The longest `Prefer: wait=N` a submission may ask the API to hold its answer for a decision "
        "(0 turns moderate-now calls off: every submission answers 202 at once).",
    )
    prefer_wait_recheck_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="While a `Prefer: wait` call waits, how often it reads the job from the database besides the "
        "worker's notice in Redis (what a missed notice, or Redis down, costs at most).",
    )
    queued_grace_s: int = Field(default=60, gt=0, description="A queued job older than this is re-enqueued.")
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    outbox_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the reconciler looks for queued jobs whose task never reached the broker, and for a "
        "broker restarted empty (one process of the fleet per look).",
    )
    outbox_grace_s: float = Field(
        default=5.0,
        gt=0,
        description="A queued job whose task never reached the broker (a crash or broker outage at submit) is "
        "enqueued once older than this.",
    )
    reconcile_lock_s: float = Field(
        default=60.0,
        gt=0,
        description="The longest a reconciler pass holds the fleet's lock (in Redis): one pass at a time across the "
        "fleet; a pass whose process died is taken over after this.",
    )
    worker_consumer_restarts: int = Field(
        default=5,
        ge=0,
        description="How many times `modtag worker` restarts a Celery consumer that stopped on an error, within "
        "`worker_consumer_restart_window_s`, before it exits non-zero.",
    )
    worker_consumer_restart_window_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=3, gt=0)
    dependency_retry_max_s: float = Field(
        default=300,
        gt=0,
        description="Longest wait before a job that met an unreachable database, blob store or broker is tried "
        "again (exponential from about 1 s, with jitter; never one of its attempts, no limit on the waits).",
    )
    batch_max_images: int = Field(default=8, gt=0)
    batch_wait_ms: int = Field(default=20, ge=0)
    policy_reload_s: float = Field(
        default=2.0, ge=0, description="How often a worker looks for edited policy files; 0: on every access."
    )
    worker_decoded_megapixels: float = Field(
        default=320, gt=0, description="Decoded image pixels (millions) one worker holds at once; more jobs wait."
    )
    worker_decoded_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Bytes of decoded pixels one worker holds at once (RGB 3 per pixel, RGBA 4, 16-bit grey 2...); "
        "more jobs wait. Default: MODTAG_WORKER_DECODED_MEGAPIXELS (deprecated) at 3 bytes per pixel, 960 MB.",
    )
    worker_malloc_arenas: int = Field(
        default=2,
        ge=0,
        le=1024,
        description="malloc arenas a worker's threads share (glibc's M_ARENA_MAX); 0: glibc's default, eight per core, "
        "which after a burst left each task thread an arena of its own that stays resident.",
    )
    worker_concurrency: int | None = Field(
        default=None, gt=0, le=256, description="Task threads per worker; default three times batch_max_images."
    )
    worker_bulk_held: int | None = Field(
        default=None,
        gt=0,
        le=256,
        description="Bulk jobs one worker holds at once; default its task threads minus batch_max_images (at least "
        "half of them), so a batch of threads is always free for interactive jobs.",
    )

    # Webhooks (core/webhooks.py): the waits after each failed attempt, then give up. Standard Webhooks' schedule.
    webhook_retry_intervals_s: list[float] = Field(
        default=[5, 300, 1800, 7200, 18_000, 36_000, 36_000],
        min_length=1,
        description="Seconds before each retry of a failed webhook (JSON list); after the last, it is failed.",
    )
    webhook_poll_s: float = Field(default=5.0, gt=0, description="How often a worker looks for due webhook retries.")
    webhook_secret_overlap_s: int = Field(
        default=86_400, ge=0, description="How long a rotated-out webhook secret keeps signing beside the new one."
    )

    # Tenant quotas (core/quotas.py): submissions (photos) per second as a token bucket in Redis, per tenant and
    # lane, and a daily cap; unset is unlimited. An admin of quota_admin_tenant overrides them per tenant.
    tenant_rate: float | None = Field(
        default=None, gt=0, le=QUOTA_MAX_RATE, description="Submissions per second a tenant may make (interactive)."
    )
    tenant_burst: int | None = Field(
        default=None, ge=1, le=QUOTA_MAX_COUNT, description="How many at once above the rate; default the rate, >= 1."
    )
    tenant_bulk_rate: float | None = Field(
        default=None, gt=0, le=QUOTA_MAX_RATE, description="Submissions per second in the bulk lane, its own budget."
    )
    tenant_bulk_burst: int | None = Field(
        default=None, ge=1, le=QUOTA_MAX_COUNT, description="The bulk lane's burst; default its rate, >= 1."
    )
    tenant_daily_cap: int | None = Field(
        default=None, ge=0, le=QUOTA_MAX_COUNT, description="Submissions per tenant and UTC day, both lanes together."
    )
    quota_admin_tenant: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="The tenant whose admins set every tenant's quota (other admins only read their own).",
    )

    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, with request id, job id and tenant."
    )

    # Processes.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535, description="0 disables it.")
    worker_metrics_host: str | None = Field(
        default=None, description="Where a worker serves /metrics; default api_host (containers: 0.0.0.0)."
    )

    # Access control (api/auth.py).
    auth: bool = Field(default=True, description="Require API keys; false is for development only.")
    admin_key: SecretStr | None = Field(default=None, description="Bootstrap admin key for `modtag up` / `api`.")
    api_key: SecretStr | None = Field(default=None, description="The key `modtag scan --api` sends.")
    review_claim_lease_s: int = Field(default=600, gt=0, le=86_400, description="How long a review claim lasts.")
    session_ttl_s: int = Field(default=8 * 3600, gt=0, le=30 * 86_400, description="Dashboard sign-in lifetime.")
    auth_max_failures: int = Field(default=10, gt=0, description="Failed key checks per client address and window.")
    auth_failure_window_s: int = Field(default=300, gt=0, le=86_400, description="The failure-count window.")
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated proxy addresses whose X-Forwarded-For names the client; empty: none, not even "
        "loopback.",
    )

    # Dashboard single sign-on with OpenID Connect (core/sso.py, api/sso.py); unset issuer: keys only.
    oidc_issuer: str | None = Field(
        default=None, description="The identity provider's issuer URL (discovery: <issuer>/.well-known/...)."
    )
    oidc_client_id: str | None = Field(default=None, max_length=256, description="modtag's client id there.")
    oidc_client_secret: SecretStr | None = Field(default=None, description="modtag's client secret there.")
    oidc_tenant_claim: str = Field(default="modtag_tenant", min_length=1, description="The claim naming the tenant.")
    oidc_role_claim: str = Field(
        default="modtag_role", min_length=1, description="The claim naming the role (a string or a list)."
    )
    oidc_roles: str = Field(
        default="",
        description="Comma-separated `value=role` pairs mapping the role claim's values to submit, review or admin; "
        "empty: the claim holds those names.",
    )
    oidc_scopes: str = Field(default="openid profile email", description="The scopes asked for (openid first).")
    oidc_redirect_url: str | None = Field(
        default=None,
        description="The callback registered at the provider; default: this server's /dashboard/sso/callback as "
        "the browser reached it.",
    )
    oidc_display_name: str = Field(default="single sign-on", max_length=64, description="The sign-in button's name.")
    oidc_timeout_s: float = Field(default=10, gt=0, le=60, description="Each call to the identity provider.")

    # Known content and retention (core/banks.py, core/erasure.py).
    reuse_decisions: bool = Field(
        default=True,
        description="Reuse the decision of an earlier job with the same bytes, context and policy version.",
    )
    retention_days: int | None = Field(
        default=None, gt=0, description="Erase the images and content of jobs older than this; unset keeps them."
    )
    orphan_blob_grace_s: int = Field(
        default=3600,
        ge=300,
        description="A stored image that no job uses is deleted once older than this (an upload stores its image, "
        "then commits its job within its request: the grace must outlast the longest request).",
    )
    orphan_sweep_interval_s: float = Field(
        default=900, gt=0, description="How often the reconciler looks for stored images that no job uses."
    )
    bank_import_max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="The largest hash list one `POST /v1/banks/{name}/import` reads (at most 100,000 hashes).",
    )
    bank_flood_share: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="A banked hash matching more than this share of a tenant's uploads of the day (UTC) is a flood: "
        "modtag_bank_flood_warnings_total counts it (core/bankflood.py).",
    )
    bank_flood_min_matches: int = Field(
        default=50, ge=1, description="The fewest matches of one banked hash in a day before it can count as a flood."
    )

    @field_validator("models")
    @classmethod
    def _models_known(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be a preset (base, large, tiny-random, random-base) or a directory")
        return value

    @field_validator("blob_url")
    @classmethod
    def _blob_url_known(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(file:///.|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/|$))", value):
            raise ValueError("must be file:///absolute/path or s3://bucket[/prefix]")
        return value

    @field_validator(
        "tenant_rate", "tenant_burst", "tenant_bulk_rate", "tenant_bulk_burst", "tenant_daily_cap", mode="before"
    )
    @classmethod
    def _unlimited_is_none(cls, value: object) -> object:
        # `MODTAG_TENANT_RATE=` (compose's unset variable) or `unlimited` mean no limit.
        return None if isinstance(value, str) and value.strip().lower() in ("", "unlimited") else value

    @field_validator("admin_key", "api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # `MODTAG_ADMIN_KEY=` (as compose writes an unset variable) means no key, not an invalid one.
        return None if value == "" else value

    @field_validator("admin_key", "api_key")
    @classmethod
    def _key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not KEY_PATTERN.match(value.get_secret_value()):
            raise ValueError("must be 32 to 256 printable ASCII characters without spaces (use a random string)")
        return value

    @field_validator("oidc_issuer", "oidc_client_id", "oidc_client_secret", "oidc_redirect_url", mode="before")
    @classmethod
    def _empty_oidc_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("oidc_issuer", "oidc_redirect_url")
    @classmethod
    def _oidc_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http(s) URL without a query (https in production)")
        return value

    @field_validator("oidc_roles")
    @classmethod
    def _oidc_roles_known(cls, value: str) -> str:
        for pair in filter(None, (part.strip() for part in value.split(","))):
            _, _, role = pair.partition("=")
            if role.strip() not in ("submit", "review", "admin"):
                raise ValueError(f"{pair!r} is not `value=role` with role submit, review or admin")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        oidc = (self.oidc_issuer, self.oidc_client_id, self.oidc_client_secret)
        if any(value is not None for value in oidc) and not all(value is not None for value in oidc):
            raise ValueError("single sign-on needs oidc_issuer, oidc_client_id and oidc_client_secret together")
        if self.environment == "production" and any(
            url and not url.startswith("https://") for url in (self.oidc_issuer, self.oidc_redirect_url)
        ):
            raise ValueError("oidc_issuer and oidc_redirect_url must be https in production")
        if not self.auth and self.environment == "production":
            raise ValueError("auth=false (MODTAG_AUTH) is for development only; production requires API keys")
        if self.lease_renew_s is not None and self.lease_renew_s * 2 > self.running_lease_s:
            raise ValueError("lease_renew_s must be at most half of running_lease_s, so one missed renewal is no loss")
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError("visibility_timeout_s must be longer than job_timeout_s")
        return self

    @property
    def resolved_lease_renew_s(self) -> float:
        return self.lease_renew_s or self.running_lease_s / 4

    @property
    def resolved_worker_concurrency(self) -> int:
        """Task threads per worker: one batch computes, the next is fetched and decoded, and a batch of threads is
        kept for interactive jobs while bulk ones hold the rest."""
        return self.worker_concurrency or 3 * self.batch_max_images

    def resolved_worker_bulk_held(self, concurrency: int) -> int:
        """Bulk jobs a worker with `concurrency` task threads holds: all but a batch of them, and at least half."""
        return self.worker_bulk_held or max(concurrency - self.batch_max_images, (concurrency + 1) // 2)

    @property
    def resolved_worker_decoded_bytes(self) -> int:
        if self.worker_decoded_bytes is not None:
            return self.worker_decoded_bytes
        return round(self.worker_decoded_megapixels * 1_000_000 * 3)  # the deprecated setting, as RGB

    @property
    def resolved_visibility_timeout_s(self) -> int:
        # The lease, not Redis, is what brings a dead worker's jobs back; the visibility timeout only has to
        # outlast a job that runs to its time limit and the leases around it, so a live job is not redelivered.
        return self.visibility_timeout_s or self.job_timeout_s + 2 * self.running_lease_s

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'modtag.db').resolve()}"

    @property
    def resolved_worker_metrics_host(self) -> str:
        return self.worker_metrics_host or self.api_host

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or self.resolved_blob_dir.as_uri()

    @property
    def resolved_int8_stages(self) -> tuple[str, ...] | None:
        """`int8_stages` as names; None where unset (the engine's default)."""
        if self.int8_stages is None:
            return None
        return tuple(stage for stage in (part.strip() for part in self.int8_stages.split(",")) if stage)

    @property
    def resolved_models_cache_dir(self) -> Path:
        return (self.models_cache_dir or self.data_dir / "models").resolve()


def default_data_dir() -> Path:
    """The platform's per-user data directory (`~/.local/share/modtag` on Linux): the same whatever the cwd."""
    import platformdirs

    return Path(platformdirs.user_data_dir("modtag", appauthor=False))


def prepare_data_dir(settings: Settings) -> Path:
    """The data directory, created if missing, readable by its owner only (0700): it holds the keys' database."""
    path = settings.data_dir.resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Raises ConfigError naming each bad variable."""
    return load_settings()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with `overrides` (command-line flags) above it; ConfigError naming each bad one."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"MODTAG_{'__'.join(str(p) for p in err['loc']).upper() or '?'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}", code="settings_invalid") from None
