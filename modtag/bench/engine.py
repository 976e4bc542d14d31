"""`modtag bench`: the engine against the stock tutorial way, on the same models, photos and checks, in one run.

The phases, each on its own copy of the models (the engine installs fused attention on the models it
runs, and the baseline must run the stock code):

1. baseline: `worker/families/blip/baseline.py`, float32, one processor call and one generate/forward per image,
   question and text, as the model cards show;
2. engine at float32: a first run counts the FLOPs (`FlopCounterMode`) and gives the parity outputs,
   then `repeat` timed runs;
3. engine at the fast dtype (bf16 on CPUs with AVX512-BF16/AMX and recent GPUs, fp16 on older GPUs):
   a first run for the parity against float32, then `repeat` timed runs;
4. on CPUs with oneDNN's int8 product: int8 calibrated on the bench photos, decided per stage against the fast
   dtype, interleaved (`int8.py`), and the policy's decisions at int8 against float32's;
5. the throughput of a plain matrix product at float32, the fast dtype and int8: the machine's practical peaks,
   which each stage's achieved FLOP/s is read against (`stage_share_of_peak`);
6. optionally the other programs of the package: the peers (`peers.py`) and the stack (`through.py`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from modtag.bench.common import (
    CAPTION_TOKENS,
    DECISION_POLICY,
    PHOTOS,
    PROBES,
    TARGET_FRACTION_OF_PEAK,
    TARGET_INT8_OVER_FAST,
    TARGET_PARITY_FP32,
    TARGET_SPEEDUP_FAST,
    TARGET_SPEEDUP_FP32,
    TARGET_STACK_RATIO,
    TEXTS,
    BenchOptions,
    Log,
    bench_fast_dtype,
    caption_agreement,
    check_options,
    dtype_name,
    engine_techniques,
    load_average,
    load_roles,
    machine_info,
    max_match_diff,
    max_score_diff,
    mean_score_diff,
    photos,
    quiet_transformers,
    ratio,
    run_batches,
    stage_totals,
    sync,
    vision_drift,
    vision_outputs,
    workload,
)
from modtag.bench.int8 import Int8Phases, run_int8_phases
from modtag.bench.tags import run_tags_bench
from modtag.bench.through import through_stack
from worker.families.blip.calibration import Int8Calibration
from worker.families.blip.engine import Engine, ImageOutput, ImageRequest
from worker.families.blip.linear import packed_linear_available
from worker.families.blip.models import fast_dtype, load_models, resolve_device
from worker.families.blip.quant import install_int8_linear, int8_linear_available, set_input_ranges


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every phase and return the report (the JSON object `modtag bench --json` prints)."""
    check_options(options)
    if options.tags:
        return run_tags_bench(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = bench_fast_dtype(options, device)
    requests = workload(options.images)
    log = Log(options.progress)
    load_before = load_average()
    with quiet_transformers():
        baseline, baseline_outputs = (None, []) if options.skip_baseline else _baseline(options, requests, log)
        log(f"engine float32: loading {options.models} and counting FLOPs")
        fp32 = _engine_phase(options, requests, torch.float32, log, count=True)
        engine_fp32, fp32_outputs, fp32_vision = fp32.stats, fp32.outputs, fp32.vision
        if fast == torch.float32:
            fast_phase = fp32
        else:
            fp32.engine = None  # its memory, before the next models load
            log(f"engine {dtype_name(fast)}: loading {options.models}")
            fast_phase = _engine_phase(options, requests, fast, log, count=False)
        engine_fast, fast_outputs, fast_vision = dict(fast_phase.stats), fast_phase.outputs, fast_phase.vision
        int8: Int8Phases | None = None
        engine_int8 = None
        if options.dtype == "int8" or (device.type == "cpu" and int8_linear_available()):
            assert fast_phase.engine is not None  # kept for this
            int8 = run_int8_phases(options, requests, fast_phase.engine, fp32_outputs, fp32_vision, log)
            fast_phase.engine = None
            gc.collect()
            engine_int8 = int8.engine
            engine_int8["fidelity"] = {
                "max_abs_vision_diff": vision_drift(int8.vision, fp32_vision),
                "max_abs_match_diff": max_match_diff(int8.outputs, fp32_outputs),
                "max_abs_score_diff": max_score_diff(int8.outputs, fp32_outputs),
                "mean_abs_score_diff": mean_score_diff(int8.outputs, fp32_outputs),
                "caption_token_agreement": caption_agreement(int8.outputs, fp32_outputs),
                **decision_agreement(options, log, int8.chosen, int8.calibration),
            }
        fast_phase.engine = fp32.engine = None
        gc.collect()
        log("matrix-product peak")
        peak_fast = matmul_peak(device, fast, options.peak_size)
        peak_fp32 = peak_fast if fast == torch.float32 else matmul_peak(device, torch.float32, options.peak_size)
        peak_int8 = int8_matmul_peak(options.peak_size) if engine_int8 else None

    flops = sum(fp32.stage_flops.values())
    flops_per_image = flops / len(requests)
    report: dict[str, Any] = {
        "workload": {
            "images": len(requests),
            "photos": [PHOTOS[i % len(PHOTOS)] for i in range(len(requests))],
            "probes": len(PROBES),
            "texts": len(TEXTS),
            "caption_tokens": CAPTION_TOKENS,
            "models": options.models,
        },
        # Other processes on the machine slow any phase down: the load average tells how busy it was.
        "machine": {**machine_info(device), "load_average_before": load_before, "load_average_after": load_average()},
        "baseline": baseline,
        "engine_fp32": engine_fp32,
        "engine_fast": engine_fast,
        "speedup_fp32": ratio(engine_fp32["images_per_s"], baseline["images_per_s"] if baseline else None),
        "speedup_fast": ratio(engine_fast["images_per_s"], baseline["images_per_s"] if baseline else None),
        # int8 linear layers (`worker/families/blip/quant.py`) on the stages where int8 pays (`stage_dtypes`), the
        # rest at the fast dtype; fidelity against float32.
        "engine_int8": engine_int8,
        "stage_dtypes": int8.stage_dtypes if int8 else None,
        "int8_workload": int8.workload if int8 else None,
        # The whole workload, int8 mix against the fast dtype, interleaved: the ratio of the medians.
        "speedup_int8_over_fast": int8.workload["ratio_median"] if int8 else None,
        "parity": {
            "compared_images": len(baseline_outputs),
            "max_abs_score_diff_fp32": max_score_diff(fp32_outputs, baseline_outputs) if baseline_outputs else None,
            "caption_token_agreement_fp32": (
                caption_agreement(fp32_outputs, baseline_outputs) if baseline_outputs else None
            ),
            # The vision encoders' output (max over the roles) and the ITM probabilities, beside every score.
            "max_abs_vision_diff_fast": vision_drift(fast_vision, fp32_vision),
            "max_abs_match_diff_fast": max_match_diff(fast_outputs, fp32_outputs),
            "max_abs_score_diff_fast": max_score_diff(fast_outputs, fp32_outputs),
            "mean_abs_score_diff_fast": mean_score_diff(fast_outputs, fp32_outputs),
            "caption_token_agreement_fast": caption_agreement(fast_outputs, fp32_outputs),
        },
        "flops_per_image": flops_per_image,
        "peak_flops_fast": peak_fast,
        "peak_flops_fp32": peak_fp32,
        "achieved_flops_fast": flops_per_image * engine_fast["images_per_s"],
        "fraction_of_peak_fast": flops_per_image * engine_fast["images_per_s"] / peak_fast,
        "fraction_of_peak_fp32": flops_per_image * engine_fp32["images_per_s"] / peak_fp32,
        # int8: against the int8 product the engine's layers run (its input quantized per call), not a bf16 one.
        "peak_flops_int8": peak_int8,
        "fraction_of_peak_int8": flops_per_image * engine_int8["images_per_s"] / peak_int8
        if engine_int8 and peak_int8
        else None,
        # Each stage's matrix-product FLOPs (counted at float32) against its time at each dtype and that dtype's peak.
        "stage_flops_per_image": {stage: count / len(requests) for stage, count in fp32.stage_flops.items()},
        "stage_share_of_peak": _stage_shares(
            fp32.stage_flops,
            {
                "float32": (engine_fp32["stages_s"], peak_fp32),
                dtype_name(fast): (int8.stage_seconds["fast"] if int8 else engine_fast["stages_s"], peak_fast),
                **({"int8": (int8.stage_seconds["int8"], peak_int8)} if int8 and peak_int8 else {}),
            },
        ),
        "through_stack": None,
    }
    report["peers"] = None
    if options.peers:
        from modtag.bench.peers import peers_bench

        with quiet_transformers():
            report["peers"] = peers_bench(
                options.models, options.cache_dir, options.device, options.batch_size, max(options.repeat, 3), log
            )
    if options.through_stack:
        with quiet_transformers():
            report["through_stack"] = through_stack(options, "int8" if options.dtype == "int8" else fast, log)
    report["targets"] = _targets(report)
    return report


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` square matrix products big enough to keep every core busy.

    On CPUs both `torch.mm` and the packed oneDNN product the engine's linear layers use are timed, and
    the faster counts: the engine is held to the best the machine does, not to a slow reference.
    """
    size = size or (8192 if device.type == "cuda" else 3072)
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    products: list[Callable[[], object]] = [lambda: torch.mm(left, right, out=out)]
    if device.type == "cpu" and packed_linear_available(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(right, size)
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(left, packed, None, "none", [], ""))
    return _best_flops(products, size, reps, device)


def int8_matmul_peak(size: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the int8 product the engine's int8 layers run (oneDNN, a bf16 input at a calibrated scale), square.

    Through `worker/families/blip/quant.py` itself: the input's one quantization pass is part of every int8
    layer's cost (a square pass beside a cubic product).
    """
    size = size or 3072
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(size, size, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(size, size, generator=generator))
    model = nn.Sequential(layer)
    install_int8_linear(model)
    left = torch.randn(size, size, generator=generator).to(fast_dtype(torch.device("cpu")))
    low, high = (float(value) for value in torch.aminmax(left.float()))
    set_input_ranges(model, {"0": (low, high)})
    return _best_flops([lambda: layer(left)], size, reps, torch.device("cpu"))


def _best_flops(products: list[Callable[[], object]], size: int, reps: int, device: torch.device) -> float:
    best = math.inf
    with torch.inference_mode():
        for product in products:
            for attempt in range(reps + 1):
                sync(device)
                started = time.perf_counter()
                product()
                sync(device)
                if attempt:  # the first product warms up the kernels
                    best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def count_flops(run: Callable[[], object]) -> tuple[float, object]:
    """The matrix-product FLOPs (matmul, linear, convolution, attention) `run()` performs, and its result."""
    with _flop_counter() as counter:
        result = run()
    return float(counter.get_total_flops()), result


def count_stage_flops(engine: Engine, run: Callable[[], object]) -> tuple[dict[str, float], object]:
    """`count_flops`, split by the engine stage (vision, caption, probes...) each FLOP was spent in."""
    totals: dict[str, float] = {}

    @contextlib.contextmanager
    def counted(stage: str) -> Iterator[None]:
        with _flop_counter() as counter:
            yield
        totals[stage] = totals.get(stage, 0.0) + float(counter.get_total_flops())

    engine.stage_observer = counted
    try:
        result = run()
    finally:
        engine.stage_observer = None
    return totals, result


def _flop_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    import worker.families.blip.native  # noqa: F401  (registers modtag's attention operator)

    # PyTorch counts the CUDA attention kernels, not the CPU flash kernel, oneDNN's packed linear nor
    # modtag's native attention (the same products as the flash kernel).
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
        torch.ops.modtag.vision_attention: _sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _linear_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def decision_agreement(
    options: BenchOptions,
    log: Callable[[str], None],
    int8_stages: tuple[str, ...] | None = None,
    calibration: Int8Calibration | None = None,
) -> dict[str, Any]:
    """How often the moderation policy decides the same with int8 as with float32, on the workload's photos.

    int8 runs on `int8_stages` (None: the engine's default) with `calibration`'s static scales where given.

    Each dtype's engine runs the policy's own checks (caption, probes, texts) on every photo, and the
    policy decides on each; reports the share of identical actions and of identical category verdicts.
    What other families compute for the policy (text read by OCR, pixel measurements) does not depend on
    BLIP's dtype: it is computed once and shared by both.
    """
    from core.hashes import BankMatch
    from core.settings import Settings
    from policies import ModelOutputs, decide, load_policies
    from worker.families import ImageWork, families_for
    from worker.families.blip import roles_for
    from worker.families.blip.adapter import image_request, model_outputs

    policy = load_policies([])[DECISION_POLICY]
    needs = policy.requirements()
    # The photos are in no bank: the worker's hash step would say so before the models run.
    unbanked = ModelOutputs(banks={query.bank: BankMatch(query.bank) for query in needs.banks})
    images = photos(options.images)
    requests = [image_request(image, needs) for image in images]
    others = [ModelOutputs() for _ in images]
    for family, share in families_for(needs.model_capabilities):
        if family.name != "blip":
            settings = Settings(_env_file=None, torch_threads=options.threads or 0)  # type: ignore[call-arg]
            batch = family.load(settings, share).run_batch([ImageWork(image, needs) for image in images])
            others = [known.merged(fresh) for known, fresh in zip(others, batch.outputs, strict=True)]
    decisions = {}
    for dtype in ("float32", "int8"):
        log(f"{DECISION_POLICY} decisions at {dtype}")
        loaded = load_models(
            options.models,
            roles_for(needs.capabilities),
            cache_dir=options.cache_dir,
            device=options.device,
            dtype=dtype,
        )
        int8 = dtype == "int8"
        engine = Engine(
            loaded,
            max_caption_tokens=CAPTION_TOKENS,
            max_batch=options.batch_size,
            int8_stages=int8_stages if int8 else None,
            int8_calibration=calibration if int8 else None,
        )
        outputs = [
            out
            for start in range(0, len(requests), options.batch_size)
            for out in engine.run(requests[start : start + options.batch_size])
        ]
        decisions[dtype] = [
            decide(policy, unbanked.merged(other).merged(model_outputs(output)))
            for other, output in zip(others, outputs, strict=True)
        ]
        del engine, loaded
        gc.collect()
    pairs = list(zip(decisions["int8"], decisions["float32"], strict=True))
    verdicts = [
        (low.categories[name].action, high.categories[name].action) for low, high in pairs for name in high.categories
    ]
    return {
        "policy": DECISION_POLICY,
        "decisions": len(pairs),
        "decision_agreement": sum(low.action == high.action for low, high in pairs) / len(pairs),
        "category_agreement": sum(a == b for a, b in verdicts) / len(verdicts) if verdicts else None,
    }


def _baseline(
    options: BenchOptions, requests: list[ImageRequest], log: Callable[[str], None]
) -> tuple[dict[str, Any], list[ImageOutput]]:
    from worker.families.blip.baseline import run_baseline

    count = min(options.baseline_images or len(requests), len(requests))
    log(f"baseline float32: loading {options.models}")
    models = load_roles(options, torch.float32)
    outputs: list[ImageOutput] = []
    image_seconds: list[float] = []
    bar = tqdm(requests[:count], desc="baseline", unit="img", disable=not options.progress, leave=False)
    for request in bar:
        started = time.perf_counter()
        outputs.extend(
            run_baseline(models, [request], max_caption_tokens=CAPTION_TOKENS, min_caption_tokens=CAPTION_TOKENS)
        )
        sync(models.device)
        image_seconds.append(time.perf_counter() - started)
    del models
    gc.collect()
    seconds = sum(image_seconds)
    stats = {
        "dtype": "float32",
        "images": count,
        "seconds": seconds,
        "image_seconds": image_seconds,
        "seconds_per_image": seconds / count,
        "images_per_s": count / seconds,
        "stages_s": stage_totals(outputs),
    }
    return stats, outputs


@dataclass
class _Phase:
    """One engine's phase: its stats, first run's outputs and vision outputs, FLOPs by stage (when counted)."""

    stats: dict[str, Any]
    outputs: list[ImageOutput]
    vision: dict[str, torch.Tensor]
    stage_flops: dict[str, float]
    engine: Engine | None  # kept while a later phase times against it; None once its memory may go


def _engine_phase(
    options: BenchOptions,
    requests: list[ImageRequest],
    dtype: torch.dtype | str,
    log: Callable[[str], None],
    *,
    count: bool,
) -> _Phase:
    models = load_roles(options, dtype)
    engine = Engine(
        models, max_caption_tokens=CAPTION_TOKENS, min_caption_tokens=CAPTION_TOKENS, max_batch=options.batch_size
    )

    def run_all() -> list[ImageOutput]:
        return run_batches(engine, requests, options.batch_size)

    # The first run warms up (and, at float32, counts the FLOPs of each stage); its outputs are the parity outputs.
    log(f"engine {dtype_name(dtype)}: first run" + (" (counting FLOPs)" if count else ""))
    stage_flops: dict[str, float] = {}
    if count:
        stage_flops, first = count_stage_flops(engine, run_all)
        outputs: list[ImageOutput] = first  # type: ignore[assignment]
    else:
        outputs = run_all()
    runs: list[tuple[float, list[ImageOutput]]] = []
    for _ in tqdm(range(options.repeat), desc=f"engine {dtype_name(dtype)}", disable=not options.progress, leave=False):
        started = time.perf_counter()
        timed = run_all()
        runs.append((time.perf_counter() - started, timed))
    seconds, best_outputs = min(runs, key=lambda run: run[0])
    vision = vision_outputs(engine, requests, options.batch_size)  # for the drift against float32
    stats = {
        "dtype": models.dtype_name,
        "images": len(requests),
        "batch_size": options.batch_size,
        "seconds": seconds,
        "runs_s": [run[0] for run in runs],
        "images_per_s": len(requests) / seconds,
        "stages_s": stage_totals(best_outputs),
        "techniques": engine_techniques(engine),
    }
    return _Phase(stats, outputs, vision, stage_flops, engine)


def _stage_shares(
    stage_flops: dict[str, float], timed: dict[str, tuple[dict[str, float], float]]
) -> dict[str, dict[str, float | None]]:
    # Per stage, per dtype: its FLOPs over its seconds (both for the whole workload) over that dtype's peak.
    return {
        stage: {
            dtype: (flops / seconds[stage] / peak if seconds.get(stage) and peak else None)
            for dtype, (seconds, peak) in timed.items()
        }
        for stage, flops in stage_flops.items()
        if flops > 0
    }


def _sdpa_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *_: Any, **__: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _linear_flops(input_shape: tuple[int, ...], *shapes: Any, **__: Any) -> int:
    # (..., K) x (N, K)^T: 2 K N per input row. The counter looks operators up by name, so both overloads come here:
    # (X, W, B, attr, scalars, algorithm) and the residual-fused `binary` one, (X, other, W, B, attr).
    weight_shape = shapes[1] if len(shapes) == 4 else shapes[0]
    return 2 * math.prod(input_shape) * weight_shape[0]


def _targets(report: dict[str, Any]) -> dict[str, bool | None]:
    parity = report["parity"]
    stack = report.get("through_stack")
    fp32_parity = None
    if parity["max_abs_score_diff_fp32"] is not None:
        fp32_parity = (
            parity["max_abs_score_diff_fp32"] <= TARGET_PARITY_FP32 and parity["caption_token_agreement_fp32"] == 1.0
        )
    return {
        "speedup_fp32": None if report["speedup_fp32"] is None else report["speedup_fp32"] >= TARGET_SPEEDUP_FP32,
        "parity_fp32": fp32_parity,
        "speedup_fast": None if report["speedup_fast"] is None else report["speedup_fast"] >= TARGET_SPEEDUP_FAST,
        "fraction_of_peak_fast": report["fraction_of_peak_fast"] >= TARGET_FRACTION_OF_PEAK,
        "through_stack": None if not stack else stack["ratio"] >= TARGET_STACK_RATIO,
        "int8_over_fast": (
            None
            if report["speedup_int8_over_fast"] is None
            else report["speedup_int8_over_fast"] >= TARGET_INT8_OVER_FAST
        ),
    }
