"""`modtag bench`: the engine against the stock tutorial way, on the same models, photos and checks, in one run.

The workload is fixed so that runs compare: real photos (scikit-image's public-domain data), a caption
of exactly `CAPTION_TOKENS` greedy tokens, `PROBES` (yes/no questions) and `TEXTS` (image-text
matches) per image. The phases, each on its own copy of the models (the engine installs fused
attention on the models it runs, and the baseline must run the stock code):

1. baseline: `worker/baseline.py`, float32, one processor call and one generate/forward per image,
   question and text, as the model cards show;
2. engine at float32: a first run counts the FLOPs (`FlopCounterMode`) and gives the parity outputs,
   then `repeat` timed runs;
3. engine at the fast dtype (bf16 on CPUs with AVX512-BF16/AMX and recent GPUs, fp16 on older GPUs):
   a first run for the parity against float32, then `repeat` timed runs;
4. the throughput of a plain matrix product at both dtypes: the machine's practical peak;
5. optionally (`through_stack`), jobs/s through API -> Redis -> worker -> database against the engine
   alone, on the built-in moderation policy.

With `tags` it runs instead what tagging and attribute checks cost, at the fast dtype only
(`run_tags_bench`): the one-time text features of the built-in tagging policy's tags, the ITM model's
vision pass, the tags check (ITC over every tag, ITM on the top few of each group), the naive way (ITM
over every tag) on `naive_images` photos, and the listing policy's colour and product-type answer
rankings.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from core.errors import ConfigError
from modtag.servers import free_port
from worker.attention import has_fused_attention
from worker.engine import AnswerRequest, Engine, ImageOutput, ImageRequest, TagQuery
from worker.linear import has_packed_linear, packed_linear_available
from worker.models import LoadedModels, fast_dtype, load_models, resolve_device, resolve_dtype
from worker.quant import has_int8_linear, int8_linear_available

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field", "moon")
"""scikit-image's bundled public-domain photos; the grey ones (camera, coins, moon) are converted to RGB."""

PROBES = (
    "is there a gun in the picture?",
    "is anyone holding a weapon?",
    "is the person naked?",
    "is this picture sexually explicit?",
    "is there blood in the picture?",
    "are there drugs in the picture?",
    "is there a swastika in the picture?",
    "is the person hurting themselves?",
)
TEXTS = (
    "a photo of a handgun",
    "a person holding a rifle",
    "a knife pointed at a person",
    "a photo of a naked person",
    "an explicit sexual image",
    "a woman in lingerie",
    "a photo of a bloody wound",
    "people fighting violently",
    "a dead body on the ground",
    "a photo of illegal drugs",
    "white powder and a rolled banknote",
    "a person smoking marijuana",
    "a nazi flag with a swastika",
    "people doing a nazi salute",
    "a photo of self harm cuts on an arm",
    "a burning car in a street riot",
)
CAPTION_TOKENS = 20
DECISION_POLICY = "moderation"  # whose decisions the int8 fidelity figures compare
ROLES = frozenset({"caption", "vqa", "itm"})

# The issue's targets, checked in every report.
TARGET_SPEEDUP_FP32 = 3.0
TARGET_SPEEDUP_FAST = 25.0
TARGET_PARITY_FP32 = 1e-4
TARGET_FRACTION_OF_PEAK = 0.5
TARGET_STACK_RATIO = 0.9
TARGET_INT8_OVER_FAST = 1.4

# `--tags`: the built-in policies' checks, as the worker runs them.
TAGS_POLICY = "tagging"  # its tags check: every tag of the product taxonomy, ITM on the top 5 of each group
ATTRIBUTE_POLICY = "listing"
ATTRIBUTE_CONTEXT = {"title": "a red mug", "attributes": {"color": "red", "product_type": "mug"}}
"""A listing's claims: the colour and product-type attribute checks rank their vocabularies (20 and 416 answers)."""


