"""int8 calibration: each int8 layer's input range, observed once over photos, kept in a file the worker reads.

`calibrate` runs photos through an engine whose stages all run int8 (dynamically quantized) and records, per
linear layer of each model, the smallest and largest input value it saw (min/max over every call: every value
seen is representable, nothing is clipped). `Int8Calibration.save` writes them as JSON; `load` reads a file back
and `apply` hands the ranges to the int8 layers (`worker/families/blip/quant.py`), which then quantize their
inputs with that fixed scale in one pass instead of measuring each call's range first.

A file is bound to the weights it was measured on: each model's fingerprint (its linear layers' names, shapes
and first weights, rounded to bf16 so that a float32 and a bf16 load agree) must match the loaded model's,
else `apply` refuses it (`int8_calibration_mismatch`). Layers the photos never reached (none in the engine's
own paths) keep quantizing dynamically. `modtag int8-calibrate PHOTO... --out FILE` makes one from a user's own
photos; `MODTAG_INT8_CALIBRATION` names the file a worker loads.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import ConfigError
from worker.families.blip.models import LoadedModels
from worker.families.blip.quant import observe_inputs, set_input_ranges

if TYPE_CHECKING:
    from worker.families.blip.engine import Engine, ImageRequest

FORMAT = "modtag-int8-calibration"
VERSION = 1
# Weights per linear layer that enter a model's fingerprint: enough to tell two checkpoints of one shape apart.
_FINGERPRINT_WEIGHTS = 16


@dataclass(frozen=True)
class RoleRanges:
    """One model's fingerprint and the (low, high) input range of each of its int8 linear layers, by module name."""

    fingerprint: str
    ranges: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Int8Calibration:
    """Per model role, the input ranges of its int8 layers; `models` and `images` say what they were measured on."""

    models: str
    images: int
    roles: dict[str, RoleRanges]

    def save(self, path: Path) -> None:
        """Write the calibration as JSON (atomic: a reader never sees half a file)."""
        document = {
            "format": FORMAT,
            "version": VERSION,
            "models": self.models,
            "images": self.images,
            "method": "minmax",
            "roles": {
                role: {"fingerprint": ranges.fingerprint, "ranges": {k: list(v) for k, v in ranges.ranges.items()}}
                for role, ranges in self.roles.items()
            },
        }
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> Int8Calibration:
        """Read a calibration file; ConfigError `int8_calibration_missing` or `int8_calibration_invalid`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"int8 calibration file {path} does not exist (MODTAG_INT8_CALIBRATION); make one with "
                "`modtag int8-calibrate PHOTO... --out FILE`, or unset it to quantize dynamically",
                code="int8_calibration_missing",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _invalid(path, f"it cannot be read ({exc})") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid(path, f"it is not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls._parse(path, document)

    def apply(self, models: LoadedModels) -> int:
        """Give the loaded models' int8 layers these static input ranges; returns how many layers got one.

        ConfigError `int8_calibration_mismatch` when a loaded model is not the one calibrated (or is missing from
        the file). Call it after the int8 layers are installed.
        """
        for role, loaded in models.models.items():
            ranges = self.roles.get(role)
            if ranges is None:
                raise ConfigError(
                    f"the int8 calibration (of {self.models}) has no {role} model; calibrate again with every model "
                    "the worker loads (`modtag int8-calibrate`)",
                    code="int8_calibration_mismatch",
                )
            if ranges.fingerprint != fingerprint(loaded.model):
                raise ConfigError(
                    f"the int8 calibration was made on other {role} weights (of {self.models}) than the ones loaded "
                    f"({loaded.info['source']}); calibrate again on these models (`modtag int8-calibrate`)",
                    code="int8_calibration_mismatch",
                )
        return sum(set_input_ranges(loaded.model, self.roles[role].ranges) for role, loaded in models.models.items())

    @classmethod
    def _parse(cls, path: Path, document: Any) -> Int8Calibration:
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise _invalid(path, f"it is not a {FORMAT} file")
        if document.get("version") != VERSION:
            raise _invalid(path, f"its version {document.get('version')!r} is not {VERSION}; calibrate again")
        roles = document.get("roles")
        if not isinstance(roles, dict) or not roles:
            raise _invalid(path, "it holds no model's ranges")
        parsed: dict[str, RoleRanges] = {}
        for role, entry in roles.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint"), str):
                raise _invalid(path, f"model {role!r} has no fingerprint")
            raw = entry.get("ranges")
            if not isinstance(raw, dict):
                raise _invalid(path, f"model {role!r} has no ranges")
            ranges: dict[str, tuple[float, float]] = {}
            for name, pair in raw.items():
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or not all(isinstance(value, int | float) and math.isfinite(value) for value in pair)
                    or pair[0] > pair[1]
                ):
                    raise _invalid(path, f"layer {role}:{name} has no finite [low, high] range")
                ranges[name] = (float(pair[0]), float(pair[1]))
            parsed[str(role)] = RoleRanges(entry["fingerprint"], ranges)
        images = document.get("images")
        return cls(
            models=str(document.get("models", "")), images=images if isinstance(images, int) else 0, roles=parsed
        )


def calibrate(engine: Engine, requests: Sequence[ImageRequest], *, batch_size: int, models: str) -> Int8Calibration:
    """Observe the input range of every int8 layer of `engine`'s models while it runs `requests`.

    `engine` is a `worker.families.blip.engine.Engine` on int8 models with every stage at int8 (a stage left at
    bf16 has no int8 layers to observe).
    """
    loaded = engine.models
    with observe_inputs() as seen:
        for start in range(0, len(requests), batch_size):
            engine.run(requests[start : start + batch_size])
    roles: dict[str, RoleRanges] = {}
    for role, model in loaded.models.items():
        ranges = {name: seen[module] for name, module in model.model.named_modules() if module in seen}
        roles[role] = RoleRanges(fingerprint(model.model), ranges)
    return Int8Calibration(models=models, images=len(requests), roles=roles)


def fingerprint(model: nn.Module) -> str:
    """What identifies a model's weights to its calibration: its linear layers' names and shapes and first weights."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            digest.update(f"{name}:{tuple(module.weight.shape)};".encode())
            first = module.weight.detach().flatten()[:_FINGERPRINT_WEIGHTS].to("cpu", torch.bfloat16)
            digest.update(first.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def _invalid(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"int8 calibration file {path} is unusable: {why}; make it again with `modtag int8-calibrate`",
        code="int8_calibration_invalid",
    )
