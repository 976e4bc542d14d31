"""A worker's memory after a burst of large images: through real processes (`modtag api`, `modtag worker` with tiny
random models, Redis and a database), the worker's resident set read from /proc (Linux only)."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image

from modtag.memory import process_memory_mb
from tests.support.deployment import Deployment, submit, wait_final
from tests.support.photos import photo_image
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

BURST = 4  # large PNGs submitted at once
SIDE = (3000, 2000)  # 6 MP each: 24 MB of RGB as Pillow holds it


def large_png(variant: int) -> bytes:
    """A 12 MP PNG of a real photo, made distinct by one pixel (no decision reuse between them)."""
    image = photo_image("astronaut").resize(SIDE, Image.Resampling.BILINEAR)
    image.putpixel((variant, 0), (variant, 255 - variant, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_a_workers_memory_returns_near_its_idle_figure_after_a_burst_of_large_images(deployment: Deployment) -> None:
    """Old code: a burst of large PNGs took a worker from 0.94 to 7.3 GB and it stayed at 6.3 GB (decoded pixels
    counted as megapixels, at a third of what Pillow holds, and freed memory kept in malloc's arenas)."""
    deployment.start_api()
    worker = deployment.start_worker(MODTAG_WORKER_DECODED_BYTES=str(120 * 1024 * 1024))
    bursts = [large_png(variant) for variant in range(BURST + 1)]
    # The first large image warms every path a large image takes (decode, resize, hashes) before the idle figure.
    assert wait_final(deployment, submit(deployment, bursts[0], "warm.png")["id"], 300)["status"] == "done"
    idle = process_memory_mb(worker.pid)["VmRSS"]
    ids = [submit(deployment, data, f"{variant}.png")["id"] for variant, data in enumerate(bursts[1:], 1)]
    final = [wait_final(deployment, job_id, 300) for job_id in ids]
    assert [job["status"] for job in final] == ["done"] * BURST, [job.get("error") for job in final]
    peak = process_memory_mb(worker.pid)["VmHWM"]
    assert peak > idle + 50, (idle, peak)  # the burst held large images: there was something to give back
    seen: list[float] = []

    def settled() -> float | None:
        seen.append(process_memory_mb(worker.pid)["VmRSS"])
        return seen[-1] if seen[-1] <= idle * 1.2 else None

    try:
        wait_for(settled, 60, "the RSS back within 20 % of idle")
    except AssertionError as missed:
        raise AssertionError(f"{missed}: idle {idle:.0f} MB, peak {peak:.0f} MB, last {seen[-3:]} MB") from None
    print(f"\nworker RSS: idle {idle:.0f} MB, peak {peak:.0f} MB, after the burst {seen[-1]:.0f} MB")
