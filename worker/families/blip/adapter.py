"""The one mapping between policies and the BLIP engine: Requirements -> engine requests, outputs -> ModelOutputs.

The engine stays a BLIP batch calculator that knows no policy (bench and the parity tests drive it
with their own requests), and the policies stay free of torch and of the engine's types (images,
per-image timings); this module is the only place that reads both. `BlipFamily` is the engine as the
inference service sees every family (worker/families/base.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core import metrics
from core.settings import Settings
from policies import AnswerQuery, ModelOutputs, Requirements, TagSet
from worker.families.base import FamilyBatch, ImageWork

if TYPE_CHECKING:
    from PIL import Image

    from worker.families.blip.engine import AnswerRequest, Engine, ImageOutput, ImageRequest, TagQuery

log = logging.getLogger(__name__)

# The model each engine stage runs (the `model` label of modtag_model_inference_seconds); preprocessing and
# the vision pass cover every model of the batch.
STAGE_MODELS = {"caption": "caption", "probes": "vqa", "answers": "vqa", "matches": "itm", "tags": "itm"}


class BlipFamily:
    """The BLIP engine behind the family protocol: policy requirements in, ModelOutputs out."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run_batch(self, work: Sequence[ImageWork]) -> FamilyBatch:
        batch = self.engine.run_batch([image_request(item.image, item.needs) for item in work])
        return FamilyBatch(
            outputs=[model_outputs(output) for output in batch.images],
            timings={(STAGE_MODELS.get(stage, "all"), stage): seconds for stage, seconds in batch.timings.items()},
        )

    def warm(self, needs: Requirements) -> None:
        # The first job of a tag set would otherwise pay the text pass over its whole taxonomy (hundreds of
        # texts for the product taxonomy), which could approach a job timeout.
        if "itm" not in self.engine.models.models or not needs.tag_sets:
            return
        started = time.perf_counter()
        encoded = self.engine.warm_tags([tag_query(t) for t in needs.tag_sets])
        log.info(
            "tag text features: %d texts of %d tag sets encoded in %.1fs",
            encoded,
            len(needs.tag_sets),
            time.perf_counter() - started,
        )

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    @property
    def load_seconds(self) -> Mapping[str, float]:
        return {str(role): seconds for role, seconds in self.engine.models.load_seconds.items()}


def build_engine(settings: Settings, roles: set[str]) -> Engine:
    """Load the models of `roles` as the settings say and build the engine on them (on the calling thread)."""
    from worker.families.base import thread_budget
    from worker.families.blip import native
    from worker.families.blip.cuda import enable_decode_graphs
    from worker.families.blip.engine import Engine
    from worker.families.blip.models import load_models

    if settings.torch_threads:
        import torch

        torch.set_num_threads(thread_budget(settings))
    native.enable(settings.native_kernels)
    enable_decode_graphs(settings.cuda_graphs)  # takes effect on CUDA only, in this process's first decode
    loaded = load_models(
        settings.models,
        roles,
        cache_dir=settings.resolved_models_cache_dir,
        device=settings.device,
        dtype=settings.dtype,
    )
    for role, seconds in loaded.load_seconds.items():
        metrics.MODEL_LOAD.labels(role).set(seconds)
    calibration = None
    if loaded.int8 and settings.int8_calibration is not None:
        from worker.families.blip.calibration import Int8Calibration

        calibration = Int8Calibration.load(settings.int8_calibration)
    return Engine(
        loaded,
        native_kernels=settings.native_kernels,
        int8_stages=settings.resolved_int8_stages,
        int8_calibration=calibration,
    )


def image_request(image: Image.Image, needs: Requirements) -> ImageRequest:
    """The engine request that computes `needs` for one decoded image."""
    from worker.families.blip.engine import ImageRequest

    return ImageRequest(
        image=image,
        caption=needs.caption,
        probes=needs.probes,
        texts=needs.texts,
        answers=tuple(answer_request(q) for q in needs.answers),
        tags=tuple(tag_query(t) for t in needs.tag_sets),
        embedding=needs.embedding or bool(needs.examples),
    )


def answer_request(question: AnswerQuery) -> AnswerRequest:
    """The engine request that ranks one policy question's candidate answers."""
    from worker.families.blip.engine import AnswerRequest

    return AnswerRequest(question.key, question.question, question.candidates, question.required)


def tag_query(tag_set: TagSet) -> TagQuery:
    """The engine query that scores one policy tag set."""
    from worker.families.blip.engine import TagQuery

    return TagQuery(tag_set.key, tag_set.texts, tag_set.groups, tag_set.top_k)


def model_outputs(output: ImageOutput) -> ModelOutputs:
    """The engine's results for one image as the policy domain reads them."""
    return ModelOutputs(
        caption=output.caption,
        probes=output.probes,
        matches=output.matches,
        answers=output.answers,
        tags=output.tags,
        embedding=output.embedding,
    )
