"""`modtag bench --through-stack`: jobs/s through API -> Redis -> worker -> database against the engine alone.

The stack is `modtag.stack.Stack` on settings built here (its children get them as their environment;
this process's own is never changed), and the jobs go through `modtag.client.ApiClient`.
"""

from __future__ import annotations

import gc
import io
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from core.errors import ConfigError
from core.settings import Settings
from modtag.bench.common import PHOTOS, BenchOptions, dtype_name, jpeg, photos
from modtag.client import ApiClient
from modtag.servers import free_port
from modtag.stack import Stack
from worker.families.blip.engine import Engine
from worker.families.blip.models import load_models


def through_stack(options: BenchOptions, dtype: torch.dtype | str, log: Callable[[str], None]) -> dict[str, Any]:
    """Jobs/s through the embedded stack (API, Redis, one worker, SQLite) against the engine alone.

    Both run the built-in moderation policy's checks on the same JPEG-encoded photos, at `dtype`, with
    the worker's engine settings and batches of `options.batch_size`.
    """
    from policies import load_policies
    from worker.families.blip import roles_for
    from worker.families.blip.adapter import image_request

    needs = load_policies([])["moderation"].requirements()
    encoded = [jpeg(image) for image in photos(options.stack_jobs)]
    # What the worker computes for each job, from the same decoded JPEG files.
    requests = [image_request(Image.open(io.BytesIO(data)).convert("RGB"), needs) for data in encoded]
    roles = roles_for(needs.capabilities)

    log(f"engine alone, moderation policy, {dtype_name(dtype)}")
    loaded = load_models(
        options.models, roles, cache_dir=options.cache_dir, device=options.device, dtype=dtype_name(dtype)
    )
    engine = Engine(loaded, max_batch=options.batch_size)
    engine.run(requests[: options.batch_size])  # warm-up, as the stack's worker gets below
    started = time.perf_counter()
    for start in range(0, len(requests), options.batch_size):
        engine.run(requests[start : start + options.batch_size])
    engine_seconds = time.perf_counter() - started
    del engine, loaded
    gc.collect()

    log("through the stack: starting API, Redis and a worker")
    with tempfile.TemporaryDirectory(prefix="modtag-bench-") as tmp:
        root = Path(tmp)
        files = []
        for index, data in enumerate(encoded):
            path = root / "photos" / f"{index:03d}-{PHOTOS[index % len(PHOTOS)]}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        settings = stack_settings(options, dtype, root / "data", metrics_port=free_port())
        stack_seconds, done, failed, profile, moderate_now = _run_stack(settings, files, log, options.progress)
    return {
        "policy": "moderation",
        "dtype": dtype_name(dtype),
        "jobs": len(files),
        "done": done,
        "failed": failed,
        "seconds": stack_seconds,
        "jobs_per_s": done / stack_seconds,
        "engine_images_per_s": len(requests) / engine_seconds,
        "ratio": (done / stack_seconds) / (len(requests) / engine_seconds),
        "checks_per_image": {"caption": needs.caption, "probes": len(needs.probes), "texts": len(needs.texts)},
        "engine_batches": math.ceil(len(requests) / options.batch_size),
        "profile": profile,
        "moderate_now": moderate_now,
    }


def stack_settings(options: BenchOptions, dtype: torch.dtype | str, data_dir: Path, *, metrics_port: int) -> Settings:
    """The settings of the bench's stack: its own data directory and SQLite database, the bench's models and batches.

    Given as arguments and never written to this process's environment; no `.env` file is read, so the
    user's installation reaches the stack only through MODTAG_* variables of fields not given here.
    """
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'modtag.db'}",
        models=options.models,
        models_cache_dir=options.cache_dir,
        device=options.device,
        dtype=dtype_name(dtype),
        batch_max_images=options.batch_size,
        # Scraped before and after the timed jobs: where the stack's time went (see stack_profile).
        worker_metrics_port=metrics_port,
        torch_threads=options.threads or 0,
        # The jobs repeat the workload's photos: reusing an earlier identical upload's decision would time
        # the database, not the models, so every job here runs them.
        reuse_decisions=False,
    )


