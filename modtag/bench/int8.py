"""`modtag bench`'s int8 phases: which stages int8 pays on, decided per stage, and the mix against the fast dtype.

1. calibration: an engine with every stage at int8 runs the bench photos once, observing each int8 layer's input
   range (`worker/families/blip/calibration.py`); its layers then quantize with those static scales;
2. per stage: that engine and the fast dtype's engine run the workload interleaved, round by round, the order
   alternating (the machine is shared and noisy); each stage's median time at int8 and at the fast dtype, and the
   int8 engine's outputs against float32's, decide it: int8 where it is faster and keeps agreement (caption
   tokens identical to float32's at least INT8_CAPTION_AGREEMENT of the time, a probe's or a match's probability
   within INT8_SCORE_DRIFT; the vision stage's drift shows in every score after it), the fast dtype elsewhere;
3. the mix: an engine with int8 on the chosen stages only (same calibration) runs interleaved with the fast one
   again: the whole workload's int8/fast ratio, medians and best runs.

The per-stage fidelity is that of the engine with every stage at int8: a stage's figure includes what the stages
before it moved (the caption decoder reads the int8 vision encoder's output), so the choice errs on the side of
the fast dtype. The mix's own fidelity is the report's `engine_int8.fidelity`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from modtag.bench.common import (
    CAPTION_TOKENS,
    INT8_CAPTION_AGREEMENT,
    INT8_SCORE_DRIFT,
    BenchOptions,
    caption_agreement,
    engine_techniques,
    load_roles,
    max_match_diff,
    max_probe_diff,
    max_score_diff,
    run_batches,
    stage_totals,
    vision_drift,
    vision_outputs,
)
from worker.families.blip.calibration import Int8Calibration, calibrate
from worker.families.blip.engine import INT8_STAGES, Engine, ImageOutput, ImageRequest


@dataclass
class Int8Phases:
    """What the int8 phases measured; `engine` is the mix's stats, for the report's `engine_int8`."""

    engine: dict[str, Any]
    outputs: list[ImageOutput]  # the mix's first run: its fidelity against float32
    vision: dict[str, torch.Tensor]
    stage_dtypes: dict[str, dict[str, Any]]
    workload: dict[str, Any]
    stage_seconds: dict[str, dict[str, float]]  # "fast" and "int8" (every stage at int8): median seconds per stage
    calibration: Int8Calibration
    chosen: tuple[str, ...]


def run_int8_phases(
    options: BenchOptions,
    requests: list[ImageRequest],
    fast: Engine,
    reference: list[ImageOutput],
    reference_vision: dict[str, torch.Tensor],
    log: Callable[[str], None],
) -> Int8Phases:
    """Calibrate, time every stage at int8 and at the fast dtype, choose, and time the chosen mix (see the module)."""
    log(f"engine int8, every stage: loading {options.models} and calibrating on the bench photos")
    every = _engine(options, INT8_STAGES, None)
    calibration = calibrate(every, requests, batch_size=options.batch_size, models=options.models)
    calibration.apply(every.models)
    outputs = run_batches(every, requests, options.batch_size)
    fidelity = _stage_fidelity(
        outputs, vision_outputs(every, requests, options.batch_size), reference, reference_vision
    )
    runs = _interleaved({"fast": fast, "int8": every}, requests, options, log, "every stage at int8")
    stage_seconds = {name: _median_stages(timed) for name, timed in runs.items()}
    stage_dtypes: dict[str, dict[str, Any]] = {}
    for stage in INT8_STAGES:
        int8_s, fast_s = stage_seconds["int8"].get(stage), stage_seconds["fast"].get(stage)
        faster = bool(int8_s and fast_s and int8_s < fast_s)
        keeps = _keeps_agreement(stage, fidelity[stage])
        stage_dtypes[stage] = {
            "dtype": "int8" if faster and keeps else fast.models.dtype_name,
            "int8_s": int8_s,
            "fast_s": fast_s,
            "int8_over_fast": fast_s / int8_s if int8_s and fast_s else None,
            "faster": faster,
            "keeps_agreement": keeps,
            **fidelity[stage],
        }
    chosen = tuple(stage for stage in INT8_STAGES if stage_dtypes[stage]["dtype"] == "int8")
    del every, runs
    gc.collect()

    log(f"engine int8 on {', '.join(chosen) or 'no stage'}: loading {options.models}")
    mix = _engine(options, chosen, calibration)
    mix_outputs = run_batches(mix, requests, options.batch_size)  # warms up; its outputs give the fidelity
    mix_vision = vision_outputs(mix, requests, options.batch_size)
    runs = _interleaved({"fast": fast, "int8": mix}, requests, options, log, "the chosen mix")
    fast_runs = [seconds for seconds, _ in runs["fast"]]
    int8_runs = [seconds for seconds, _ in runs["int8"]]
    best, best_stages = min(runs["int8"], key=lambda run: run[0])
    workload = {
        "int8_stages": list(chosen),
        "rounds": options.repeat,
        "fast_s": fast_runs,
        "int8_s": int8_runs,
        "ratio_median": statistics.median(fast_runs) / statistics.median(int8_runs),
        "ratio_best": min(fast_runs) / best,
    }
    stats = {
        "dtype": mix.models.dtype_name,
        "images": len(requests),
        "batch_size": options.batch_size,
        "seconds": best,
        "runs_s": int8_runs,
        "images_per_s": len(requests) / best,
        "stages_s": best_stages,
        "calibrated_layers": sum(len(ranges.ranges) for ranges in calibration.roles.values()),
        "techniques": engine_techniques(mix),
    }
    return Int8Phases(stats, mix_outputs, mix_vision, stage_dtypes, workload, stage_seconds, calibration, chosen)


# Helpers.


def _engine(options: BenchOptions, stages: tuple[str, ...], calibration: Int8Calibration | None) -> Engine:
    return Engine(
        load_roles(options, "int8"),
        max_caption_tokens=CAPTION_TOKENS,
        min_caption_tokens=CAPTION_TOKENS,
        max_batch=options.batch_size,
        int8_stages=stages,
        int8_calibration=calibration,
    )


def _interleaved(
    engines: dict[str, Engine],
    requests: list[ImageRequest],
    options: BenchOptions,
    log: Callable[[str], None],
    what: str,
) -> dict[str, list[tuple[float, dict[str, float]]]]:
    # Round by round, the order alternating: a load that comes and goes slows both alike.
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in engines}
    names = list(engines)
    for round_index in range(options.repeat):
        log(f"int8 against the fast dtype ({what}): round {round_index + 1} of {options.repeat}")
        for name in names if round_index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            outputs = run_batches(engines[name], requests, options.batch_size)
            runs[name].append((time.perf_counter() - started, stage_totals(outputs)))
    return runs


def _median_stages(runs: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    stages = runs[0][1]
    return {stage: statistics.median(totals.get(stage, 0.0) for _, totals in runs) for stage in stages}


def _stage_fidelity(
    outputs: list[ImageOutput],
    vision: dict[str, torch.Tensor],
    reference: list[ImageOutput],
    reference_vision: dict[str, torch.Tensor],
) -> dict[str, dict[str, Any]]:
    # Each stage's own outputs against float32's; the vision stage's are in every score downstream of it.
    return {
        "vision": {
            "max_abs_vision_diff": vision_drift(vision, reference_vision),
            "max_abs_score_diff": max_score_diff(outputs, reference),
        },
        "caption": {"caption_token_agreement": caption_agreement(outputs, reference)},
        "probes": {"max_abs_score_diff": max_probe_diff(outputs, reference)},
        "matches": {"max_abs_score_diff": max_match_diff(outputs, reference)},
    }


def _keeps_agreement(stage: str, fidelity: dict[str, Any]) -> bool:
    if stage == "caption":
        return bool(fidelity["caption_token_agreement"] >= INT8_CAPTION_AGREEMENT)
    return bool(fidelity["max_abs_score_diff"] <= INT8_SCORE_DRIFT)
