"""The three BLIP models (caption, VQA, ITM): presets, local directories, locally built random weights, loading.

Real and random weights go through the same `from_pretrained` path: a random build is an ordinary
`save_pretrained` directory plus a marker file that labels it random in every decision.
Nothing here touches CUDA at import time (Celery forks worker processes after importing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    PreTrainedModel,
)

from core.errors import ConfigError, ModelError
from worker.families.blip.quant import install_int8_linear, int8_linear_available
from worker.families.blip.wordlist import COMMON_WORDS, SUFFIX_PIECES

Role = Literal["caption", "vqa", "itm"]
RandomSize = Literal["tiny", "base"]

ROLES: tuple[Role, ...] = get_args(Role)

MODEL_PRESETS: dict[str, dict[Role, str]] = {
    "base": {
        "caption": "Salesforce/blip-image-captioning-base",
        "vqa": "Salesforce/blip-vqa-base",
        "itm": "Salesforce/blip-itm-base-coco",
    },
    "large": {
        "caption": "Salesforce/blip-image-captioning-large",
        "vqa": "Salesforce/blip-vqa-capfilt-large",
        "itm": "Salesforce/blip-itm-large-coco",
    },
}
"""Hugging Face hub ids per role."""

RANDOM_PRESETS: dict[str, RandomSize] = {"tiny-random": "tiny", "random-base": "base"}
"""Presets built locally with random weights: for tests and offline smoke runs, and for benchmarks."""

RANDOM_MARKER = "modtag-random.json"

MODEL_CLASSES: dict[Role, type[PreTrainedModel]] = {
    "caption": BlipForConditionalGeneration,
    "vqa": BlipForQuestionAnswering,
    "itm": BlipForImageTextRetrieval,
}

# What a broken or foreign checkpoint raises while loading (a missing file is an OSError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
# Bump when the recipe of the random builds changes, so cached builds are not reused.
_BUILD_VERSION = 1
# A checkpoint missing more than this share of its parameter tensors is the wrong kind of model.
_MAX_MISSING_SHARE = 0.05

logger = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class LoadedModel:
    """One role's model and processor, with what the decision records about them."""

    role: Role
    model: PreTrainedModel
    processor: BlipProcessor
    info: dict[str, Any]
    load_seconds: float


