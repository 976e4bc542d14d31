"""The one settings object, read from `MODTAG_*` environment variables (and an optional `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

MODEL_PRESETS = ("base", "large", "tiny-random", "random-base")


class Settings(BaseSettings):
    """Everything an operator can set. Defaults run the whole stack on one machine."""

    model_config = SettingsConfigDict(env_prefix="MODTAG_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(default=Path(".modtag"), description="Where the SQLite file and blobs live.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")
    redis_url: str = "redis://localhost:6379/0"
    blob_dir: Path | None = Field(default=None, description="Image store; default data_dir/blobs.")
    policies_dir: Path | None = Field(default=None, description="Extra policy YAML files beside the built-ins.")

    # Models: a preset (base, large, tiny-random, random-base) or a directory of three model folders.
    models: str = "base"
    models_cache_dir: Path | None = Field(default=None, description="Where built random models are kept.")
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int = Field(default=0, ge=0, description="0: torch's default.")

    # Limits on inputs.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_side: int = Field(default=16_384, gt=0)
    min_image_side: int = Field(default=8, gt=0)
    max_context_bytes: int = Field(default=64 * 1024, gt=0)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    fetch_allow_private: bool = Field(default=False, description="Allow image_url on loopback/private nets.")

    # Jobs and queues.
    job_timeout_s: int = Field(default=300, gt=0, description="Hard limit for one job in the worker.")
    visibility_timeout_s: int = Field(default=3600, gt=0)
    running_lease_s: int = Field(default=900, gt=0, description="A running job older than this is retried.")
    queued_grace_s: int = Field(default=60, gt=0, description="A queued job older than this is re-enqueued.")
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, gt=0)
    batch_max_images: int = Field(default=8, gt=0)
    batch_wait_ms: int = Field(default=20, ge=0)

    # Processes.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535, description="0 disables it.")

    @field_validator("models")
    @classmethod
    def _models_known(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be a preset (base, large, tiny-random, random-base) or a directory")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.running_lease_s <= self.job_timeout_s:
            raise ValueError("running_lease_s must be longer than job_timeout_s")
        if self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError("visibility_timeout_s must be longer than job_timeout_s")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'modtag.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    @property
    def resolved_models_cache_dir(self) -> Path:
        return (self.models_cache_dir or self.data_dir / "models").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Raises ConfigError naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"MODTAG_{'__'.join(str(p) for p in err['loc']).upper() or '?'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}", code="settings_invalid") from None