@dataclass(frozen=True)
class BenchOptions:
    """What `modtag bench` runs; `cache_dir` is where random models are built (the settings' models cache)."""

    cache_dir: Path
    models: str = "random-base"
    device: str = "auto"
    dtype: str = "auto"  # the fast dtype; auto: the fastest the hardware computes natively; int8: see run_bench
    batch_size: int = 8
    threads: int | None = None
    images: int = 8
    baseline_images: int | None = None  # None: all images
    repeat: int = 2
    skip_baseline: bool = False
    through_stack: bool = False
    # Jobs arrive one by one, so the worker's first batch leaves before the rest arrive: one batch more
    # than the engine alone needs. 48 jobs (6 engine batches) measure the steady state; 16 would
    # mostly measure that ramp (3 batches against 2).
    stack_jobs: int = 48
    progress: bool = True
    peak_size: int | None = None  # the square matrix product's size; None: 3072 on CPUs, 8192 on GPUs
    tags: bool = False  # instead of the workload above: what tags and attribute checks cost (run_tags_bench)
    naive_images: int = 1  # with `tags`: photos the naive way (ITM over every tag) runs on
    peers: bool = False  # also the vision stage through OpenVINO and ONNX Runtime, where installed (modtag/peers.py)


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every phase and return the report (the JSON object `modtag bench --json` prints)."""
    _check(options)
    if options.tags:
        return run_tags_bench(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = _fast_dtype(options, device)
    requests = workload(options.images)
    log = _Log(options.progress)
    load_before = _load_average()
    with _quiet_transformers():
        baseline, baseline_outputs = (None, []) if options.skip_baseline else _baseline(options, requests, log)
        log(f"engine float32: loading {options.models} and counting FLOPs")
        engine_fp32, fp32_outputs, flops = _engine_phase(options, requests, torch.float32, log, count=True)
        if fast == torch.float32:
            engine_fast, fast_outputs = dict(engine_fp32), fp32_outputs
        else:
            log(f"engine {_name(fast)}: loading {options.models}")
            engine_fast, fast_outputs, _ = _engine_phase(options, requests, fast, log, count=False)
        engine_int8 = None
        if options.dtype == "int8" or (device.type == "cpu" and int8_linear_available()):
            log(f"engine int8: loading {options.models}")
            engine_int8, int8_outputs, _ = _engine_phase(options, requests, "int8", log, count=False)
            engine_int8["fidelity"] = {
                "max_abs_score_diff": max_score_diff(int8_outputs, fp32_outputs),
                "mean_abs_score_diff": mean_score_diff(int8_outputs, fp32_outputs),
                "caption_token_agreement": caption_agreement(int8_outputs, fp32_outputs),
                **decision_agreement(options, log),
            }
        log("matrix-product peak")
        peak_fast = matmul_peak(device, fast, options.peak_size)
        peak_fp32 = peak_fast if fast == torch.float32 else matmul_peak(device, torch.float32, options.peak_size)

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
        "machine": {**_machine(device), "load_average_before": load_before, "load_average_after": _load_average()},
        "baseline": baseline,
        "engine_fp32": engine_fp32,
        "engine_fast": engine_fast,
        "speedup_fp32": _ratio(engine_fp32["images_per_s"], baseline["images_per_s"] if baseline else None),
        "speedup_fast": _ratio(engine_fast["images_per_s"], baseline["images_per_s"] if baseline else None),
        # int8 linear layers (`worker/quant.py`), the rest at the fast dtype; fidelity against float32.
        "engine_int8": engine_int8,
        "speedup_int8_over_fast": _ratio(engine_int8["images_per_s"], engine_fast["images_per_s"])
        if engine_int8
        else None,
        "parity": {
            "compared_images": len(baseline_outputs),
            "max_abs_score_diff_fp32": max_score_diff(fp32_outputs, baseline_outputs) if baseline_outputs else None,
            "caption_token_agreement_fp32": (
                caption_agreement(fp32_outputs, baseline_outputs) if baseline_outputs else None
            ),
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
        "through_stack": None,
    }
    report["peers"] = None
    if options.peers:
        from modtag.peers import peers_bench

        with _quiet_transformers():
            report["peers"] = peers_bench(
                options.models, options.cache_dir, options.device, options.batch_size, max(options.repeat, 3), log
            )
    if options.through_stack:
        with _quiet_transformers():
            report["through_stack"] = through_stack(options, "int8" if options.dtype == "int8" else fast, log)
    report["targets"] = _targets(report)
    return report


def run_tags_bench(options: BenchOptions) -> dict[str, Any]:
    """What tags and attribute checks cost at the fast dtype, on the same photos; the report's `tags` holds it.

    The ITM and VQA models, loaded once; the built-in policies' checks as the worker builds them:
    (a) the tag set's text features on a new engine (`Engine.warm_tags`, what a worker does at
    start); (b) the ITM model's vision pass per image; (c) the tagging policy's tags check per image;
    (d) the naive way, ITM over every tag, on the first `naive_images` photos, with how many of its
    best tags per group the check's ITC shortlist held; (e) the listing policy's colour and
    product-type checks. Every figure is the best of `repeat` timed runs (those of (b), (c) and (e)
    after an untimed run).
    """
    _check(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = _fast_dtype(options, device)
    images = photos(options.images)
    naive_count = min(options.naive_images, len(images))
    log = _Log(options.progress)
    load_before = _load_average()

    from policies import TagsCheck, load_policies

    policies = load_policies([])
    [tags_check] = [check for _, check in policies[TAGS_POLICY].checks() if isinstance(check, TagsCheck)]
    tag_set = tags_check.tag_set()
    query = TagQuery(tag_set.key, tag_set.texts, tag_set.groups, tag_set.top_k)
    answers = [
        AnswerRequest(q.key, q.question, q.candidates, q.required)
        for q in policies[ATTRIBUTE_POLICY].requirements(ATTRIBUTE_CONTEXT).answers
    ]
    with _quiet_transformers():
        log(f"tags {_name(fast)}: loading {options.models} (vqa, itm)")
        loaded = load_models(
            options.models, {"vqa", "itm"}, cache_dir=options.cache_dir, device=options.device, dtype=_name(fast)
        )
    # The first text pass creates the kernels: time the tag set's texts without that one-time cost.
    Engine(loaded, max_batch=options.batch_size).warm_tags([TagQuery("kernels", ("a mug", "a red item"), (0, 0), 1)])
    log(f"text features of {len(query.texts)} tags")
    text_runs: list[float] = []
    for _ in range(options.repeat):  # each on a new engine: no cached features or tokens, as at a worker's start
        engine = Engine(loaded, max_batch=options.batch_size)
        started = time.perf_counter()
        encoded = engine.warm_tags([query])
        text_runs.append(time.perf_counter() - started)
    text_seconds = min(text_runs)

    log(f"tags check on {len(images)} photos")
    tags_run = _timed_runs(engine, [ImageRequest(image, caption=False, tags=[query]) for image in images], options)
    log(f"naive: ITM over all {len(query.texts)} tags on {naive_count} photo(s)")
    naive_requests = [ImageRequest(image, caption=False, texts=query.texts) for image in images[:naive_count]]
    naive_runs: list[float] = []
    for _ in range(options.repeat):  # after the tags check, the ITM model's kernels are warm
        started = time.perf_counter()
        naive_outputs = engine.run(naive_requests)
        naive_runs.append(time.perf_counter() - started)
    naive_seconds = min(naive_runs)
    attribute_runs = []
    for answer in answers:
        log(f"attribute: {answer.question!r} ({len(answer.candidates)} answers)")
        requests = [ImageRequest(image, caption=False, answers=[answer]) for image in images]
        attribute_runs.append((answer, _timed_runs(engine, requests, options)))

    tags_per_image = tags_run.seconds / len(images)
    naive_per_image = naive_seconds / naive_count
    report_tags: dict[str, Any] = {
        "policy": TAGS_POLICY,
        "taxonomy": tags_check.taxonomy,
        "dtype": _name(fast),
        "batch_size": options.batch_size,
        "texts": len(query.texts),
        "groups": len(set(query.groups)),
        "top_k": query.top_k,
        "itm_texts_per_image": sum(min(query.top_k, query.groups.count(g)) for g in set(query.groups)),
        "text_features": {
            "texts": encoded,
            "seconds": text_seconds,
            "runs_s": text_runs,
            "texts_per_s": encoded / text_seconds if text_seconds else None,
        },
        "vision_itm": {
            "seconds_per_image": tags_run.stage("vision"),
            "preprocess_seconds_per_image": tags_run.stage("preprocess"),
        },
        "tags_check": {
            "images": len(images),
            "runs_s": tags_run.runs,
            "seconds_per_image": tags_per_image,
            "images_per_s": 1 / tags_per_image,
            "itc_seconds_per_image": tags_run.stage("tags"),
            "itm_seconds_per_image": tags_run.stage("matches"),
            "beyond_vision_seconds_per_image": tags_run.stage("tags") + tags_run.stage("matches"),
            "stages_s_per_image": tags_run.stages,
        },
        "naive_itm_all": {
            "images": naive_count,
            "texts": len(query.texts),
            "runs_s": naive_runs,
            "seconds_per_image": naive_per_image,
            "times_the_tags_check": naive_per_image / tags_per_image,
            **_shortlist_agreement(query, tags_run.outputs[:naive_count], naive_outputs),
        },
        "attributes": [
            {
                "question": answer.question,
                "candidates": len(answer.candidates),
                "claimed": list(answer.required),
                "answers_scored_per_image": sum(len(o.answers[answer.key]) for o in run.outputs) / len(run.outputs),
                "runs_s": run.runs,
                "seconds_per_image": run.seconds / len(images),
                "beyond_vision_seconds_per_image": run.stage("probes") + run.stage("answers"),
                "stages_s_per_image": run.stages,
            }
            for answer, run in attribute_runs
        ],
    }
    return {
        "workload": {
            "images": len(images),
            "photos": [PHOTOS[i % len(PHOTOS)] for i in range(len(images))],
            "models": options.models,
        },
        "machine": {**_machine(device), "load_average_before": load_before, "load_average_after": _load_average()},
        "tags": report_tags,
    }


def workload(count: int) -> list[ImageRequest]:
    """The bench's requests: `count` photos (cycling through PHOTOS), each with a caption, PROBES and TEXTS."""
    return [ImageRequest(image, caption=True, probes=PROBES, texts=TEXTS) for image in photos(count)]