def _run_stack(
    settings: Settings, files: list[Path], log: Callable[[str], None], progress: bool
) -> tuple[float, int, int, dict[str, Any], dict[str, Any]]:
    stack = Stack(settings, embedded_redis=True, port=free_port(), workers=1, temporary_key=True, quiet=True)
    with (
        stack,
        ApiClient(stack.api_url, key=stack.admin_key) as api,
        ApiClient(f"http://127.0.0.1:{settings.worker_metrics_port}", timeout_s=10) as worker,
    ):
        # One job first: the worker's first batch pays one-time costs the engine's warm-up paid too.
        _judge(api, files[:1], progress=False)
        before = worker.metrics()
        log(f"through the stack: {len(files)} jobs")
        started = time.perf_counter()
        statuses = _judge(api, files, progress=progress)
        seconds = time.perf_counter() - started
        after = worker.metrics()
        log(f"through the stack: {MODERATE_NOW_CALLS} moderate-now calls (Prefer: wait) on the idle worker")
        moderate_now = moderate_now_latency(api, files[:MODERATE_NOW_CALLS])
    done = statuses.count("done")
    return seconds, done, len(statuses) - done, stack_profile(before, after, seconds), moderate_now


MODERATE_NOW_CALLS = 20
MODERATE_NOW_WAIT_S = 30


def moderate_now_latency(api: ApiClient, files: list[Path]) -> dict[str, Any]:
    """One `Prefer: wait` submission at a time on an idle worker: seconds from sending the upload to holding its
    decision (p50, p99 over the calls), and how many were decided within the wait (200) rather than 202."""
    seconds: list[float] = []
    decided = 0
    for path in files:
        started = time.perf_counter()
        reply = api.submit_job(
            path, filename=path.name, mime="image/jpeg", policy="moderation", wait_s=MODERATE_NOW_WAIT_S
        )
        seconds.append(time.perf_counter() - started)
        decided += reply.status == 200 and reply.body.get("status") == "done"
    ordered = sorted(seconds)
    return {
        "calls": len(seconds),
        "decided_in_time": decided,
        "p50_s": _quantile(ordered, 0.50),
        "p99_s": _quantile(ordered, 0.99),
        "max_s": ordered[-1] if ordered else None,
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank quantile of sorted values (the slowest call for p99 of fewer than 100)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def stack_profile(before: str, after: str, seconds: float) -> dict[str, Any]:
    """Where a through-stack run's `seconds` went, from the worker's /metrics scraped before and after it.

    `engine_busy_s` is the model compute of every batch; the rest of the wall time the engine waited
    (for jobs to arrive, be fetched and decoded, or for the CPU). `engine_images_per_s_in_stack` is the
    engine's own speed inside the stack: below the engine-alone figure when batches leave partly full
    or other processes take the cores.
    """
    delta = _metric_sums(after)
    for key, value in _metric_sums(before).items():
        delta[key] = delta.get(key, 0.0) - value
    batches = delta.get(("modtag_batch_size_images_count", ""), 0.0)
    images = delta.get(("modtag_batch_size_images_sum", ""), 0.0)
    busy = sum(value for (name, _), value in delta.items() if name == "modtag_model_inference_seconds_sum")
    jobs = delta.get(("modtag_stage_duration_seconds_count", "decode"), 0.0)
    stages = {
        stage: delta.get(("modtag_stage_duration_seconds_sum", stage), 0.0) / jobs if jobs else None
        for stage in ("fetch", "decode", "evaluate", "store")
    }
    return {
        "batches": int(batches),
        "mean_batch_images": images / batches if batches else None,
        "engine_busy_s": busy,
        "engine_busy_share": busy / seconds if seconds else None,
        "engine_images_per_s_in_stack": images / busy if busy else None,
        "worker_s_per_job": stages,
    }


def _metric_sums(exposition: str) -> dict[tuple[str, str], float]:
    """(sample name, stage label) -> value summed over the other labels, for the samples stack_profile reads."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                key = (sample.name, sample.labels.get("stage", "") if "stage_duration" in sample.name else "")
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def _judge(api: ApiClient, files: list[Path], *, progress: bool, timeout_s: float = 1800) -> list[str]:
    """Submit every file, then wait for each job's final status; the statuses in the order sent."""
    ids = []
    for path in files:
        reply = api.submit_job(path, filename=path.name, mime="image/jpeg", policy="moderation")
        if not reply.accepted:
            raise ConfigError(
                f"the bench's stack refused a job ({reply.status}: {str(reply.body)[:200]})", code="bench_stack_failed"
            )
        ids.append(str(reply.body["id"]))
    with tqdm(total=len(ids), desc="through the stack", unit="job", disable=not progress, leave=False) as bar:
        final = api.wait_jobs(ids, timeout_s=timeout_s, on_final=lambda _: bar.update(1))
    late = [job_id for job_id in ids if job_id not in final]
    if late:
        raise ConfigError(
            f"the bench's stack did not finish job {late[0]} within {timeout_s:.0f}s", code="bench_stack_failed"
        )
    return [str(final[job_id].get("status")) for job_id in ids]
