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
from modtag.bench import BenchOptions, count_flops, format_report, peers, run_bench
from modtag.bench import engine as bench
from modtag.bench.common import INT8_CAPTION_AGREEMENT, INT8_SCORE_DRIFT, MATRIX_FLAGS
from modtag.bench.precision import run_precision_bench
from modtag.cli import main
from worker.families.blip.engine import INT8_STAGES, ImageOutput
from worker.families.blip.linear import install_packed_linear
from worker.families.blip.models import fast_dtype
from worker.families.blip.quant import int8_linear_available

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
    "parity.max_abs_match_diff_fast",
    "parity.max_abs_vision_diff_fast",
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


@pytest.mark.slow
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
    # The machine, so that figures from different CPUs read side by side: this one's family and matrix flags.
    machine = report["machine"]
    assert machine["cpu_family"].count("family") == 1 and set(machine["matrix_flags"]) <= set(MATRIX_FLAGS)
    assert machine["cpu_family"] in format_report(report)
    json.dumps(report)  # plain JSON all the way down


@pytest.mark.slow
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


@pytest.mark.slow
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
        # The residual-fused overload (worker/families/blip/linear.py) counts the same product.
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, 4096)
        inputs, residual = torch.randn(3, 5, 32), torch.randn(3, 5, 16)
        flops, _ = count_flops(
            lambda: torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, packed, layer.bias, "add")
        )
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


@pytest.mark.slow
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
    assert printed["parity"]["max_abs_vision_diff_fast"] == 0.0
    assert printed["peak_flops_fast"] == 1e9
    assert printed["targets"]["speedup_fast"] is None
    assert printed["peers"] is None  # only with --peers


@pytest.fixture(scope="module")
def tags_report(tiny_models_dir: Path) -> dict[str, Any]:
    options = BenchOptions(
        cache_dir=tiny_models_dir.parent,
        models="tiny-random",
        dtype="float32",  # the parity of shortlisted and naive scores is exact at float32
        images=3,
        naive_images=2,
        batch_size=2,
        repeat=2,
        progress=False,
        tags=True,
    )
    return run_bench(options)


@pytest.mark.slow
def test_tags_report_has_every_cost(tags_report: dict[str, Any]) -> None:
    assert "baseline" not in tags_report and "engine_fast" not in tags_report  # no 3-minute baseline
    assert tags_report["workload"]["photos"] == ["astronaut", "chelsea", "coffee"]
    assert tags_report["machine"]["load_average_after"] is not None
    tags = tags_report["tags"]
    # The built-in tagging policy: every tag of the product taxonomy, ITM on the top 5 of each group.
    assert (tags["policy"], tags["taxonomy"], tags["top_k"], tags["dtype"]) == ("tagging", "product", 5, "float32")
    assert tags["texts"] == 561 and tags["groups"] == 4 and tags["itm_texts_per_image"] == 20
    features = tags["text_features"]
    assert features["texts"] == 561 and len(features["runs_s"]) == 2
    assert features["seconds"] == min(features["runs_s"]) > 0
    assert tags["vision_itm"]["seconds_per_image"] > 0 and tags["vision_itm"]["preprocess_seconds_per_image"] > 0
    check = tags["tags_check"]
    assert check["images"] == 3 and len(check["runs_s"]) == 2
    assert check["seconds_per_image"] == pytest.approx(min(check["runs_s"]) / 3)
    assert check["itc_seconds_per_image"] > 0 and check["itm_seconds_per_image"] > 0
    # The engine's stage shares add up to the wall time of the runs (within the Python around them).
    assert sum(check["stages_s_per_image"].values()) <= check["seconds_per_image"] * 1.001
    assert check["stages_s_per_image"].get("caption", 0.0) == 0.0  # tags only: no caption, no VQA
    naive = tags["naive_itm_all"]
    assert naive["images"] == 2 and naive["texts"] == 561 and len(naive["runs_s"]) == 2
    assert naive["seconds_per_image"] == pytest.approx(min(naive["runs_s"]) / 2)
    assert naive["times_the_tags_check"] == pytest.approx(naive["seconds_per_image"] / check["seconds_per_image"])
    assert 0.0 <= naive["shortlist_recall"] <= 1.0
    assert naive["max_abs_score_diff"] <= 1e-4  # the re-ranked tags get the naive way's ITM scores
    colour, product = tags["attributes"]
    assert (colour["question"], colour["candidates"], colour["claimed"]) == ("what color is the item?", 20, ["red"])
    assert (product["candidates"], product["claimed"]) == (416, ["mug"])
    for attribute in (colour, product):
        assert attribute["seconds_per_image"] > attribute["beyond_vision_seconds_per_image"] > 0
        assert 1 <= attribute["answers_scored_per_image"] <= 16  # the engine's answer budget
    json.dumps(tags_report)