def photos(count: int) -> list[Image.Image]:
    """`count` RGB photos from scikit-image, in PHOTOS order, repeated when `count` exceeds it."""
    from skimage import data

    loaded: dict[str, Image.Image] = {}
    result = []
    for index in range(count):
        name = PHOTOS[index % len(PHOTOS)]
        if name not in loaded:
            loaded[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
        result.append(loaded[name])
    return result


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
    best = math.inf
    with torch.inference_mode():
        for product in products:
            for attempt in range(reps + 1):
                _sync(device)
                started = time.perf_counter()
                product()
                _sync(device)
                if attempt:  # the first product warms up the kernels
                    best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def count_flops(run: Callable[[], object]) -> tuple[float, object]:
    """The matrix-product FLOPs (matmul, linear, convolution, attention) `run()` performs, and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    # PyTorch counts the CUDA attention kernels, not the CPU flash kernel nor oneDNN's packed linear.
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _linear_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = run()
    return float(counter.get_total_flops()), result


def max_score_diff(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    """The largest |difference| over every probe and match score of the images both lists cover."""
    return max(_score_diffs(outputs, reference), default=0.0)


def mean_score_diff(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    diffs = _score_diffs(outputs, reference)
    return sum(diffs) / len(diffs) if diffs else 0.0


def caption_agreement(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    """The share of caption token positions (over the images both cover) holding the same token."""
    same = total = 0
    for output, ref in zip(outputs, reference, strict=False):
        same += sum(a == b for a, b in zip(output.caption_ids, ref.caption_ids, strict=False))
        total += max(len(output.caption_ids), len(ref.caption_ids))
    return same / total if total else 1.0


def decision_agreement(options: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """How often the moderation policy decides the same with int8 as with float32, on the workload's photos.

    Each dtype's engine runs the policy's own checks (caption, probes, texts) on every photo, and the
    policy decides on each; reports the share of identical actions and of identical category verdicts.
    """
    from core.hashes import BankMatch
    from policies import ModelOutputs, decide, load_policies
    from worker.adapter import image_request, model_outputs, roles_for

    policy = load_policies([])[DECISION_POLICY]
    needs = policy.requirements()
    # The photos are in no bank: the worker's hash step would say so before the models run.
    unbanked = ModelOutputs(banks={query.bank: BankMatch(query.bank) for query in needs.banks})
    requests = [image_request(image, needs) for image in photos(options.images)]
    decisions = {}
    for dtype in ("float32", "int8"):
        log(f"{DECISION_POLICY} decisions at {dtype}")
        loaded = load_models(
            options.models, roles_for(needs), cache_dir=options.cache_dir, device=options.device, dtype=dtype
        )
        engine = Engine(loaded, max_caption_tokens=CAPTION_TOKENS, max_batch=options.batch_size)
        outputs = [
            out
            for start in range(0, len(requests), options.batch_size)
            for out in engine.run(requests[start : start + options.batch_size])
        ]
        decisions[dtype] = [decide(policy, unbanked.merged(model_outputs(output))) for output in outputs]
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


def through_stack(options: BenchOptions, dtype: torch.dtype | str, log: Callable[[str], None]) -> dict[str, Any]:
    """Jobs/s through the embedded stack (API, Redis, one worker, SQLite) against the engine alone.

    Both run the built-in moderation policy's checks on the same JPEG-encoded photos, at `dtype`, with
    the worker's engine settings and batches of `options.batch_size`.
    """
    from policies import load_policies
    from worker.adapter import image_request, roles_for

    needs = load_policies([])["moderation"].requirements()
    encoded = [_jpeg(image) for image in photos(options.stack_jobs)]
    # What the worker computes for each job, from the same decoded JPEG files.
    requests = [image_request(Image.open(io.BytesIO(data)).convert("RGB"), needs) for data in encoded]
    roles = roles_for(needs)

    log(f"engine alone, moderation policy, {_name(dtype)}")
    loaded = load_models(options.models, roles, cache_dir=options.cache_dir, device=options.device, dtype=_name(dtype))
    engine = Engine(loaded, max_batch=options.batch_size)
    engine.run(requests[: options.batch_size])  # warm-up, as the stack's worker gets below
    started = time.perf_counter()
    for start in range(0, len(requests), options.batch_size):
        engine.run(requests[start : start + options.batch_size])
    engine_seconds = time.perf_counter() - started
    del engine, loaded
    gc.collect()

    log("through the stack: starting API, Redis and a worker")
    metrics_port = free_port()
    with tempfile.TemporaryDirectory(prefix="modtag-bench-") as tmp:
        root = Path(tmp)
        files = []
        for index, data in enumerate(encoded):
            path = root / "photos" / f"{index:03d}-{PHOTOS[index % len(PHOTOS)]}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        env = {
            "MODTAG_DATA_DIR": str(root / "data"),
            "MODTAG_DATABASE_URL": f"sqlite:///{root / 'data' / 'modtag.db'}",
            "MODTAG_MODELS": options.models,
            "MODTAG_MODELS_CACHE_DIR": str(options.cache_dir),
            "MODTAG_DEVICE": options.device,
            "MODTAG_DTYPE": _name(dtype),
            "MODTAG_BATCH_MAX_IMAGES": str(options.batch_size),
            # Scraped before and after the timed jobs: where the stack's time went (see _stack_profile).
            "MODTAG_WORKER_METRICS_PORT": str(metrics_port),
            "MODTAG_TORCH_THREADS": str(options.threads or 0),
        }
        with _environment(env, remove=("MODTAG_REDIS_URL",)):
            stack_seconds, done, failed, profile = _run_stack(files, log, options.progress, metrics_port)
    return {
        "policy": "moderation",
        "dtype": _name(dtype),
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
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for people; the JSON has every figure."""
    if "tags" in report:
        return format_tags_report(report)
    workload, machine = report["workload"], report["machine"]
    load = machine.get("load_average_after")
    lines = [
        f"modtag bench: {workload['images']} photos x (caption of {workload['caption_tokens']} tokens, "
        f"{workload['probes']} probes, {workload['texts']} texts), models {workload['models']}",
        f"machine: {machine['processor']} ({machine['device']}, {machine['threads']} threads), "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
        + (f"; load average {load[0]:.1f} at the end" if load else ""),
        "",
        f"{'run':<16}{'dtype':<10}{'images/s':>10}{'s/image':>10}{'speedup':>10}",
    ]
    baseline = report["baseline"]
    rows = [("baseline", baseline), ("engine fp32", report["engine_fp32"]), ("engine fast", report["engine_fast"])]
    speedups = {"engine fp32": report["speedup_fp32"], "engine fast": report["speedup_fast"]}
    int8 = report.get("engine_int8")
    if int8:
        rows.append(("engine int8", int8))
        speedups["engine int8"] = _ratio(int8["images_per_s"], baseline["images_per_s"] if baseline else None)
    for label, run in rows:
        if run is None:
            lines.append(f"{label:<16}{'-':<10}{'skipped':>10}")
            continue
        speedup = speedups.get(label)
        shown = "1.0x" if label == "baseline" else (f"{speedup:.1f}x" if speedup else "-")
        lines.append(
            f"{label:<16}{run['dtype']:<10}{run['images_per_s']:>10.3f}{1 / run['images_per_s']:>10.2f}{shown:>10}"
        )
    if baseline and baseline["images"] < workload["images"]:
        lines.append(f"(the baseline ran on the first {baseline['images']} of {workload['images']} images)")
    parity = report["parity"]
    lines.append("")
    if parity["max_abs_score_diff_fp32"] is not None:
        lines.append(
            f"parity fp32 vs baseline ({parity['compared_images']} images): max |score diff| "
            f"{parity['max_abs_score_diff_fp32']:.2e}, caption tokens identical "
            f"{parity['caption_token_agreement_fp32']:.1%}"
        )
    lines.append(
        f"parity {report['engine_fast']['dtype']} vs fp32: max |score diff| {parity['max_abs_score_diff_fast']:.3f} "
        f"(mean {parity['mean_abs_score_diff_fast']:.4f}), caption tokens identical "
        f"{parity['caption_token_agreement_fast']:.1%}"
    )
    if int8:
        fidelity = int8["fidelity"]
        lines.append(
            f"int8 vs fp32: {report['speedup_int8_over_fast']:.2f}x the {report['engine_fast']['dtype']} engine; "
            f"max |score diff| {fidelity['max_abs_score_diff']:.3f} (mean {fidelity['mean_abs_score_diff']:.4f}), "
            f"caption tokens identical {fidelity['caption_token_agreement']:.1%}, {fidelity['policy']} decisions "
            f"identical {fidelity['decision_agreement']:.1%} of {fidelity['decisions']}"
        )
    lines.append(
        f"useful work {report['flops_per_image'] / 1e9:.0f} GFLOP/image; engine fast "
        f"{report['achieved_flops_fast'] / 1e9:.0f} GFLOP/s = {report['fraction_of_peak_fast']:.0%} of the "
        f"{report['peak_flops_fast'] / 1e9:.0f} GFLOP/s a plain matrix product reaches here"
    )
    stack = report.get("through_stack")
    if stack:
        lines.append(
            f"through the stack ({stack['policy']}, {stack['dtype']}): {stack['jobs_per_s']:.3f} jobs/s vs engine "
            f"alone {stack['engine_images_per_s']:.3f} images/s = {stack['ratio']:.0%}"
            + (f" ({stack['failed']} jobs failed)" if stack["failed"] else "")
        )
        profile = stack.get("profile") or {}
        if profile.get("batches"):
            per_job = {stage: seconds for stage, seconds in profile["worker_s_per_job"].items() if seconds is not None}
            lines.append(
                f"  where the stack's time went: {profile['batches']} batches of {profile['mean_batch_images']:.1f} "
                f"images on average (engine alone: {stack['engine_batches']}); the engine computed "
                f"{profile['engine_busy_share']:.0%} of the time, at {profile['engine_images_per_s_in_stack']:.3f} "
                "images/s; per job in the worker: "
                + ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in per_job.items())
            )
    if report.get("peers"):
        from modtag.peers import format_peers

        lines += format_peers(report["peers"])
    lines.append("")
    lines.append(
        "targets: "
        + ", ".join(
            f"{name} {'met' if met else 'MISSED'}" for name, met in report["targets"].items() if met is not None
        )
    )
    return "\n".join(lines)


