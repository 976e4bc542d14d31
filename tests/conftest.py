"""Fixtures every layer may use, defined in tests/support/ and registered here (see tests/support/__init__.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.support.models import models_cache, tiny_models_dir
from tests.support.s3 import s3_bucket, s3_endpoint
from tests.support.servers import database_url, empty_database_url, postgres_url, redis_server, redis_url

__all__ = [
    "database_url",
    "empty_database_url",
    "models_cache",
    "postgres_url",
    "redis_server",
    "redis_url",
    "s3_bucket",
    "s3_endpoint",
    "tiny_models_dir",
]
