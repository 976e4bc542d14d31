"""`modtag bench --peers`: the batch-1 and text rows beside the peers, the GPU's vision share, and a GPU asked
for where there is none."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from modtag.bench import peers
from modtag.bench.gpu import format_vision_share, vision_share
from modtag.cli import EXIT_ERROR, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif("openvino" not in peers.installed_peers(), reason="OpenVINO is not installed (modtag[peers])")
def test_batch_one_and_the_packed_text_row_run_beside_openvino(tiny_models_dir: Path) -> None:
    result = peers.peers_bench("tiny-random", tiny_models_dir.parent, "cpu", 2, 1, lambda _: None)
    assert "openvino" not in result["errors"], result["errors"]
    assert {"modtag float32", "openvino float32"} <= set(result["ms_per_image_batch1"])
    row = result["text_row"]
    # The bench's 16 texts in one packed row, each with its [CLS] and [SEP].
    assert row["texts"] == 16 and row["tokens"] > 2 * 16
    assert set(row["ms"]) == {"modtag float32", "openvino float32"}
    assert all(ms > 0 for ms in [*result["ms_per_image_batch1"].values(), *row["ms"].values()])
    lines = peers.format_peers(result)
    assert any(line.startswith("vision stage, ms per image at batch 1") for line in lines)
    assert any(line.startswith("match text encoder, ms per packed row (16 texts") for line in lines)


def test_the_vision_share_of_the_peak_is_computed_from_counted_flops(tiny_models_dir: Path) -> None:
    # What `--peers` reports on CUDA, run on the CPU: the arithmetic is the device's, not the GPU's.
    share = vision_share("tiny-random", tiny_models_dir.parent, torch.device("cpu"), 2, 1, lambda _: None)
    assert share["gpu"] is False and share["peak_flops"] > 0 and share["flops_per_image"] > 0
    assert set(share["batches"]) == {"1", "2", "8"}
    for batch, row in share["batches"].items():
        assert row["images_per_s"] == pytest.approx(1000 / row["ms_per_image"])
        assert row["fraction_of_peak"] == pytest.approx(
            share["flops_per_image"] * row["images_per_s"] / share["peak_flops"]
        ), batch
    assert share["meets_target"] is (share["batches"]["8"]["fraction_of_peak"] >= share["target_fraction_of_peak"])
    lines = format_vision_share(share)
    assert len(lines) == 4 and "of peak" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_bench_on_cuda_without_cuda_is_one_line_and_exit_status_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--device", "cuda", "--json", "--no-progress"]) == EXIT_ERROR == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "modtag: device 'cuda' asked for but CUDA is not available here [device_unavailable]"
    ]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks a machine without an NVIDIA driver")
def test_make_bench_gpu_without_a_gpu_stops_first_with_its_exit_status(tmp_path: Path) -> None:
    # The real target and script: without nvidia-smi they stop before creating a venv or installing anything.
    venv = tmp_path / "venv-gpu"
    make = shutil.which("make")
    command = [make, "-s", "bench-gpu"] if make else [str(ROOT / "deploy" / "gpu" / "bench-gpu.sh")]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "VENV": str(venv)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "[gpu_missing]" in result.stderr and not venv.exists()
