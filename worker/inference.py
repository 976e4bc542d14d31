"""The inference service: the model families behind one model thread (the batcher), loaded once, warmed.

The Celery runtime, `modtag policy replay` and `modtag policy test` all compute model outputs through
it: images and policy requirements in, `ModelOutputs` out. Which families load is decided by the
capabilities the loaded policies need (worker/families); each batch runs every loaded family on the
images that need it, and the outputs are merged per image. Only the batcher's thread runs the models
(worker/batcher.py says why): families are loaded, warmed and run there, one after the other, so
torch and ONNX Runtime share the worker's one thread budget. Each batch reports its per-stage compute
once, as the families measured it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from core import metrics
from core.errors import ModelError
from core.settings import Settings
from policies import ModelOutputs, Requirements
from policies.capabilities import Capability
from worker.batcher import Batcher
from worker.families import FAMILIES, Family, ImageWork, LoadedFamily, families_for

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


class InferenceService:
    """Model outputs for (image, requirements) pairs, batched across callers on one model thread.

    `warm_needs` is read on the model thread whenever a warm-up runs (at start and after `rewarm`), so it
    may follow a policy registry that reloads. `families` is the registry (tests wrap it to count loads).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        warm_needs: Callable[[], Requirements | None] = lambda: None,
        families: Sequence[Family] = FAMILIES,
    ) -> None:
        self.settings = settings
        self._warm_needs = warm_needs
        self._families = {family.name: family for family in families}
        self._loaded: dict[str, tuple[frozenset[Capability], LoadedFamily]] = {}
        self._batcher: Batcher[ImageWork, ModelOutputs] | None = None
        self._lock = threading.Lock()

    def start(self, capabilities: Iterable[Capability]) -> None:
        """Load the families that compute `capabilities` once (thread-safe), warmed; ModelError says how to get weights.

        A service started once loads nothing more: a capability new in a policy reload needs a restart.
        """
        with self._lock:
            if self._batcher is not None:
                return
            batcher: Batcher[ImageWork, ModelOutputs] = Batcher(
                self._run_batch, max_images=self.settings.batch_max_images, wait_ms=self.settings.batch_wait_ms
            )
            try:
                batcher.call(lambda: self._load(frozenset(capabilities)))
            except BaseException:
                batcher.close()
                raise
            self._batcher = batcher

    @property
    def started(self) -> bool:
        return self._batcher is not None

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What the loaded families compute (none before `start`)."""
        return frozenset(c for share, _ in self._loaded.values() for c in share)

    def family(self, name: str) -> LoadedFamily | None:
        """A loaded family by name (bench and tests reach the BLIP engine this way)."""
        loaded = self._loaded.get(name)
        return loaded[1] if loaded is not None else None

    def describe(self) -> dict[str, Any]:
        """The loaded models, for a decision's `models` field: every family's roles, the first model family's device."""
        described = [family.describe() for _, family in self._loaded.values()]
        if not described:
            return {}
        first = next((d for d in described if d.get("roles")), described[0])
        return {
            "random": any(d.get("random") for d in described),
            "device": first.get("device"),
            "dtype": first.get("dtype"),
            "roles": {role: info for d in described for role, info in d.get("roles", {}).items()},
        }

    def rewarm(self) -> None:
        """Warm what is new since the last warm-up, on the model thread between batches (no wait)."""
        if self._batcher is not None:
            self._batcher.call_soon(self._warm)

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the model thread after the work queued before it (a barrier for warm-ups)."""
        return self._started().call(function)

    def infer(
        self, image: Image.Image, needs: Requirements, timeout_s: float | None = None, *, bulk: bool = False
    ) -> ModelOutputs:
        """The outputs `needs` asks for on one image; TimeoutError after `timeout_s`. A `bulk` image (a bulk job's)
        is batched only when no interactive one waits (worker/batcher.py)."""
        return self._started().run(ImageWork(image, needs), timeout_s=timeout_s, bulk=bulk)

    def infer_all(
        self, work: Sequence[tuple[Image.Image, Requirements]], timeout_s: float | None = None, *, bulk: bool = False
    ) -> list[ModelOutputs]:
        """The outputs of several images, in order, submitted together so that they share batches; TimeoutError
        when one is not done `timeout_s` after the previous one."""
        batcher = self._started()
        futures = [batcher.submit(ImageWork(image, needs), bulk=bulk) for image, needs in work]
        return [future.result(timeout=timeout_s) for future in futures]

    def close(self) -> None:
        """Stop the model thread (after the work already queued); the service cannot infer afterwards."""
        if self._batcher is not None:
            self._batcher.close()

    def __enter__(self) -> InferenceService:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _started(self) -> Batcher[ImageWork, ModelOutputs]:
        if self._batcher is None:
            raise ModelError("the models are not loaded", code="model_not_loaded")
        return self._batcher

    def _load(self, capabilities: frozenset[Capability]) -> None:
        for family, share in families_for(capabilities, self._families.values()):
            self._loaded[family.name] = (share, family.load(self.settings, share))
        self._warm()

    def _warm(self) -> None:
        needs = self._warm_needs()
        if needs is not None:
            for _, family in self._loaded.values():
                family.warm(needs)

    def _run_batch(self, work: Sequence[ImageWork]) -> list[ModelOutputs]:
        """One batch (on the model thread): each loaded family on the images that need it; timings observed once."""
        outputs = [ModelOutputs() for _ in work]
        for share, family in self._loaded.values():
            rows = [row for row, item in enumerate(work) if item.needs.model_capabilities & share]
            if not rows:
                continue
            batch = family.run_batch([work[row] for row in rows])
            for row, output in zip(rows, batch.outputs, strict=True):
                outputs[row] = outputs[row].merged(output)
            for (model, stage), seconds in batch.timings.items():
                metrics.MODEL_INFERENCE.labels(model, stage).observe(seconds)
        return outputs