@dataclass(frozen=True)
class LoadedModels:
    """The models a worker loaded, by role, all on one device and in one dtype."""

    models: dict[Role, LoadedModel]
    device: torch.device
    dtype: torch.dtype  # what activations, attention and norms compute in
    int8: bool = (
        False  # linear layers on int8 weights and dynamically quantized inputs (`worker/families/blip/quant.py`)
    )

    def __contains__(self, role: object) -> bool:
        return role in self.models

    def get(self, role: Role) -> LoadedModel:
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
    def load_seconds(self) -> dict[Role, float]:
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

    `int8` (CPUs only) loads at the fast dtype (bf16 where the CPU computes it) and then quantizes every
    linear layer (`worker/families/blip/quant.py`); the rest of the models computes at that dtype.
    """
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ConfigError(
            f"unknown model role(s) {sorted(unknown)}; the roles are {', '.join(ROLES)}", code="model_role_unknown"
        )
    wanted: tuple[Role, ...] = tuple(role for role in ROLES if role in roles)
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
    models: str, cache_dir: Path, *, roles: tuple[Role, ...] | None = None
) -> dict[Role, str | Path]:
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
        root = build_random_models(Path(cache_dir) / f"{name}-v{_BUILD_VERSION}-seed0", size)
        return {role: root / role for role in wanted}
    root = Path(name).expanduser()
    if not name or not root.is_dir():
        presets = ", ".join([*MODEL_PRESETS, *RANDOM_PRESETS])
        raise ConfigError(
            f"models {name!r} is neither a preset ({presets}) nor an existing directory", code="models_unknown"
        )
    dirs: dict[Role, str | Path] = {}
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


def build_random_models(dest: Path, size: RandomSize, seed: int = 0) -> Path:
    """Build randomly initialised caption, VQA and ITM models with the real classes into `dest`.

    No network: the tokenizer is a BERT WordPiece tokenizer over a generated vocabulary with the
    `[DEC]` bos and `[ENC]` tokens of the Salesforce checkpoints. Deterministic per (size, seed).
    Atomic: built in a temporary directory beside `dest` and renamed, so concurrent builders are safe
    and a crash never leaves a half-built `dest`. An existing build with the same recipe is reused.
    """
    if size not in get_args(RandomSize):
        raise ConfigError(f"random model size must be tiny or base, not {size!r}", code="model_size_unknown")
    dest = Path(dest)
    marker = {"random": True, "size": size, "seed": seed, "version": _BUILD_VERSION}
    if dest.exists():
        _check_existing_build(dest, marker)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".building", dir=dest.parent))
    try:
        # Weight init draws from torch's global RNG: builds in one process take turns.
        with _BUILD_LOCK:
            _write_random_models(tmp, size, seed, marker)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished first: its build is identical, keep it.
            if not (dest / RANDOM_MARKER).is_file():
                raise
            _check_existing_build(dest, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


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

# Specials at the ids of bert-base-uncased, which the BLIP checkpoints use: pad 0, unk 100, cls 101, sep 102.
_HEAD_TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_VOCAB_SIZE = 30522
_DEC_TOKEN = "[DEC]"
_ENC_TOKEN = "[ENC]"
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


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
    role: Role, source: str | Path, device: torch.device, dtype: torch.dtype, *, offline: bool, int8: bool = False
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
    if int8:
        install_int8_linear(model)
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


def _load_error(role: Role, source: str | Path, exc: BaseException) -> ModelError:
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


def _check_complete(role: Role, source: str | Path, model: PreTrainedModel, loading_info: dict[str, Any]) -> None:
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


def _check_existing_build(dest: Path, marker: dict[str, Any]) -> None:
    try:
        found = json.loads((dest / RANDOM_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    if found != marker:
        raise ModelError(
            f"{dest} exists but is not a random model build of {marker} (found {found}); remove it to rebuild",
            code="model_dir_conflict",
        )


def _write_random_models(root: Path, size: RandomSize, seed: int, marker: dict[str, Any]) -> None:
    tokenizer = _random_tokenizer(size)
    dims = _BASE_DIMS if size == "base" else _TINY_DIMS
    image_processor = BlipImageProcessorPil(size={"height": dims["image_size"], "width": dims["image_size"]})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = _random_config(dims, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    marker_text = json.dumps(marker, sort_keys=True) + "\n"
    for index, role in enumerate(ROLES):
        # The global RNG drives transformers' weight init; fork it so callers' random state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * len(ROLES) + index)
            model = MODEL_CLASSES[role](config)
        model.eval()
        model.save_pretrained(root / role)
        processor.save_pretrained(root / role)
        (root / role / RANDOM_MARKER).write_text(marker_text, encoding="utf-8")
        del model
    (root / RANDOM_MARKER).write_text(marker_text, encoding="utf-8")


# Real base sizes (Salesforce/blip-*-base); tiny ones with weights initialised wider than BERT's 0.02
# so that random outputs differ visibly between images and texts (tests compare them).
_BASE_DIMS: dict[str, Any] = {
    "hidden": 768, "intermediate": 3072, "layers": 12, "heads": 12, "image_size": 384, "patch": 16,
    "projection": 512, "text_projection": 768, "itm_hidden": 256, "init": 0.02,
}  # fmt: skip
_TINY_DIMS: dict[str, Any] = {
    "hidden": 32, "intermediate": 64, "layers": 2, "heads": 4, "image_size": 32, "patch": 8,
    "projection": 32, "text_projection": 32, "itm_hidden": 16, "init": 0.3,
}  # fmt: skip


def _random_config(dims: dict[str, Any], *, vocab_size: int, bos_token_id: int) -> BlipConfig:
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": dims["hidden"],
        "encoder_hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "projection_dim": dims["text_projection"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "max_position_embeddings": 512,
        "initializer_range": dims["init"],
        "bos_token_id": bos_token_id,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "sep_token_id": 102,
    }
    vision_config = {
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "projection_dim": dims["projection"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "image_size": dims["image_size"],
        "patch_size": dims["patch"],
        "initializer_range": dims["init"],
    }
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=dims["projection"],
        image_text_hidden_size=dims["itm_hidden"],
        initializer_range=dims["init"],
    )


def _random_tokenizer(size: RandomSize) -> BertTokenizer:
    vocab = _random_vocab(size)
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token=_DEC_TOKEN,
        additional_special_tokens=[_ENC_TOKEN],
        model_max_length=512,
    )
    if tokenizer.convert_tokens_to_ids(_DEC_TOKEN) != len(vocab):
        raise RuntimeError("the [DEC] token must follow the WordPiece vocabulary, as in the BLIP checkpoints")
    return tokenizer


def _random_vocab(size: RandomSize) -> list[str]:
    # Single characters and their "##" continuations make every text tokenizable (like BERT's vocab).
    characters = [*_PUNCTUATION, *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
    vocab = list(_HEAD_TOKENS)
    vocab += characters
    vocab += [f"##{char}" for char in characters]
    seen = set(vocab)
    for word in (*COMMON_WORDS, *SUFFIX_PIECES):
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    if size == "base":
        vocab += [f"[unused{index}]" for index in range(99, 99 + _BERT_VOCAB_SIZE - len(vocab))]
    return vocab


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
