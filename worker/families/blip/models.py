"""The three BLIP models (caption, VQA, ITM): loading from a preset, a local directory or a random build.

Real and random weights go through the same `from_pretrained` path: a random build is an ordinary
`save_pretrained` directory plus a marker file that labels it random in every decision.
Nothing here touches CUDA at import time (Celery forks worker processes after importing).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    PreTrainedModel,
)

from core.errors import ConfigError, ModelError
from worker.families.blip.presets import (
    MODEL_PRESETS,
    RANDOM_BUILD_VERSION,
    RANDOM_MARKER,
    RANDOM_PRESETS,
    ROLES,
    ModelRole,
)
from worker.families.blip.quant import int8_linear_available

MODEL_CLASSES: dict[ModelRole, type[PreTrainedModel]] = {
    "caption": BlipForConditionalGeneration,
    "vqa": BlipForQuestionAnswering,
    "itm": BlipForImageTextRetrieval,
}

# What a broken or foreign checkpoint raises while loading (a missing file is an OSError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
# A checkpoint missing more than this share of its parameter tensors is the wrong kind of model.
_MAX_MISSING_SHARE = 0.05

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One role's model and processor, with what the decision records about them."""

    role: ModelRole
    model: PreTrainedModel
    processor: BlipProcessor
    info: dict[str, Any]
    load_seconds: float


@dataclass(frozen=True)
class LoadedModels:
    """The models a worker loaded, by role, all on one device and in one dtype."""

    models: dict[ModelRole, LoadedModel]
    device: torch.device
    dtype: torch.dtype  # what activations, attention and norms compute in
    int8: bool = False  # the engine runs its int8 stages on int8 linear layers (`worker/families/blip/quant.py`)

    def __contains__(self, role: object) -> bool:
        return role in self.models

    def get(self, role: ModelRole) -> LoadedModel:
        """The model of `role`; ModelError if it was not loaded."""
        try:
            return self.models[role]
        except KeyError:
            loaded = ", ".join(self.models) or "none"
            raise ModelError(
                f"the {role} model is not loaded (loaded: {loaded}); load it with the policy that needs it",
                code="model_not_loaded",
            ) from None

    @property
    def random(self) -> bool:
        """True if any loaded model has random weights: its results mean nothing."""
        return any(loaded.info["random"] for loaded in self.models.values())

    @property
    def dtype_name(self) -> str:
        """The dtype a decision records: `int8` for int8 linear layers, else the compute dtype."""
        return "int8" if self.int8 else _dtype_name(self.dtype)

    @property
    def load_seconds(self) -> dict[ModelRole, float]:
        return {role: loaded.load_seconds for role, loaded in self.models.items()}

    def describe(self) -> dict[str, Any]:
        """What a decision records in its `models` field: which weights, dtype and device."""
        return {
            "random": self.random,
            "device": str(self.device),
            "dtype": self.dtype_name,
            "roles": {role: dict(loaded.info) for role, loaded in self.models.items()},
        }