def format_tags_report(report: dict[str, Any]) -> str:
    """`run_tags_bench`'s report as a short table for people."""
    tags, machine = report["tags"], report["machine"]
    before, after = machine.get("load_average_before"), machine.get("load_average_after")
    lines = [
        f"modtag bench --tags: {report['workload']['images']} photos, models {report['workload']['models']}, "
        f"{tags['dtype']}, batches of {tags['batch_size']}; policy {tags['policy']}: taxonomy {tags['taxonomy']}, "
        f"{tags['texts']} tags in {tags['groups']} groups, ITM on the top {tags['top_k']} of each "
        f"({tags['itm_texts_per_image']} texts per image)",
        f"machine: {machine['processor']} ({machine['device']}, {machine['threads']} threads), "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
        + (f"; load average {before[0]:.1f} at the start, {after[0]:.1f} at the end" if before and after else ""),
        "",
        f"{'what':<58}{'once (s)':>10}{'s/image':>10}",
    ]
    features, check, naive = tags["text_features"], tags["tags_check"], tags["naive_itm_all"]
    vision = tags["vision_itm"]["seconds_per_image"] + tags["vision_itm"]["preprocess_seconds_per_image"]
    rows: list[tuple[str, float | None, float | None]] = [
        (f"text features of the {tags['texts']} tags (worker start)", features["seconds"], None),
        ("vision pass of the ITM model (with preprocessing)", None, vision),
        (
            f"tags check: ITC over {tags['texts']} tags + ITM on {tags['itm_texts_per_image']}",
            None,
            check["seconds_per_image"],
        ),
        ("  of which ITC", None, check["itc_seconds_per_image"]),
        ("  of which ITM re-rank", None, check["itm_seconds_per_image"]),
        (f"naive: ITM over all {naive['texts']} tags ({_photos(naive['images'])})", None, naive["seconds_per_image"]),
    ]
    for attribute in tags["attributes"]:
        label = f"attribute: {attribute['question']} ({attribute['candidates']} answers)"
        rows.append((label, None, attribute["seconds_per_image"]))
        rows.append(("  of which beyond the VQA vision pass", None, attribute["beyond_vision_seconds_per_image"]))
    for label, once, per_image in rows:
        shown_once = f"{once:>10.2f}" if once is not None else f"{'':>10}"
        shown_image = f"{per_image:>10.4f}" if per_image is not None else ""  # ITC takes well under a millisecond
        lines.append(f"{label:<58}{shown_once}{shown_image}")
    lines += [
        "",
        f"the naive way costs {naive['times_the_tags_check']:.0f}x the tags check per image",
        f"ITC's shortlist held {naive['shortlist_recall']:.0%} of the naive way's top {tags['top_k']} per group "
        "(random weights rank at random: a quality figure for real weights only); the shortlisted tags' ITM "
        f"scores are within {naive['max_abs_score_diff']:.1e} of the naive way's",
    ]
    return "\n".join(lines)


