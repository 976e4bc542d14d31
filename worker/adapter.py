"""The one mapping between policies and engine: Requirements -> engine requests, engine outputs -> ModelOutputs.

The engine stays a BLIP batch calculator that knows no policy (bench and the parity tests drive it
with their own requests), and the policies stay free of torch and of the engine's types (images,
per-image timings); this module is the only place that reads both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies import AnswerQuery, ModelOutputs, Requirements, TagSet

if TYPE_CHECKING:
    from PIL import Image

    from worker.engine import AnswerRequest, ImageOutput, ImageRequest, TagQuery

# The model each engine stage runs (the `model` label of modtag_model_inference_seconds); preprocessing and
# the vision pass cover every model of the batch.
STAGE_MODELS = {"caption": "caption", "probes": "vqa", "answers": "vqa", "matches": "itm", "tags": "itm"}


def roles_for(needs: Requirements) -> set[str]:
    """The models a set of requirements runs on."""
    roles: set[str] = set()
    if needs.caption:
        roles.add("caption")
    if needs.probes or needs.answers:
        roles.add("vqa")
    if needs.texts or needs.describe or needs.tag_sets:
        roles.add("itm")
    return roles


def image_request(image: Image.Image, needs: Requirements) -> ImageRequest:
    """The engine request that computes `needs` for one decoded image."""
    from worker.engine import ImageRequest

    return ImageRequest(
        image=image,
        caption=needs.caption,
        probes=needs.probes,
        texts=needs.texts,
        answers=tuple(answer_request(q) for q in needs.answers),
        tags=tuple(tag_query(t) for t in needs.tag_sets),
    )


def answer_request(question: AnswerQuery) -> AnswerRequest:
    """The engine request that ranks one policy question's candidate answers."""
    from worker.engine import AnswerRequest

    return AnswerRequest(question.key, question.question, question.candidates, question.required)


def tag_query(tag_set: TagSet) -> TagQuery:
    """The engine query that scores one policy tag set."""
    from worker.engine import TagQuery

    return TagQuery(tag_set.key, tag_set.texts, tag_set.groups, tag_set.top_k)


def model_outputs(output: ImageOutput) -> ModelOutputs:
    """The engine's results for one image as the policy domain reads them."""
    return ModelOutputs(
        caption=output.caption,
        probes=output.probes,
        matches=output.matches,
        answers=output.answers,
        tags=output.tags,
    )
