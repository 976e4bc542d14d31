"""The inference service on real tiny random BLIP models: policy requirements in, ModelOutputs out, one model thread."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from core import metrics
from core.hashes import BankMatch
from core.settings import Settings
from policies import ModelOutputs, decide, load_policies
from tests.support.photos import photo_bytes
from worker.inference import InferenceService


def observations(model: str, stage: str) -> float:
    """How many batches modtag_model_inference_seconds has seen for (model, stage) so far."""
    for family in metrics.MODEL_INFERENCE.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels == {"model": model, "stage": stage}:
                return sample.value
    return 0.0


def test_a_batch_gives_policy_outputs_and_reports_each_stage_once(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        batch_max_images=2,
        batch_wait_ms=60_000,  # the batch leaves when both images are in, never on the window
    )
    policy = load_policies([])["moderation"]
    needs = policy.requirements({})
    images = [Image.open(io.BytesIO(photo_bytes(name))).convert("RGB") for name in ("coffee", "chelsea")]
    stages = [("all", "preprocess"), ("all", "vision"), ("caption", "caption"), ("vqa", "probes"), ("itm", "matches")]
    before = {stage: observations(*stage) for stage in [*stages, ("vqa", "answers"), ("itm", "tags")]}
    with InferenceService(settings) as inference:
        inference.start(needs.model_capabilities)
        assert {"caption", "vqa", "itm"} <= set(inference.describe()["roles"]) and inference.describe()[
            "random"
        ] is True
        outputs = inference.infer_all([(image, needs) for image in images])
    assert len(outputs) == 2
    for output in outputs:
        assert isinstance(output.caption, str)
        assert set(output.probes) == set(needs.probes) and set(output.matches) == set(needs.texts)
        # The models compute no bank matches: the worker's hash step adds those (here: in no bank).
        unbanked = ModelOutputs(banks={query.bank: BankMatch(query.bank) for query in needs.banks})
        assert decide(policy, unbanked.merged(output), {}).policy_version == policy.version
    for stage in stages:  # two images, one batch: one observation per stage that ran
        assert observations(*stage) == before[stage] + 1, stage
    assert observations("vqa", "answers") == before[("vqa", "answers")]  # no attribute check: the stage never ran
    assert observations("itm", "tags") == before[("itm", "tags")]