# Phases.


def _baseline(
    options: BenchOptions, requests: list[ImageRequest], log: Callable[[str], None]
) -> tuple[dict[str, Any], list[ImageOutput]]:
    from worker.baseline import run_baseline

    count = min(options.baseline_images or len(requests), len(requests))
    log(f"baseline float32: loading {options.models}")
    models = _load(options, torch.float32)
    outputs: list[ImageOutput] = []
    image_seconds: list[float] = []
    bar = tqdm(requests[:count], desc="baseline", unit="img", disable=not options.progress, leave=False)
    for request in bar:
        started = time.perf_counter()
        outputs.extend(
            run_baseline(models, [request], max_caption_tokens=CAPTION_TOKENS, min_caption_tokens=CAPTION_TOKENS)
        )
        _sync(models.device)
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
        "stages_s": _stage_totals(outputs),
    }
    return stats, outputs


def _engine_phase(
    options: BenchOptions,
    requests: list[ImageRequest],
    dtype: torch.dtype | str,
    log: Callable[[str], None],
    *,
    count: bool,
) -> tuple[dict[str, Any], list[ImageOutput], float]:
    models = _load(options, dtype)
    engine = Engine(
        models, max_caption_tokens=CAPTION_TOKENS, min_caption_tokens=CAPTION_TOKENS, max_batch=options.batch_size
    )

    def run_all() -> list[ImageOutput]:
        outputs: list[ImageOutput] = []
        for start in range(0, len(requests), options.batch_size):
            outputs.extend(engine.run(requests[start : start + options.batch_size]))
        return outputs

    # The first run warms up (and, at float32, counts the FLOPs); its outputs are the parity outputs.
    log(f"engine {_name(dtype)}: first run" + (" (counting FLOPs)" if count else ""))
    if count:
        flops, first = count_flops(run_all)
        outputs: list[ImageOutput] = first  # type: ignore[assignment]
    else:
        flops, outputs = 0.0, run_all()
    runs: list[tuple[float, list[ImageOutput]]] = []
    for _ in tqdm(range(options.repeat), desc=f"engine {_name(dtype)}", disable=not options.progress, leave=False):
        started = time.perf_counter()
        timed = run_all()
        runs.append((time.perf_counter() - started, timed))
    seconds, best_outputs = min(runs, key=lambda run: run[0])
    stats = {
        "dtype": models.dtype_name,
        "images": len(requests),
        "batch_size": options.batch_size,
        "seconds": seconds,
        "runs_s": [run[0] for run in runs],
        "images_per_s": len(requests) / seconds,
        "stages_s": _stage_totals(best_outputs),
        "techniques": {
            "fused_attention": all(has_fused_attention(loaded.model) for loaded in models.models.values()),
            "packed_linear": all(has_packed_linear(loaded.model) for loaded in models.models.values()),
            "int8_linear": all(has_int8_linear(loaded.model) for loaded in models.models.values()),
            "fast_decoding": engine.fast_decoding,
        },
    }
    return stats, outputs, flops  # the models go with this frame: the next phase has the memory


