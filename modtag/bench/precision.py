"""`modtag bench --precision`: what mixed precision buys in fidelity and costs in time, against plain bf16.

Three engines on the bench workload: float32 (the reference), the fast dtype computed wholly in it (how the
engine ran before `worker/families/blip/precision.py`) and the fast dtype under mixed precision (the default).
Fidelity: the vision encoders' output, the ITM probabilities, every probe and match score, and the caption
tokens, each against float32. Time: the two fast engines interleaved round by round, the order alternating,
because the machine is shared and noisy: the ratio of their best runs (and of their medians) is the cost.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from core.errors import ConfigError
from modtag.bench.common import (
    CAPTION_TOKENS,
    BenchOptions,
    Log,
    bench_fast_dtype,
    caption_agreement,
    check_options,
    dtype_name,
    load_average,
    load_roles,
    machine_info,
    max_match_diff,
    max_score_diff,
    mean_score_diff,
    quiet_transformers,
    run_batches,
    vision_drift,
    vision_outputs,
    workload,
)
from worker.families.blip.engine import Engine, ImageOutput, ImageRequest
from worker.families.blip.models import resolve_device

VARIANTS = ("plain", "mixed")


def run_precision_bench(options: BenchOptions) -> dict[str, Any]:
    """Fidelity of plain and mixed bf16 against float32, and their interleaved times (the JSON report)."""
    check_options(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = bench_fast_dtype(options, device)
    if fast == torch.float32:
        raise ConfigError(
            f"bench --precision compares the fast dtype's two ways, but {device} computes float32 only "
            "(no bf16 or fp16 here, or --dtype float32)",
            code="bench_invalid",
        )
    requests = workload(options.images)
    log = Log(options.progress)
    load_before = load_average()
    with quiet_transformers():
        log(f"engine float32: loading {options.models}")
        reference, reference_vision = _outputs(_engine(options, torch.float32, mixed=False), requests, options)
        engines = {variant: _engine(options, fast, mixed=variant == "mixed") for variant in VARIANTS}
        fidelity: dict[str, dict[str, Any]] = {}
        for variant, engine in engines.items():
            log(f"engine {dtype_name(fast)} {variant}: first run")
            outputs, vision = _outputs(engine, requests, options)
            fidelity[variant] = {
                "max_abs_vision_diff": vision_drift(vision, reference_vision),
                "max_abs_match_diff": max_match_diff(outputs, reference),
                "max_abs_score_diff": max_score_diff(outputs, reference),
                "mean_abs_score_diff": mean_score_diff(outputs, reference),
                "caption_token_agreement": caption_agreement(outputs, reference),
            }
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for round_index in range(options.repeat):
            order = VARIANTS if round_index % 2 == 0 else tuple(reversed(VARIANTS))
            log(f"round {round_index + 1} of {options.repeat}")
            for variant in order:
                started = time.perf_counter()
                run_batches(engines[variant], requests, options.batch_size)
                times[variant].append(time.perf_counter() - started)
    return {
        "workload": {"images": len(requests), "models": options.models, "dtype": dtype_name(fast)},
        "machine": {**machine_info(device), "load_average_before": load_before, "load_average_after": load_average()},
        "fidelity": fidelity,
        "seconds": times,
        "time_ratio_best": min(times["mixed"]) / min(times["plain"]),
        "time_ratio_median": statistics.median(times["mixed"]) / statistics.median(times["plain"]),
    }


def format_precision_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    machine, workload_ = report["machine"], report["workload"]
    lines = [
        f"machine: {machine['processor']} ({machine['threads']} threads), load {machine.get('load_average_after')}",
        f"workload: {workload_['images']} photos, {workload_['models']}, {workload_['dtype']} against float32",
        f"{'':<8}{'vision':>10}{'ITM':>10}{'scores':>10}{'caption tokens':>16}{'best s':>9}",
    ]
    for variant in VARIANTS:
        row, seconds = report["fidelity"][variant], report["seconds"][variant]
        lines.append(
            f"{variant:<8}{_figure(row['max_abs_vision_diff']):>10}{row['max_abs_match_diff']:>10.1e}"
            f"{row['max_abs_score_diff']:>10.1e}{row['caption_token_agreement']:>16.1%}{min(seconds):>9.2f}"
        )
    lines.append(
        f"mixed precision costs {report['time_ratio_best'] - 1:+.1%} of plain {workload_['dtype']}'s time "
        f"(best runs; medians {report['time_ratio_median'] - 1:+.1%}); drift is max |diff| against float32"
    )
    return "\n".join(lines)


# Helpers.


def _engine(options: BenchOptions, dtype: torch.dtype, *, mixed: bool) -> Engine:
    return Engine(
        load_roles(options, dtype),
        max_caption_tokens=CAPTION_TOKENS,
        min_caption_tokens=CAPTION_TOKENS,
        max_batch=options.batch_size,
        mixed_precision=mixed,
    )


def _outputs(
    engine: Engine, requests: list[ImageRequest], options: BenchOptions
) -> tuple[list[ImageOutput], dict[str, torch.Tensor]]:
    return run_batches(engine, requests, options.batch_size), vision_outputs(engine, requests, options.batch_size)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"
