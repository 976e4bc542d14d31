"""The vision stage's share of the device's matrix-product peak: what `modtag bench --peers` reports on CUDA.

OpenVINO and ONNX Runtime are compared on CPUs only (`peers.py`); on a GPU the yardstick is the card itself.
The caption model's vision encoder, as the engine runs it (SDPA attention, the fast dtype: bf16 on Ampere and
newer), is timed on batches of 1, the bench's batch size and four times that, and each batch's FLOP/s is
divided by a square product's at the same dtype on the same device (`matmul_peak`: 8192 square on CUDA).
timm's ViT-B/16 reaches about 60% of an RTX 4090's bf16 peak; the goal here is the same.
Written for any device so that its arithmetic runs in the CPU-only tests too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.families.blip.engine import Engine
from worker.families.blip.models import fast_dtype, load_models

TARGET_FRACTION_OF_PEAK = 0.6  # of the fast dtype's peak, at the largest batch timed
CALLS_PER_TIMING = 5  # one GPU call of a small batch is launch-bound: several per timing


def vision_share(
    models: str, cache_dir: Path, device: torch.device, batch_size: int, repeat: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """ms per image, images/s and share of the fast dtype's matrix-product peak of the vision encoder, per batch."""
    from modtag.bench.common import dtype_name, photos, sync
    from modtag.bench.engine import count_flops, matmul_peak

    dtype = fast_dtype(device)
    log(f"vision stage on {device}: loading {models} at {dtype_name(dtype)}")
    loaded = load_models(models, {"caption"}, cache_dir=cache_dir, device=str(device), dtype=dtype_name(dtype))
    Engine(loaded)  # installs its attention and linear layers on this model instance
    encoder: nn.Module = loaded.get("caption").model.vision_model  # type: ignore[assignment]
    processor = loaded.get("caption").processor
    batches = sorted({1, batch_size, 4 * batch_size})
    pixels = processor(images=photos(max(batches)), return_tensors="pt")["pixel_values"].to(device, dtype)
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        flops_per_image, _ = count_flops(lambda: encoder(pixel_values=pixels[:1]))
        log(f"vision stage on {device}: matrix-product peak")
        peak = matmul_peak(device, dtype)
        for batch in batches:
            log(f"vision stage on {device}: batch {batch}")
            inputs = pixels[:batch]

            def run(inputs: torch.Tensor = inputs) -> object:
                return encoder(pixel_values=inputs).last_hidden_state

            run()  # warm-up: kernels chosen, memory pooled
            sync(device)
            seconds = []
            for _ in range(max(repeat, 3)):
                started = time.perf_counter()
                for _ in range(CALLS_PER_TIMING):
                    run()
                sync(device)
                seconds.append((time.perf_counter() - started) / CALLS_PER_TIMING)
            per_call = statistics.median(seconds)
            rows[str(batch)] = {
                "ms_per_image": per_call * 1000 / batch,
                "images_per_s": batch / per_call,
                "fraction_of_peak": flops_per_image * batch / per_call / peak,
            }
    largest = rows[str(max(batches))]["fraction_of_peak"]
    return {
        "gpu": device.type == "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": dtype_name(dtype),
        "flops_per_image": flops_per_image,
        "peak_flops": peak,
        "batches": rows,
        "target_fraction_of_peak": TARGET_FRACTION_OF_PEAK,
        "meets_target": largest >= TARGET_FRACTION_OF_PEAK,
        "ms_per_image": {},  # no peer runtimes on this device
    }


def format_vision_share(share: dict[str, Any]) -> list[str]:
    """The report's lines for the vision stage on a GPU."""
    lines = [
        f"vision stage on {share['device']} at {share['dtype']} (peak {share['peak_flops'] / 1e12:.1f} TFLOP/s, "
        f"{share['flops_per_image'] / 1e9:.0f} GFLOP per image; goal {share['target_fraction_of_peak']:.0%} of peak):"
    ]
    for batch, row in share["batches"].items():
        lines.append(
            f"  batch {batch:>3}: {row['ms_per_image']:7.2f} ms per image, {row['images_per_s']:8.1f} images/s, "
            f"{row['fraction_of_peak']:.0%} of peak"
        )
    return lines