# Helpers.


@dataclass
class _TimedRuns:
    """The best of some timed engine runs over the same requests: its seconds, outputs and stage shares."""

    seconds: float
    runs: list[float]
    outputs: list[ImageOutput]

    @property
    def stages(self) -> dict[str, float]:
        """Per-image seconds of each engine stage in the best run."""
        return {stage: seconds / len(self.outputs) for stage, seconds in _stage_totals(self.outputs).items()}

    def stage(self, name: str) -> float:
        return self.stages.get(name, 0.0)


def _timed_runs(engine: Engine, requests: list[ImageRequest], options: BenchOptions) -> _TimedRuns:
    def run_all() -> list[ImageOutput]:
        outputs: list[ImageOutput] = []
        for start in range(0, len(requests), options.batch_size):
            outputs.extend(engine.run(requests[start : start + options.batch_size]))
        return outputs

    engine.run(requests[: options.batch_size])  # untimed: one-time kernel and token-cache work
    runs: list[tuple[float, list[ImageOutput]]] = []
    for _ in range(options.repeat):
        started = time.perf_counter()
        outputs = run_all()
        runs.append((time.perf_counter() - started, outputs))
    seconds, best = min(runs, key=lambda run: run[0])
    return _TimedRuns(seconds=seconds, runs=[run[0] for run in runs], outputs=best)


