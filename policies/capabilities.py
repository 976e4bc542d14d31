"""What a check can ask the models for, named once: checks require capabilities, model families compute them.

A check never names a model or a family (BLIP, OCR): it asks for a capability, and the worker loads
whichever family declares it (worker/families). `ModelOutputs` holds each capability's result under
the same name, so a new family adds members here and nothing else in the policy domain.
"""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    """One kind of model output; the value is the name of its field in `ModelOutputs`."""

    CAPTION = "caption"  # a generated caption (str)
    YES_NO = "probes"  # per yes/no question: P(yes)
    TEXT_MATCH = "matches"  # per text: the image-text matching probability
    ANSWER_RANK = "answers"  # per answer query key: the log-likelihood of each candidate answer
    TAGS = "tags"  # per tag set key: the matching probability of each re-ranked tag text
    TEXT_READ = "text"  # the lines of text read in the image (OCR): TextLine, in reading order
    PIXELS = "measures"  # per pixel measurement name: its value (no model: numpy on the decoded image)
    BANK_MATCH = "banks"  # per bank name: the closest known item (not a model's: the worker's hash step)
    IMAGE_EMBEDDING = "embedding"  # the image's L2-normalised ITC embedding (tuple of floats), from the ITM model
    EXAMPLE_MATCH = "examples"  # per example set name: its nearest examples (not a model's: the worker's lookup)


MODEL_FREE: frozenset[Capability] = frozenset({Capability.BANK_MATCH, Capability.EXAMPLE_MATCH})
"""Capabilities the worker computes itself, not a model family: bank lookups before the models run, example-set
lookups after them (on the image embedding)."""
