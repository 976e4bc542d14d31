"""`modtag bench` on tiny random models: the report's keys, parity and FLOP figures, the command line.

No timing assertions: only that the figures are present, consistent and measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional

from core.errors import ConfigError
from modtag import bench
from modtag.bench import BenchOptions, count_flops, format_report, run_bench
from modtag.cli import main
from worker.engine import ImageOutput
from worker.linear import install_packed_linear

# The keys the issue promises to scripts comparing runs.
REQUIRED_KEYS = [
    "baseline.images_per_s",
    "engine_fp32.images_per_s",
    "engine_fast.images_per_s",
    "engine_fast.dtype",
    "speedup_fp32",
    "speedup_fast",
    "parity.max_abs_score_diff_fp32",
    "parity.caption_token_agreement_fp32",
    "parity.max_abs_score_diff_fast",
    "flops_per_image",
    "peak_flops_fast",
    "fraction_of_peak_fast",
]


def _get(report: dict[str, Any], dotted: str) -> Any:
    value: Any = report
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def report(tiny_models_dir: Path) -> dict[str, Any]:
    options = BenchOptions(
        cache_dir=tiny_models_dir.parent,
        models="tiny-random",
        images=3,
        baseline_images=2,
        batch_size=2,
        repeat=1,
        progress=False,
        peak_size=256,
    )
    return run_bench(options)


def test_report_has_every_promised_figure(report: dict[str, Any]) -> None:
    for key in REQUIRED_KEYS:
        value = _get(report, key)
        assert value is not None, key
        if key != "engine_fast.dtype":
            assert isinstance(value, float), key
            assert value >= 0 if key.startswith("parity.") else value > 0, key
    assert report["workload"] == {
        "images": 3,
        "photos": ["astronaut", "chelsea", "coffee"],
        "probes": 8,
        "texts": 16,
        "caption_tokens": 20,
        "models": "tiny-random",
    }
    assert report["engine_fast"]["dtype"] in ("bfloat16", "float32")
    json.dumps(report)  # plain JSON all the way down


def test_parity_and_ratios_are_consistent(report: dict[str, Any]) -> None:
    parity = report["parity"]
    # The baseline ran on the first 2 images only; parity compares those, speed is per image.
    assert report["baseline"]["images"] == 2 and parity["compared_images"] == 2
    assert parity["max_abs_score_diff_fp32"] <= 1e-4
    assert parity["caption_token_agreement_fp32"] == 1.0
    assert 0.0 <= parity["caption_token_agreement_fast"] <= 1.0
    assert report["targets"]["parity_fp32"] is True
    assert report["speedup_fp32"] == pytest.approx(
        report["engine_fp32"]["images_per_s"] / report["baseline"]["images_per_s"]
    )
    assert report["fraction_of_peak_fast"] == pytest.approx(
        report["flops_per_image"] * report["engine_fast"]["images_per_s"] / report["peak_flops_fast"]
    )
    assert len(report["engine_fp32"]["runs_s"]) == 1
    assert set(report["engine_fp32"]["stages_s"]) >= {"vision", "caption", "probes", "matches"}
    text = format_report(report)
    assert "the baseline ran on the first 2 of 3 images" in text
    assert "speedup" in text and "GFLOP" in text


def test_flops_per_image_counts_the_engines_matrix_products(report: dict[str, Any]) -> None:
    # Tiny models: per image at least the three vision encoders' linear layers (2 layers of
    # 4 x 32 x 32 attention projections + 2 x 32 x 64 MLP, over 17 tokens) and the caption's
    # 20 decoder steps; far less than the base size.
    vision = 3 * 2 * 17 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert vision < report["flops_per_image"] < 1e9


def test_count_flops_counts_matmuls_and_cpu_attention() -> None:
    left, right = torch.randn(16, 32), torch.randn(32, 8)
    flops, product = count_flops(lambda: left @ right)
    assert flops == 2 * 16 * 32 * 8
    assert torch.equal(product, left @ right)  # type: ignore[arg-type]
    query, key, value = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    flops, _ = count_flops(lambda: functional.scaled_dot_product_attention(query, key, value))
    assert flops == 2 * (2 * 2 * 3 * 5 * 7 * 8)  # two products of (5 x 8) by (8 x 7) per head
    layer = torch.nn.Linear(32, 16)
    assert install_packed_linear(layer) == 1  # the engine's linear layers on CPUs
    with torch.inference_mode():
        flops, _ = count_flops(lambda: layer(torch.randn(3, 5, 32)))
    assert flops == 2 * 15 * 32 * 16


def test_parity_measures() -> None:
    def output(probes: dict[str, float], ids: tuple[int, ...]) -> ImageOutput:
        return ImageOutput(caption="", probes=probes, matches={"t": 0.5}, timings={}, caption_ids=ids)

    reference = [output({"q": 0.25}, (1, 2, 3, 4)), output({"q": 0.5}, (5, 6))]
    other = [output({"q": 0.75}, (1, 2, 9, 4)), output({"q": 0.5}, (5, 6, 7))]
    assert bench.max_score_diff(other, reference) == 0.5
    assert bench.mean_score_diff(other, reference) == pytest.approx(0.5 / 4)
    # 3 of 4 positions, then 2 of 3 (a longer caption counts its extra tokens as different).
    assert bench.caption_agreement(other, reference) == pytest.approx(5 / 7)
    assert bench.caption_agreement([], []) == 1.0


def test_workload_is_fixed_and_cycles_photos() -> None:
    requests = bench.workload(10)
    assert len(requests) == 10
    assert all(r.caption and tuple(r.probes) == bench.PROBES and tuple(r.texts) == bench.TEXTS for r in requests)
    assert len(set(bench.PROBES)) == 8 and len(set(bench.TEXTS)) == 16
    assert requests[8].image is requests[0].image
    assert all(r.image.mode == "RGB" for r in requests)
    assert len({r.image.tobytes()[:4096] for r in requests[:8]}) == 8  # eight different photos


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        run_bench(BenchOptions(cache_dir=tmp_path, images=0))
    assert error.value.code == "bench_invalid"
    with pytest.raises(ConfigError):
        run_bench(BenchOptions(cache_dir=tmp_path, baseline_images=0))
    with pytest.raises(SystemExit):
        main(["bench", "--images", "0"])


def test_command_prints_only_json(
    tiny_models_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype, size=None, reps=5: 1e9)
    code = main(
        [
            "bench",
            "--models",
            "tiny-random",
            "--models-cache",
            str(tiny_models_dir.parent),
            "--images",
            "2",
            "--skip-baseline",
            "--repeat",
            "1",
            "--dtype",
            "float32",
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["baseline"] is None and printed["speedup_fp32"] is None
    assert printed["parity"]["max_abs_score_diff_fp32"] is None
    assert printed["engine_fast"]["dtype"] == "float32"
    assert printed["parity"]["max_abs_score_diff_fast"] == 0.0  # the fp32 run is the fast run
    assert printed["peak_flops_fast"] == 1e9
    assert printed["targets"]["speedup_fast"] is None
