"""BLIP's model presets, in one place: the hub ids of each role, and the presets built locally with random weights.

No torch here: `modtag preflight` and the settings' messages read the names without loading a model library.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelRole = Literal["caption", "vqa", "itm"]
RandomSize = Literal["tiny", "base"]

ROLES: tuple[ModelRole, ...] = get_args(ModelRole)

MODEL_PRESETS: dict[str, dict[ModelRole, str]] = {
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
# Bump when the recipe of the random builds changes, so cached builds are not reused.
RANDOM_BUILD_VERSION = 1

PRESET_NAMES: tuple[str, ...] = (*MODEL_PRESETS, *RANDOM_PRESETS)
