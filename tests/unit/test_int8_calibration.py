"""int8 static input scales: calibrated on photos, kept in a file, close to the dynamic ones; bad files refused.

Real BLIP classes with tiny random weights (tests/support/models.py), the real loader, engine and command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn

from core.errors import ConfigError
from core.settings import Settings
from modtag.cli import main
from worker.families.blip.calibration import Int8Calibration, calibrate, fingerprint
from worker.families.blip.engine import INT8_STAGES, Engine, ImageRequest
from worker.families.blip.models import LoadedModels, load_models
from worker.families.blip.quant import (
    has_static_inputs,
    install_int8_linear,
    int8_layer_names,
    int8_linear_available,
    observe_inputs,
    set_input_ranges,
)

pytestmark = pytest.mark.skipif(not int8_linear_available(), reason="this PyTorch has no oneDNN int8 linear kernels")

ROLES = {"caption", "vqa", "itm"}
QUESTIONS = ["is there a gun in the picture?", "is there a person?"]
TEXTS = ["a photo of a gun", "a cat sleeping on a sofa", "coffee"]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "rocket")]


def _requests(photos: list[Image.Image]) -> list[ImageRequest]:
    return [ImageRequest(photo, probes=QUESTIONS, texts=TEXTS) for photo in photos]


def _engine(tiny_models_dir: Path, calibration: Int8Calibration | None = None) -> Engine:
    loaded = load_models("tiny-random", ROLES, cache_dir=tiny_models_dir.parent, dtype="int8")
    return Engine(loaded, max_caption_tokens=6, int8_stages=INT8_STAGES, int8_calibration=calibration)


@pytest.fixture(scope="module")
def calibration(tiny_models_dir: Path, photos: list[Image.Image]) -> Int8Calibration:
    return calibrate(_engine(tiny_models_dir), _requests(photos), batch_size=2, models="tiny-random")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_static_scale_is_close_to_the_dynamic_one_and_saturates_outside_its_range(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dynamic = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(dtype)
    static = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(dtype)
    static.load_state_dict(dynamic.state_dict())
    install_int8_linear(dynamic)
    install_int8_linear(static)
    inputs = torch.randn(4, 9, 64).to(dtype)
    with torch.inference_mode():
        with observe_inputs() as seen:
            expected = dynamic(inputs)  # observed while quantizing dynamically
        names = {module: name for name, module in dynamic.named_modules()}
        ranges = {names[module]: pair for module, pair in seen.items()}
        assert sorted(ranges) == int8_layer_names(dynamic) == ["0", "2"]
        assert set_input_ranges(static, ranges) == 2 and all(has_static_inputs(static[i]) for i in (0, 2))
        got = static(inputs)
        # One batch: the calibrated range is the dynamic one, so the results are the same up to rounding.
        assert (got.float() - expected.float()).abs().max().item() < 0.02 * expected.abs().max().item()
        # Twice the calibrated range: clipped to it, not wrapped around.
        clipped = static[0](inputs * 2)
        assert torch.isfinite(clipped.float()).all()


def test_static_scales_give_results_close_to_dynamic_ones(
    tiny_models_dir: Path, photos: list[Image.Image], calibration: Int8Calibration
) -> None:
    assert set(calibration.roles) == ROLES and calibration.images == len(photos)
    static = _engine(tiny_models_dir, calibration)
    layers = [m for loaded in static.models.models.values() for m in loaded.model.modules() if type(m) is nn.Linear]
    statics = sum(has_static_inputs(m) for m in layers)
    # Every int8 layer the engine calls got a static scale (the caption decoder's image-side key and value products
    # are folded into its queries, never called: they stay dynamic).
    assert statics == sum(len(ranges.ranges) for ranges in calibration.roles.values()) > 0.9 * len(layers) - 12
    requests = _requests(photos)
    got, expected = static.run(requests), _engine(tiny_models_dir).run(requests)
    diffs = [abs(a.probes[q] - b.probes[q]) for a, b in zip(got, expected, strict=True) for q in QUESTIONS]
    diffs += [abs(a.matches[t] - b.matches[t]) for a, b in zip(got, expected, strict=True) for t in TEXTS]
    # Measured on these models: max 0.06, mean 0.01 (int8 against float32 itself: max 0.05).
    assert max(diffs) < 0.15 and sum(diffs) / len(diffs) < 0.04


def test_a_calibration_file_round_trips_and_binds_to_its_weights(
    tiny_models_dir: Path, calibration: Int8Calibration, tmp_path: Path
) -> None:
    path = tmp_path / "int8.json"
    calibration.save(path)
    assert Int8Calibration.load(path) == calibration
    assert json.loads(path.read_text())["format"] == "modtag-int8-calibration"
    # A float32 load of the same weights has the same fingerprint as the bf16 load it was made on.
    float_models = load_models("tiny-random", ROLES, cache_dir=tiny_models_dir.parent)
    assert {role: fingerprint(m.model) for role, m in float_models.models.items()} == {
        role: ranges.fingerprint for role, ranges in calibration.roles.items()
    }
    # Other weights (one value changed) are refused, as is a role the file lacks.
    other: LoadedModels = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent, dtype="int8")
    with torch.no_grad():
        other.get("itm").model.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 1.0
    with pytest.raises(ConfigError) as error:
        Engine(other, int8_stages=INT8_STAGES, int8_calibration=calibration)
    assert error.value.code == "int8_calibration_mismatch" and "itm" in error.value.message
    partial = Int8Calibration(calibration.models, calibration.images, {"itm": calibration.roles["itm"]})
    with pytest.raises(ConfigError) as error:
        _engine(tiny_models_dir, partial)
    assert error.value.code == "int8_calibration_mismatch" and "caption" in error.value.message


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "int8_calibration_missing"),
        ("{not json", "int8_calibration_invalid"),
        ('{"format": "something-else", "version": 1, "roles": {}}', "int8_calibration_invalid"),
        ('{"format": "modtag-int8-calibration", "version": 99, "roles": {}}', "int8_calibration_invalid"),
        ('{"format": "modtag-int8-calibration", "version": 1, "roles": {}}', "int8_calibration_invalid"),
        (
            '{"format": "modtag-int8-calibration", "version": 1, '
            '"roles": {"itm": {"fingerprint": "x", "ranges": {"a": [2.0, 1.0]}}}}',
            "int8_calibration_invalid",
        ),
        (
            '{"format": "modtag-int8-calibration", "version": 1, '
            '"roles": {"itm": {"fingerprint": "x", "ranges": {"a": [0, "1"]}}}}',
            "int8_calibration_invalid",
        ),
    ],
)
def test_bad_calibration_files_are_refused_with_a_code(content: str | None, code: str, tmp_path: Path) -> None:
    path = tmp_path / "int8.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as error:
        Int8Calibration.load(path)
    assert error.value.code == code and str(path) in error.value.message


def test_the_command_calibrates_on_the_users_photos_and_the_worker_reads_the_file(
    tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.families.blip.adapter import build_engine

    monkeypatch.setenv("MODTAG_MODELS_CACHE_DIR", str(tiny_models_dir.parent))
    monkeypatch.setenv("MODTAG_DATA_DIR", str(tmp_path / "data"))
    for index, name in enumerate(("astronaut", "coffee")):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{index}.png")
    out = tmp_path / "int8.json"
    args = ["int8-calibrate", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--out", str(out)]
    assert main([*args, "--models", "tiny-random"]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert Int8Calibration.load(out).images == 2
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        dtype="int8",
        int8_stages="vision",
        int8_calibration=out,
    )
    engine = build_engine(settings, {"itm"})
    vision = [m for m in engine.models.get("itm").model.vision_model.modules() if type(m) is nn.Linear]
    assert engine.int8_stages == ("vision",) and all(has_static_inputs(m) for m in vision)
    # Not an image: a clear error naming the file, with the image check's own code.
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["int8-calibrate", str(tmp_path / "notes.png"), "--out", str(out), "--models", "tiny-random"]) != 0
    error = capsys.readouterr().err
    assert "notes.png" in error and "[image_" in error
