"""The tiny random BLIP models as fixtures: built once per session, loaded through the real loader.

The engine installs fused attention on the models it is given, so stock calls (the per-image, per-question
reference) run on `stock`, a second, separately loaded copy that no engine ever touches. Both are module
scoped: an engine's changes to `loaded` stay inside the module that made them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from worker.families.blip.models import LoadedModels


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-random models (caption/, vqa/, itm/), built once per session without network.

    Load them by path (`load_models(str(tiny_models_dir), ...)`) or by preset with its parent as the
    cache: `load_models("tiny-random", ..., cache_dir=tiny_models_dir.parent)`.
    """
    from worker.families.blip.models import ROLES, resolve_model_dirs

    dirs = resolve_model_dirs("tiny-random", tmp_path_factory.mktemp("models"))
    return Path(dirs[ROLES[0]]).parent


@pytest.fixture(scope="module")
def loaded(tiny_models_dir: Path) -> LoadedModels:
    """The engine's models, every role (engines install fused attention on them)."""
    from worker.families.blip.models import ROLES, load_models

    return load_models("tiny-random", set(ROLES), cache_dir=tiny_models_dir.parent)


@pytest.fixture(scope="module")
def stock(tiny_models_dir: Path) -> LoadedModels:
    """The same weights, loaded again, for the stock calls: never given to an engine."""
    from worker.families.blip.models import ROLES, load_models

    return load_models("tiny-random", set(ROLES), cache_dir=tiny_models_dir.parent)


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where child processes (workers, `modtag up`) build the tiny random models, once per session."""
    return tmp_path_factory.mktemp("models-cache")
