"""Model presets, random builds and loading: real classes and real files, no network (the hub cannot be reached)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
)

from core.errors import ConfigError, ModelError
from worker.families.blip import models, random_build
from worker.families.blip.models import (
    fast_dtype,
    load_models,
    resolve_device,
    resolve_dtype,
    resolve_model_dirs,
)
from worker.families.blip.presets import RANDOM_MARKER
from worker.families.blip.random_build import build_random_models


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_tiny_build_is_deterministic_and_marked_random(tmp_path: Path) -> None:
    first = build_random_models(tmp_path / "a", "tiny", seed=0)
    second = build_random_models(tmp_path / "b", "tiny", seed=0)
    other_seed = build_random_models(tmp_path / "c", "tiny", seed=1)

    assert _files(first) == _files(second)
    assert _files(first)["vqa/model.safetensors"] != _files(other_seed)["vqa/model.safetensors"]
    for role in ("caption", "vqa", "itm"):
        assert (first / role / "config.json").is_file()
        assert json.loads((first / role / RANDOM_MARKER).read_text())["random"] is True
    marker = json.loads((first / RANDOM_MARKER).read_text())
    assert marker["random"] is True and marker["size"] == "tiny"
    # Nothing left over from the atomic build.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_build_reuses_its_own_result_and_refuses_foreign_directories(tmp_path: Path) -> None:
    dest = build_random_models(tmp_path / "m", "tiny")
    stamp = (dest / "vqa" / "model.safetensors").stat().st_mtime_ns
    assert build_random_models(dest, "tiny") == dest
    assert (dest / "vqa" / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(ModelError) as other_seed:
        build_random_models(dest, "tiny", seed=7)
    assert other_seed.value.code == "model_dir_conflict"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ModelError) as refused:
        build_random_models(foreign, "tiny")
    assert refused.value.code == "model_dir_conflict"
    assert (foreign / "notes.txt").read_text() == "mine"

    with pytest.raises(ConfigError):
        build_random_models(tmp_path / "huge", "huge")  # type: ignore[arg-type]


def test_build_losing_a_race_keeps_the_winners_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process renames its finished build into place while this one is still writing.
    dest = tmp_path / "m"
    write = random_build._write_random_models

    def write_while_another_process_wins(root: Path, *args: object) -> None:
        write(root, *args)  # type: ignore[arg-type]
        shutil.copytree(root, dest)

    monkeypatch.setattr(random_build, "_write_random_models", write_while_another_process_wins)
    assert build_random_models(dest, "tiny") == dest
    assert (dest / RANDOM_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_by_path_gives_the_real_classes_labelled_random(tiny_models_dir: Path) -> None:
    loaded = load_models(str(tiny_models_dir), {"caption", "vqa", "itm"}, cache_dir=tiny_models_dir.parent)

    classes = {role: type(loaded.get(role).model) for role in ("caption", "vqa", "itm")}
    assert classes == {
        "caption": BlipForConditionalGeneration,
        "vqa": BlipForQuestionAnswering,
        "itm": BlipForImageTextRetrieval,
    }
    for role in ("caption", "vqa", "itm"):
        one = loaded.get(role)
        assert not one.model.training
        assert one.model.dtype == torch.float32
        assert one.info == {
            "role": role,
            "source": str(tiny_models_dir / role),
            "random": True,
            "dtype": "float32",
            "device": "cpu",
        }
        assert one.load_seconds > 0
        processor = one.processor
        assert type(processor) is BlipProcessor
        assert type(processor.image_processor) is BlipImageProcessorPil
        image_size = one.model.config.vision_config.image_size
        size = processor.image_processor.size
        assert (size["height"], size["width"]) == (image_size, image_size)
        tokenizer = processor.tokenizer
        text_config = one.model.config.text_config
        # The Salesforce layout: [DEC] bos after the WordPiece vocabulary, then [ENC]; pad 0, sep 102.
        assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == text_config.bos_token_id
        assert tokenizer.convert_tokens_to_ids("[ENC]") == tokenizer.bos_token_id + 1 == len(tokenizer) - 1
        assert (tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id) == (0, 102, 101)
        assert text_config.sep_token_id == 102 and text_config.pad_token_id == 0
        assert text_config.vocab_size == len(tokenizer)

    described = loaded.describe()
    assert described["random"] is True
    assert described["device"] == "cpu" and described["dtype"] == "float32"
    assert set(described["roles"]) == {"caption", "vqa", "itm"}
    assert set(loaded.load_seconds) == {"caption", "vqa", "itm"}


def test_random_vocabulary_has_real_words_and_tokenizes_anything(tiny_models_dir: Path) -> None:
    tokenizer = load_models("tiny-random", {"vqa"}, cache_dir=tiny_models_dir.parent).get("vqa").processor.tokenizer
    for word in ("yes", "no", "a", "the", "photo", "of", "is", "there", "in", "picture", "gun", "weapon", "knife"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    tokens = tokenizer.tokenize("Is there a Zyzzyva-42 in the picture?!")
    assert "[UNK]" not in tokens
    assert tokens[:3] == ["is", "there", "a"]
    assert tokenizer.convert_tokens_to_string(tokens).replace(" ", "") == "isthereazyzzyva-42inthepicture?!"
    assert len(random_build._random_tokenizer("base")) == 30524  # bert-base-uncased + [DEC] + [ENC]


def test_only_the_requested_roles_are_loaded(tiny_models_dir: Path) -> None:
    loaded = load_models("tiny-random", {"vqa"}, cache_dir=tiny_models_dir.parent)
    assert "vqa" in loaded and "caption" not in loaded and "itm" not in loaded
    assert set(loaded.models) == {"vqa"}
    with pytest.raises(ModelError) as missing:
        loaded.get("caption")
    assert missing.value.code == "model_not_loaded"
    assert "vqa" in missing.value.message

    with pytest.raises(ConfigError) as unknown:
        load_models("tiny-random", {"vqa", "ocr"}, cache_dir=tiny_models_dir.parent)
    assert unknown.value.code == "model_role_unknown"


def test_hub_model_not_cached_and_no_network_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing_id = "modtag-tests/no-such-blip-model"
    monkeypatch.setitem(models.MODEL_PRESETS, "base", {"caption": missing_id, "vqa": missing_id, "itm": missing_id})
    connections: list[object] = []  # offline means no attempt at the network (none to wait on), not a quick one
    monkeypatch.setattr(socket.socket, "connect", lambda _, address: connections.append(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *_, **__: connections.append(host) or [])
    with pytest.raises(ModelError) as error:
        load_models("base", {"vqa"}, cache_dir=tmp_path, offline=True)
    assert connections == []
    assert error.value.code == "model_unavailable"
    message = error.value.message
    for hint in (missing_id, "internet", f"hf download {missing_id}", "MODTAG_MODELS", "tiny-random"):
        assert hint in message
    assert resolve_model_dirs("large", tmp_path)["vqa"] == "Salesforce/blip-vqa-capfilt-large"


def test_directory_missing_a_role_folder(tiny_models_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    shutil.copytree(tiny_models_dir, partial)
    shutil.rmtree(partial / "vqa")

    with pytest.raises(ModelError) as error:
        load_models(str(partial), {"caption", "vqa"}, cache_dir=tmp_path)
    assert error.value.code == "model_dir_incomplete"
    assert "vqa/" in error.value.message and str(partial) in error.value.message
    # The roles that are there still load on their own.
    assert set(load_models(str(partial), {"caption"}, cache_dir=tmp_path).models) == {"caption"}


def test_wrong_or_damaged_checkpoints_are_refused(tiny_models_dir: Path, tmp_path: Path) -> None:
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_models_dir, swapped)
    shutil.rmtree(swapped / "vqa")
    shutil.copytree(tiny_models_dir / "caption", swapped / "vqa")  # a caption model has no question encoder
    with pytest.raises(ModelError) as wrong:
        load_models(str(swapped), {"vqa"}, cache_dir=tmp_path)
    assert wrong.value.code == "model_invalid"
    assert "not a BLIP vqa checkpoint" in wrong.value.message

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_models_dir, damaged)
    weights = damaged / "itm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError) as truncated:
        load_models(str(damaged), {"itm"}, cache_dir=tmp_path)
    assert truncated.value.code == "model_invalid"

    (damaged / "caption" / "config.json").write_text("{not json")
    with pytest.raises(ModelError) as bad_config:
        load_models(str(damaged), {"caption"}, cache_dir=tmp_path)
    assert bad_config.value.code == "model_invalid"
    assert str(damaged / "caption") in bad_config.value.message


def test_unknown_preset_or_missing_directory(tmp_path: Path) -> None:
    for value in ("bse", str(tmp_path / "nowhere"), "   "):
        with pytest.raises(ConfigError) as error:
            resolve_model_dirs(value, tmp_path)
        assert error.value.code == "models_unknown"


def test_dtype_and_device_resolution(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert resolve_device("CPU") == cpu
    with pytest.raises(ConfigError) as bad_device:
        resolve_device("gpu-please")
    assert bad_device.value.code == "device_invalid"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as no_cuda:
            resolve_device("cuda")
        assert no_cuda.value.code == "device_unavailable"

    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError) as bad_dtype:
        resolve_dtype("float8", cpu)
    assert bad_dtype.value.code == "dtype_invalid"

    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: True)
    assert fast_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: False)
    assert fast_dtype(cpu) == torch.float32
    assert fast_dtype(torch.device("meta")) == torch.float32

    loaded = load_models("tiny-random", {"itm"}, cache_dir=tiny_models_dir.parent, dtype="bfloat16")
    assert loaded.get("itm").model.dtype == torch.bfloat16
    assert loaded.describe()["roles"]["itm"]["dtype"] == "bfloat16"


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    models._cpu_has_bf16.cache_clear()
    try:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        capability = torch.backends.cpu.get_cpu_capability().upper()
        expected = "avx512_bf16" in flags or "amx_bf16" in flags or "AMX" in capability or "BF16" in capability
        assert models._cpu_has_bf16() is expected
    finally:
        models._cpu_has_bf16.cache_clear()