def _shortlist_agreement(
    query: TagQuery, tagged: Sequence[ImageOutput], naive: Sequence[ImageOutput]
) -> dict[str, float]:
    # How many of the naive way's best `top_k` tags per group (by ITM over every tag) the tags check's
    # ITC shortlist held, and how far the shortlisted tags' ITM scores are from the naive way's.
    held = wanted = 0
    diffs = [0.0]
    for output, reference in zip(tagged, naive, strict=True):
        scored = output.tags[query.key]
        diffs += [abs(score - reference.matches[text]) for text, score in scored.items()]
        for group in set(query.groups):
            members = [text for text, g in zip(query.texts, query.groups, strict=True) if g == group]
            best = sorted(members, key=lambda text: -reference.matches[text])[: query.top_k]
            held += sum(text in scored for text in best)
            wanted += len(best)
    return {"shortlist_recall": held / wanted if wanted else 1.0, "max_abs_score_diff": max(diffs)}


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"[{time.perf_counter() - self.started:6.0f}s] {message}", file=sys.stderr)


def _check(options: BenchOptions) -> None:
    for name in ("batch_size", "images", "repeat", "stack_jobs", "naive_images"):
        if getattr(options, name) < 1:
            raise ConfigError(f"bench: {name} must be at least 1", code="bench_invalid")
    if options.baseline_images is not None and options.baseline_images < 1:
        raise ConfigError("bench: baseline_images must be at least 1", code="bench_invalid")
    if options.tags and options.through_stack:
        raise ConfigError("bench: --tags and --through-stack are separate runs; pick one", code="bench_invalid")


