"""Checks run before starting workers, so a missing model fails in seconds with what to do about it."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from core.errors import ModelError


def check_models_reachable(models: str, timeout_s: float = 5.0) -> None:
    """For hub presets (base, large): every weight is in the local cache, or the hub answers.

    Without this, a worker on a machine with no internet spends minutes in huggingface_hub's retries
    before reporting what is wrong.
    """
    from worker.families.blip.presets import MODEL_PRESETS

    if models not in MODEL_PRESETS:
        return  # random presets are built locally; directories are checked by the loader
    missing = [repo for repo in MODEL_PRESETS[models].values() if not _cached(repo)]
    if not missing or _hub_reachable(timeout_s):
        return
    listed = ", ".join(missing)
    raise ModelError(
        f"the {models!r} models are not in the Hugging Face cache and the hub cannot be reached from this "
        f"machine: {listed}. Download them on a machine with internet (`hf download <id>`) and "
        f"copy the cache (HF_HOME), or point MODTAG_MODELS at a directory with caption/, vqa/ and itm/ "
        f"folders; to try modtag offline run with MODTAG_MODELS=tiny-random (random weights, meaningless "
        f"verdicts)",
        code="model_unavailable",
    )


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _hub_reachable(timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