@pytest.mark.slow
def test_tags_report_reads_as_a_table(tags_report: dict[str, Any]) -> None:
    text = format_report(tags_report)
    for expected in (
        "modtag bench --tags: 3 photos",
        "taxonomy product, 561 tags in 4 groups, ITM on the top 5 of each (20 texts per image)",
        "text features of the 561 tags",
        "tags check: ITC over 561 tags + ITM on 20",
        "naive: ITM over all 561 tags (2 photos)",
        "attribute: what color is the item? (20 answers)",
        "attribute: what is this item? (416 answers)",
        "load average",
    ):
        assert expected in text, expected


@pytest.mark.slow
def test_tags_command_prints_json_and_refuses_mixed_runs(
    tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["bench", "--tags", "--models", "tiny-random", "--models-cache", str(tiny_models_dir.parent)]
    code = main([*common, "--images", "1", "--repeat", "1", "--json", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tags"]["tags_check"]["images"] == 1 and printed["tags"]["naive_itm_all"]["images"] == 1
    assert main([*common, "--through-stack", "--no-progress"]) != 0
    assert "separate runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--naive-images", "0"])
    with pytest.raises(ConfigError):
        run_bench(BenchOptions(cache_dir=tiny_models_dir.parent, tags=True, naive_images=0))


def test_the_stack_profile_is_the_difference_of_two_scrapes() -> None:
    from modtag.bench.through import stack_profile

    def exposition(batches: int, images: int, vision: float, probes: float, decode: float, jobs: int) -> str:
        return "\n".join(
            [
                "# TYPE modtag_batch_size_images histogram",
                f"modtag_batch_size_images_count {batches}",
                f"modtag_batch_size_images_sum {images}",
                "# TYPE modtag_model_inference_seconds histogram",
                f'modtag_model_inference_seconds_sum{{model="all",stage="vision"}} {vision}',
                f'modtag_model_inference_seconds_count{{model="all",stage="vision"}} {batches}',
                f'modtag_model_inference_seconds_sum{{model="vqa",stage="probes"}} {probes}',
                f'modtag_model_inference_seconds_count{{model="vqa",stage="probes"}} {batches}',
                "# TYPE modtag_stage_duration_seconds histogram",
                f'modtag_stage_duration_seconds_sum{{stage="decode"}} {decode}',
                f'modtag_stage_duration_seconds_count{{stage="decode"}} {jobs}',
                "",
            ]
        )

    # One warm-up job before; then 3 batches carrying 16 images, 20 s of vision and 4 s of probes.
    before = exposition(1, 1, 2.0, 0.5, 0.01, 1)
    after = exposition(4, 17, 22.0, 4.5, 0.33, 17)
    profile = stack_profile(before, after, seconds=30.0)
    assert profile["batches"] == 3
    assert profile["mean_batch_images"] == pytest.approx(16 / 3)
    assert profile["engine_busy_s"] == pytest.approx(24.0)
    assert profile["engine_busy_share"] == pytest.approx(0.8)
    assert profile["engine_images_per_s_in_stack"] == pytest.approx(16 / 24)
    assert profile["worker_s_per_job"]["decode"] == pytest.approx(0.02)
    assert profile["worker_s_per_job"]["store"] == 0.0


@pytest.mark.skipif(not int8_linear_available(), reason="this PyTorch has no oneDNN int8 linear kernels")
def test_int8_engine_is_reported_with_its_fidelity(report: dict[str, Any]) -> None:
    int8, workload = report["engine_int8"], report["int8_workload"]
    assert int8["dtype"] == "int8" and int8["images_per_s"] > 0
    assert int8["techniques"]["int8_stages"] == workload["int8_stages"]
    assert int8["calibrated_layers"] > 0  # calibrated on the bench photos: static scales
    # The whole workload, interleaved: the ratio of the medians of as many runs each.
    assert len(workload["fast_s"]) == len(workload["int8_s"]) == workload["rounds"] == 1
    assert report["speedup_int8_over_fast"] == workload["ratio_median"] > 0
    assert workload["ratio_median"] == pytest.approx(workload["fast_s"][0] / workload["int8_s"][0])
    fidelity = int8["fidelity"]
    # Close to float32 on the tiny models, not equal (measured: max 0.08, mean 0.015).
    assert 0 < fidelity["max_abs_score_diff"] < 0.3 and fidelity["mean_abs_score_diff"] < 0.05
    assert 0 < fidelity["max_abs_match_diff"] <= fidelity["max_abs_score_diff"]
    assert 0 < fidelity["max_abs_vision_diff"] < 1.0
    assert 0.0 <= fidelity["caption_token_agreement"] <= 1.0
    assert fidelity["policy"] == "moderation" and fidelity["decisions"] == 3
    assert 0.0 <= fidelity["decision_agreement"] <= 1.0 and 0.0 <= fidelity["category_agreement"] <= 1.0
    assert report["targets"]["int8_over_fast"] is (report["speedup_int8_over_fast"] >= bench.TARGET_INT8_OVER_FAST)
    assert "int8 vs fp32:" in format_report(report)
    # Held to the int8 product's own peak, measured through the same int8 layer code.
    assert report["peak_flops_int8"] > 0
    assert report["fraction_of_peak_int8"] == pytest.approx(
        report["flops_per_image"] * int8["images_per_s"] / report["peak_flops_int8"]
    )


@pytest.mark.slow
@pytest.mark.skipif(not int8_linear_available(), reason="this PyTorch has no oneDNN int8 linear kernels")
def test_each_stage_is_decided_by_its_own_timings_and_agreement(report: dict[str, Any]) -> None:
    choices = report["stage_dtypes"]
    assert list(choices) == list(INT8_STAGES)
    for stage, choice in choices.items():
        assert choice["int8_s"] > 0 and choice["fast_s"] > 0
        assert choice["int8_over_fast"] == pytest.approx(choice["fast_s"] / choice["int8_s"])
        assert choice["faster"] is (choice["int8_s"] < choice["fast_s"])
        if stage == "caption":
            agrees = choice["caption_token_agreement"] >= INT8_CAPTION_AGREEMENT
        else:
            agrees = 0 <= choice["max_abs_score_diff"] <= INT8_SCORE_DRIFT
        assert choice["keeps_agreement"] is agrees
        chosen = choice["faster"] and choice["keeps_agreement"]
        assert choice["dtype"] == ("int8" if chosen else report["engine_fast"]["dtype"])
        assert (stage in report["int8_workload"]["int8_stages"]) is chosen
    assert "max_abs_vision_diff" in choices["vision"]
    assert "the whole workload interleaved" in format_report(report)


@pytest.mark.slow
def test_each_stage_is_read_against_its_own_peak(report: dict[str, Any]) -> None:
    flops = report["stage_flops_per_image"]
    assert set(flops) >= {"vision", "caption", "probes", "matches"}
    # The stages' FLOPs are the workload's, split.
    assert sum(flops.values()) == pytest.approx(report["flops_per_image"])
    shares = report["stage_share_of_peak"]
    fast = report["engine_fast"]["dtype"]
    for stage in ("vision", "caption", "probes", "matches"):
        at_fp32 = flops[stage] * 3 / report["engine_fp32"]["stages_s"][stage] / report["peak_flops_fp32"]
        assert shares[stage]["float32"] == pytest.approx(at_fp32)
        assert 0 < shares[stage][fast] < 1.5
        if report["stage_dtypes"]:
            assert 0 < shares[stage]["int8"] < 1.5
    text = format_report(report)
    assert "share of that dtype's matrix-product peak" in text and "vision" in text


def test_without_peers_the_report_says_how_to_install_them(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runtimes that no environment has: the real import check, whatever this one has installed.
    monkeypatch.setattr(peers, "PEERS", ("modtag_no_such_runtime",))
    result = peers.peers_bench("tiny-random", tiny_models_dir.parent, "cpu", 2, 1, lambda _: None)
    assert result["ms_per_image"] == {} and result["installed"] == []
    assert peers.format_peers(result) == [peers.INSTALL_HINT]
    assert "pip install 'modtag[peers]'" in peers.INSTALL_HINT


@pytest.mark.skipif(not peers.installed_peers(), reason="neither openvino nor onnxruntime is installed (modtag[peers])")
def test_peers_time_the_same_vision_stage(tiny_models_dir: Path) -> None:
    result = peers.peers_bench("tiny-random", tiny_models_dir.parent, "cpu", 2, 1, lambda _: None)
    assert "modtag float32" in result["ms_per_image"]
    for peer in result["installed"]:
        assert peer in result["errors"] or any(name.startswith(peer) for name in result["ms_per_image"])
    assert all(ms > 0 for ms in result["ms_per_image"].values())


@pytest.mark.skipif(fast_dtype(torch.device("cpu")) == torch.float32, reason="this CPU computes no bf16")
def test_precision_command_compares_plain_and_mixed_bf16(
    tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["bench", "--precision", "--models", "tiny-random", "--models-cache", str(tiny_models_dir.parent)]
    assert main([*common, "--images", "2", "--repeat", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    text, _, printed = out.partition("\n\n")
    report = json.loads(printed)
    plain, mixed = report["fidelity"]["plain"], report["fidelity"]["mixed"]
    # Both close to float32, neither equal. Which drifts less on tiny random models is chance (their few
    # dimensions make a handful of roundings decide): the README has random-base's figures.
    for row in (plain, mixed):
        assert 0 < row["max_abs_vision_diff"] < 0.5 and 0 <= row["mean_abs_score_diff"] < 0.05
        assert 0.0 <= row["caption_token_agreement"] <= 1.0
    assert len(report["seconds"]["plain"]) == len(report["seconds"]["mixed"]) == 2
    assert report["time_ratio_best"] == pytest.approx(min(report["seconds"]["mixed"]) / min(report["seconds"]["plain"]))
    assert "mixed precision costs" in text
    with pytest.raises(ConfigError, match="float32 only"):
        run_precision_bench(BenchOptions(cache_dir=tiny_models_dir.parent, models="tiny-random", dtype="float32"))