def _load(options: BenchOptions, dtype: torch.dtype | str) -> LoadedModels:
    return load_models(options.models, ROLES, cache_dir=options.cache_dir, device=options.device, dtype=_name(dtype))


def _stage_totals(outputs: Sequence[ImageOutput]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for output in outputs:
        for stage, seconds in output.timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def _score_diffs(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> list[float]:
    diffs = []
    for output, ref in zip(outputs, reference, strict=False):
        diffs += [abs(output.probes[q] - ref.probes[q]) for q in ref.probes]
        diffs += [abs(output.matches[t] - ref.matches[t]) for t in ref.matches]
    return diffs


def _sdpa_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *_: Any, **__: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _linear_flops(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], *_: Any, **__: Any) -> int:
    # (..., K) x (N, K)^T: 2 K N per input row.
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


def _ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "processor": processor,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _photos(count: int) -> str:
    return f"{count} photo" + ("" if count == 1 else "s")


def _name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _fast_dtype(options: BenchOptions, device: torch.device) -> torch.dtype:
    """The float dtype of `engine_fast`; `int8` computes at the fast dtype around its int8 linear layers."""
    if options.dtype in ("auto", "int8"):
        return fast_dtype(device)
    return resolve_dtype(options.dtype, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # The loading bars of three models per phase would bury the bench's own progress.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _environment(values: dict[str, str], remove: Sequence[str] = ()) -> Iterator[None]:
    # The stack's children read their settings from MODTAG_* variables; set them for the run only.
    from core.settings import get_settings

    saved = {name: os.environ.get(name) for name in [*values, *remove]}
    os.environ.update(values)
    for name in remove:
        os.environ.pop(name, None)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def _run_stack(
    files: list[Path], log: Callable[[str], None], progress: bool, metrics_port: int
) -> tuple[float, int, int, dict[str, Any]]:
    import httpx

    from core.settings import get_settings
    from modtag.stack import Stack

    settings = get_settings()
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    with Stack(settings, port=free_port(), workers=1, temporary_key=True, quiet=True) as stack:
        headers = {"Authorization": f"Bearer {stack.admin_key}"} if stack.admin_key else {}
        # One job first: the worker's first batch pays one-time costs the engine's warm-up paid too.
        _judge(stack.api_url, files[:1], headers, progress=False)
        before = httpx.get(worker_metrics, timeout=10).text
        log(f"through the stack: {len(files)} jobs")
        started = time.perf_counter()
        statuses = _judge(stack.api_url, files, headers, progress=progress)
        seconds = time.perf_counter() - started
        after = httpx.get(worker_metrics, timeout=10).text
    done = statuses.count("done")
    return seconds, done, len(statuses) - done, stack_profile(before, after, seconds)


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


def _judge(
    api_url: str, files: list[Path], headers: dict[str, str], *, progress: bool, timeout_s: float = 1800
) -> list[str]:
    """Submit every file, then wait for each job's final status (polling gently: the API shares the cores)."""
    import httpx

    with httpx.Client(base_url=api_url, timeout=60, headers=headers) as client:
        ids = []
        for path in files:
            response = client.post(
                "/v1/jobs",
                files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                data={"policy": "moderation"},
            )
            if response.status_code not in (200, 202):
                raise ConfigError(
                    f"the bench's stack refused a job ({response.status_code}: {response.text[:200]})",
                    code="bench_stack_failed",
                )
            ids.append(str(response.json()["id"]))
        statuses = []
        deadline = time.monotonic() + timeout_s
        bar = tqdm(total=len(ids), desc="through the stack", unit="job", disable=not progress, leave=False)
        # Jobs finish roughly in order: asking about the oldest unfinished one only keeps the API idle.
        for job_id in ids:
            while (status := str(client.get(f"/v1/jobs/{job_id}").json().get("status"))) not in ("done", "failed"):
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the bench's stack did not finish job {job_id} within {timeout_s:.0f}s",
                        code="bench_stack_failed",
                    )
                time.sleep(0.2)
            statuses.append(status)
            bar.update(1)
        bar.close()
    return statuses
