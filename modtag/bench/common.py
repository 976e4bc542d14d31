"""What every `modtag bench` program shares: the fixed workload, the options, the comparisons of outputs, helpers."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from core.errors import ConfigError
from worker.families.blip.engine import Engine, ImageOutput, ImageRequest
from worker.families.blip.models import LoadedModels, fast_dtype, load_models, resolve_dtype

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

# The targets, checked in every report.
TARGET_SPEEDUP_FP32 = 3.0
TARGET_SPEEDUP_FAST = 25.0
TARGET_PARITY_FP32 = 1e-4
TARGET_FRACTION_OF_PEAK = 0.5
TARGET_STACK_RATIO = 0.9
TARGET_INT8_OVER_FAST = 1.5  # the whole workload, int8 where it pays against the fast dtype, interleaved medians

# A stage runs at int8 only where it is faster than at the fast dtype and keeps its outputs this close to float32's.
INT8_CAPTION_AGREEMENT = 0.75  # caption tokens identical to float32's
INT8_SCORE_DRIFT = 0.05  # max |difference| of a probe's or a match's probability

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
    peers: bool = False  # also the vision stage through OpenVINO and ONNX Runtime, where installed (peers.py)


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


def max_score_diff(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    """The largest |difference| over every probe and match score of the images both lists cover."""
    return max(_score_diffs(outputs, reference), default=0.0)


def max_probe_diff(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    """The largest |difference| of the probes' P(yes) alone."""
    diffs = [abs(o.probes[q] - r.probes[q]) for o, r in zip(outputs, reference, strict=False) for q in r.probes]
    return max(diffs, default=0.0)


def max_match_diff(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> float:
    """The largest |difference| of the ITM match probabilities alone (what `match` and `describe` thresholds see)."""
    diffs = [abs(o.matches[t] - r.matches[t]) for o, r in zip(outputs, reference, strict=False) for t in r.matches]
    return max(diffs, default=0.0)


def run_batches(engine: Engine, requests: Sequence[ImageRequest], batch_size: int) -> list[ImageOutput]:
    """The engine's outputs for `requests`, `batch_size` images per call."""
    outputs: list[ImageOutput] = []
    for start in range(0, len(requests), batch_size):
        outputs.extend(engine.run(requests[start : start + batch_size]))
    return outputs


def vision_outputs(engine: Engine, requests: Sequence[ImageRequest], batch_size: int) -> dict[str, torch.Tensor]:
    """The vision encoders' last hidden states (float32) for the first batch of `requests`, by role."""
    with torch.inference_mode():
        pixels = engine.preprocess(list(requests[:batch_size])).pixels
        return {role: engine.encode_images(role, values).float() for role, values in pixels.items()}


def vision_drift(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float | None:
    """The largest |difference| of the vision encoders' last hidden states, over the roles both ran."""
    roles = [role for role in outputs if role in reference]
    if not roles:
        return None
    return max(float((outputs[role] - reference[role]).abs().max()) for role in roles)


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


def _score_diffs(outputs: Sequence[ImageOutput], reference: Sequence[ImageOutput]) -> list[float]:
    diffs = []
    for output, ref in zip(outputs, reference, strict=False):
        diffs += [abs(output.probes[q] - ref.probes[q]) for q in ref.probes]
        diffs += [abs(output.matches[t] - ref.matches[t]) for t in ref.matches]
    return diffs


class Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"[{time.perf_counter() - self.started:6.0f}s] {message}", file=sys.stderr)


def check_options(options: BenchOptions) -> None:
    for name in ("batch_size", "images", "repeat", "stack_jobs", "naive_images"):
        if getattr(options, name) < 1:
            raise ConfigError(f"bench: {name} must be at least 1", code="bench_invalid")
    if options.baseline_images is not None and options.baseline_images < 1:
        raise ConfigError("bench: baseline_images must be at least 1", code="bench_invalid")
    if options.tags and options.through_stack:
        raise ConfigError("bench: --tags and --through-stack are separate runs; pick one", code="bench_invalid")


def load_roles(options: BenchOptions, dtype: torch.dtype | str) -> LoadedModels:
    return load_models(
        options.models, ROLES, cache_dir=options.cache_dir, device=options.device, dtype=dtype_name(dtype)
    )


def stage_totals(outputs: Sequence[ImageOutput]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for output in outputs:
        for stage, seconds in output.timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def engine_techniques(engine: Engine) -> dict[str, Any]:
    """Which of the engine's techniques are installed on every model (int8: on some linear layers of every model)."""
    from worker.families.blip.attention import has_fused_attention, has_native_attention
    from worker.families.blip.linear import has_packed_linear
    from worker.families.blip.quant import has_int8_linear

    models = [loaded.model for loaded in engine.models.models.values()]
    return {
        "fused_attention": all(has_fused_attention(model) for model in models),
        "native_attention": all(has_native_attention(model) for model in models),
        "packed_linear": all(has_packed_linear(model) for model in models),
        "int8_linear": all(has_int8_linear(model) for model in models),
        "int8_stages": list(engine.int8_stages),
        "fast_decoding": engine.fast_decoding,
    }


def ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "processor": processor,
        **({} if device.type == "cuda" else cpu_identity()),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# The matrix instructions that decide which dtype is fast on a CPU (AMX: Intel Xeon since Sapphire Rapids).
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_identity() -> dict[str, Any]:
    """The CPU's vendor, family and model numbers (AMD family 25 is Zen 3/4, 26 Zen 5) and its matrix flags."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor describes them all
    flags = set(fields.get("flags", "").split())
    family = f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return {"cpu_family": family, "matrix_flags": [flag for flag in MATRIX_FLAGS if flag in flags]}


def load_average() -> list[float] | None:
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


def count_photos(count: int) -> str:
    return f"{count} photo" + ("" if count == 1 else "s")


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def bench_fast_dtype(options: BenchOptions, device: torch.device) -> torch.dtype:
    """The float dtype of `engine_fast`; `int8` computes at the fast dtype around its int8 linear layers."""
    if options.dtype in ("auto", "int8"):
        return fast_dtype(device)
    return resolve_dtype(options.dtype, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    # The loading bars of three models per phase would bury the bench's own progress.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