def load_models(
    models: str,
    roles: set[str] | frozenset[str],
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
) -> LoadedModels:
    """Load the models of `roles` from a preset or a directory, in eval mode, on `device` in `dtype`.

    Hub ids are looked up in the Hugging Face cache first and downloaded only if missing (never when
    `offline`). Raises ModelError (`model_unavailable`, `model_dir_incomplete`, `model_invalid`) or
    ConfigError (unknown preset, role, device or dtype).

    `int8` (CPUs only) loads at the fast dtype (bf16 where the CPU computes it); the engine then quantizes the
    linear layers of the stages it runs at int8 (`Engine(int8_stages=...)`, `worker/families/blip/quant.py`).
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ConfigError(
            f"unknown model role(s) {sorted(unknown)}; the roles are {', '.join(ROLES)}", code="model_role_unknown"
        )
    wanted: tuple[ModelRole, ...] = tuple(role for role in ROLES if role in roles)
    sources = resolve_model_dirs(models, cache_dir, roles=wanted)
    torch_device = resolve_device(device)
    int8 = dtype == "int8"
    if int8:
        _check_int8(torch_device)
    torch_dtype = fast_dtype(torch_device) if int8 else resolve_dtype(dtype, torch_device)
    loaded = {
        role: _load_role(role, sources[role], torch_device, torch_dtype, offline=offline, int8=int8) for role in wanted
    }
    return LoadedModels(models=loaded, device=torch_device, dtype=torch_dtype, int8=int8)


def resolve_model_dirs(
    models: str, cache_dir: Path, *, roles: tuple[ModelRole, ...] | None = None
) -> dict[ModelRole, str | Path]:
    """Where each role's weights come from: a hub id (str) or a local directory (Path).

    `tiny-random` and `random-base` are built into `cache_dir` on first use and reused afterwards.
    Only `roles` (default: all) are checked.
    """
    wanted = ROLES if roles is None else roles
    name = models.strip()
    if not wanted and name in RANDOM_PRESETS:
        return {}  # nothing to load: do not build
    if name in MODEL_PRESETS:
        return {role: MODEL_PRESETS[name][role] for role in wanted}
    if name in RANDOM_PRESETS:
        size = RANDOM_PRESETS[name]
        from worker.families.blip.random_build import build_random_models

        root = build_random_models(Path(cache_dir) / f"{name}-v{RANDOM_BUILD_VERSION}-seed0", size)
        return {role: root / role for role in wanted}
    root = Path(name).expanduser()
    if not name or not root.is_dir():
        presets = ", ".join([*MODEL_PRESETS, *RANDOM_PRESETS])
        raise ConfigError(
            f"models {name!r} is neither a preset ({presets}) nor an existing directory", code="models_unknown"
        )
    dirs: dict[ModelRole, str | Path] = {}
    for role in wanted:
        role_dir = root / role
        if not (role_dir / "config.json").is_file():
            raise ModelError(
                f"{root} has no {role}/ model folder (or it lacks config.json): a models directory needs "
                f"caption/, vqa/ and itm/ folders, each written by save_pretrained (model and processor)",
                code="model_dir_incomplete",
            )
        dirs[role] = role_dir
    return dirs


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device if there is one, else the CPU."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:1...)", code="device_invalid"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here", code="device_unavailable")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA with bf16 support, float16 on older CUDA, float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}, int8", code="dtype_invalid"
        ) from None


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype the hardware computes natively: bf16 on bf16 CPUs and GPUs, fp16 on older GPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


# Helpers.

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_int8(device: torch.device) -> None:
    if device.type != "cpu":
        raise ConfigError(
            f"dtype int8 runs on CPUs only, not on {device}; use bfloat16 or float16 there", code="dtype_unsupported"
        )
    if not int8_linear_available():
        raise ConfigError(
            "dtype int8 needs PyTorch's oneDNN int8 linear kernels, which this build lacks; use bfloat16 or float32",
            code="dtype_unsupported",
        )


def _load_role(
    role: ModelRole, source: str | Path, device: torch.device, dtype: torch.dtype, *, offline: bool, int8: bool = False
) -> LoadedModel:
    started = time.perf_counter()
    local = isinstance(source, Path)
    model_class = MODEL_CLASSES[role]
    try:
        try:
            processor, model, loading_info = _from_pretrained(model_class, source, dtype, local_only=local or offline)
        except OSError:
            if local or offline:
                raise
            # Not in the Hugging Face cache: download it (the cache is tried first so that a worker
            # start never waits on the network for weights it already has).
            processor, model, loading_info = _from_pretrained(model_class, source, dtype, local_only=False)
    except _LOAD_ERRORS as exc:
        raise _load_error(role, source, exc) from exc
    _check_complete(role, source, model, loading_info)
    model.to(device)  # type: ignore[arg-type]  # transformers wraps Module.to, which confuses mypy
    model.eval()
    random = local and (Path(source) / RANDOM_MARKER).is_file()
    info: dict[str, Any] = {
        "role": role,
        "source": str(source),
        "random": random,
        "dtype": "int8" if int8 else _dtype_name(dtype),
        "device": str(device),
    }
    return LoadedModel(
        role=role, model=model, processor=processor, info=info, load_seconds=time.perf_counter() - started
    )


def _from_pretrained(
    model_class: type[PreTrainedModel], source: str | Path, dtype: torch.dtype, *, local_only: bool
) -> tuple[BlipProcessor, PreTrainedModel, dict[str, Any]]:
    # The PIL image processor explicitly: BlipImageProcessor needs torchvision and otherwise falls back
    # to this very class with a warning; naming it gives the same class for every checkpoint.
    image_processor = BlipImageProcessorPil.from_pretrained(source, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    loaded = model_class.from_pretrained(source, dtype=dtype, local_files_only=local_only, output_loading_info=True)
    model, loading_info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    return processor, model, loading_info


def _load_error(role: ModelRole, source: str | Path, exc: BaseException) -> ModelError:
    if isinstance(source, Path):
        return ModelError(
            f"cannot load the {role} model from {source}: {exc}. The folder must be written by "
            f"save_pretrained (config.json, weights, tokenizer and image processor files)",
            code="model_invalid",
        )
    if not isinstance(exc, OSError):
        return ModelError(
            f"the {role} model {source} in the Hugging Face cache cannot be loaded ({exc}); "
            f"delete it from the cache (`hf cache delete`) and download it again",
            code="model_invalid",
        )
    return ModelError(
        f"the {role} model {source} is not in the Hugging Face cache and could not be downloaded ({exc}). "
        f"Run once on a machine with internet access, or `hf download {source}`, or set "
        f"MODTAG_MODELS to a local directory with caption/, vqa/ and itm/ folders; to run offline "
        f"without real weights use --models tiny-random",
        code="model_unavailable",
    )


def _check_complete(role: ModelRole, source: str | Path, model: PreTrainedModel, loading_info: dict[str, Any]) -> None:
    # A caption checkpoint loaded as a VQA model "works" with a randomly initialised text encoder:
    # refuse that; tolerate (and log) a few missing tensors, which some hub checkpoints have.
    missing = list(loading_info.get("missing_keys") or [])
    if not missing:
        return
    total = len(model.state_dict())
    if len(missing) > _MAX_MISSING_SHARE * total:
        raise ModelError(
            f"{source} lacks {len(missing)} of the {total} weight tensors of a {type(model).__name__} "
            f"(e.g. {missing[0]}): it is not a BLIP {role} checkpoint",
            code="model_invalid",
        )
    logger.warning("%s model %s: %d weight tensors missing: %s", role, source, len(missing), missing[:5])


@lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
