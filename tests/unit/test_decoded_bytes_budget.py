"""The worker's budget in bytes of decoded pixels (worker/pixels.py): mode-aware sizes, settling after decode,
freed memory handed back when it goes idle, and the deprecated megapixel setting read as RGB bytes."""

from __future__ import annotations

import io
import threading

from PIL import Image

from core.images import ImageLimits, decode_image
from core.settings import Settings
from tests.support.waiting import wait_for
from worker.pixels import PixelBudget, decode_peak_bytes, pixel_bytes


def test_pixel_bytes_follow_pillow_storage_by_mode() -> None:
    assert pixel_bytes(10, 10, "L") == 100
    assert pixel_bytes(10, 10, "I;16") == 200
    assert pixel_bytes(10, 10, "RGB") == 400  # Pillow pads RGB to 32 bits
    assert pixel_bytes(10, 10, "RGBA") == pixel_bytes(10, 10, "F") == 400
    assert decode_peak_bytes(10, 10) == 800


def test_a_decoded_image_settles_to_its_rgb_bytes_and_lets_a_waiting_job_in() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (200, 100), (1, 2, 3, 4)).save(buffer, "PNG")
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_side=1000, min_side=8)
    budget = PixelBudget(decode_peak_bytes(200, 100), on_idle=lambda: None)
    second_in = threading.Event()
    with budget.hold(decode_peak_bytes(200, 100), timeout_s=5) as held:
        waiter = threading.Thread(target=lambda: _hold(budget, 80_000, second_in))
        waiter.start()
        wait_for(lambda: budget.waiting == 1, 10, "the second job waiting")
        image = decode_image(buffer.getvalue(), limits)
        held.settle(pixel_bytes(image.width, image.height, image.mode))
        assert held.held == 200 * 100 * 4
        assert second_in.wait(10)  # the decode's spare bytes went back at once
    waiter.join(10)
    assert budget.held == 0


def test_freed_memory_is_handed_back_when_the_budget_goes_idle() -> None:
    idle: list[int] = []
    budget = PixelBudget(1000, on_idle=lambda: idle.append(budget.held))
    with budget.hold(600, timeout_s=1):
        with budget.hold(300, timeout_s=1):
            pass
        assert idle == []  # still holding: nothing to give back yet
    assert idle == [0]


def test_the_budget_setting_is_bytes_and_the_deprecated_megapixels_read_as_rgb() -> None:
    assert Settings(_env_file=None, worker_decoded_bytes=123).resolved_worker_decoded_bytes == 123
    assert Settings(_env_file=None, worker_decoded_megapixels=10).resolved_worker_decoded_bytes == 30_000_000
    assert Settings(_env_file=None).resolved_worker_decoded_bytes == 960_000_000


def _hold(budget: PixelBudget, size: int, entered: threading.Event) -> None:
    with budget.hold(size, timeout_s=10):
        entered.set()
