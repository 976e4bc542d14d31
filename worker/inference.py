"""The inference service: the engine behind one model thread (the batcher), loaded once, with its tag warm-up.

The Celery runtime, `modtag policy replay` and `modtag policy test` all compute model outputs through
it: policy requirements in, `ModelOutputs` out, the engine's own types kept inside (worker/adapter.py
maps them). Only the batcher's thread runs torch (worker/batcher.py says why): models are loaded,
warmed and run there. Each batch reports its per-stage compute once, as the engine measured it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from core import metrics
from core.errors import ModelError
from core.settings import Settings
from policies import ModelOutputs, Requirements, TagSet
from worker.adapter import STAGE_MODELS, image_request, model_outputs, tag_query
from worker.batcher import Batcher

if TYPE_CHECKING:
    from PIL import Image

    from worker.engine import Engine, ImageOutput, ImageRequest

log = logging.getLogger(__name__)

EngineFactory = Callable[[set[str]], "Engine"]


class InferenceService:
    """Model outputs for (image, requirements) pairs, batched across callers on one model thread.

    `tag_sets` is read on the model thread whenever a warm-up runs (at start and after `rewarm`), so it
    may follow a policy registry that reloads.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tag_sets: Callable[[], Iterable[TagSet]] = tuple,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.settings = settings
        self._tag_sets = tag_sets
        self._engine_factory = engine_factory or (lambda roles: build_engine(settings, roles))
        self._engine: Engine | None = None
        self._batcher: Batcher[ImageRequest, ImageOutput] | None = None
        self._lock = threading.Lock()

    def start(self, roles: set[str]) -> Engine:
        """Load the models of `roles` once (thread-safe) and warm the tag sets; ModelError says how to get weights."""
        with self._lock:
            if self._engine is None:
                batcher: Batcher[ImageRequest, ImageOutput] = Batcher(
                    self._run_batch,
                    max_images=self.settings.batch_max_images,
                    wait_ms=self.settings.batch_wait_ms,
                )
                try:
                    self._engine = batcher.call(lambda: self._load(roles))
                except BaseException:
                    batcher.close()
                    raise
                self._batcher = batcher
            return self._engine

    @property
    def engine(self) -> Engine | None:
        """The engine, once `start` has loaded it."""
        return self._engine

    @property
    def roles(self) -> set[str]:
        """The models loaded (none before `start`)."""
        return set(self._engine.models.models) if self._engine is not None else set()

    def describe(self) -> dict[str, Any]:
        """The loaded models, for a decision's `models` field."""
        return self._engine.describe() if self._engine is not None else {}

    def rewarm(self) -> None:
        """Warm tag sets new since the last warm-up, on the model thread between batches (no wait)."""
        batcher, engine = self._batcher, self._engine
        if batcher is not None and engine is not None:
            # Encoded now rather than by the first job that needs them; sets already cached cost nothing.
            batcher.call_soon(lambda: self._warm_tags(engine))

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the model thread after the work queued before it (a barrier for warm-ups)."""
        return self._started().call(function)

    def infer(self, image: Image.Image, needs: Requirements, timeout_s: float | None = None) -> ModelOutputs:
        """The outputs `needs` asks for on one image; TimeoutError after `timeout_s`."""
        return model_outputs(self._started().run(image_request(image, needs), timeout_s=timeout_s))

    def infer_all(self, work: Sequence[tuple[Image.Image, Requirements]]) -> list[ModelOutputs]:
        """The outputs of several images, in order, submitted together so that they share batches."""
        batcher = self._started()
        futures = [batcher.submit(image_request(image, needs)) for image, needs in work]
        return [model_outputs(future.result()) for future in futures]

    def close(self) -> None:
        """Stop the model thread (after the work already queued); the service cannot infer afterwards."""
        if self._batcher is not None:
            self._batcher.close()

    def __enter__(self) -> InferenceService:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _started(self) -> Batcher[ImageRequest, ImageOutput]:
        if self._batcher is None:
            raise ModelError("the models are not loaded", code="model_not_loaded")
        return self._batcher

    def _load(self, roles: set[str]) -> Engine:
        engine = self._engine_factory(roles)
        self._warm_tags(engine)
        return engine

    def _warm_tags(self, engine: Engine) -> None:
        # The first job of a tag set would otherwise pay the text pass over its whole taxonomy (561 texts
        # of the product taxonomy: ~3 s on 2 CPU cores at base size, far more on busy cores), which could
        # approach a job timeout.
        if "itm" not in engine.models.models:
            return
        tag_sets = {t.key: t for t in self._tag_sets()}
        if not tag_sets:
            return
        started = time.perf_counter()
        encoded = engine.warm_tags([tag_query(t) for t in tag_sets.values()])
        log.info(
            "tag text features: %d texts of %d tag sets encoded in %.1fs",
            encoded,
            len(tag_sets),
            time.perf_counter() - started,
        )

    def _run_batch(self, requests: Sequence[ImageRequest]) -> list[ImageOutput]:
        """One engine batch (on the model thread), its compute time per model and stage observed once."""
        if self._engine is None:  # only start() starts the batcher, and it sets the engine before any request
            raise ModelError("the models are not loaded", code="model_not_loaded")
        batch = self._engine.run_batch(requests)
        for stage, seconds in batch.timings.items():
            metrics.MODEL_INFERENCE.labels(STAGE_MODELS.get(stage, "all"), stage).observe(seconds)
        return batch.images


def build_engine(settings: Settings, roles: set[str]) -> Engine:
    """Load the models of `roles` as the settings say and build the engine on them (on the calling thread)."""
    from worker.engine import Engine
    from worker.models import load_models

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    from worker import native

    native.enable(settings.native_kernels)
    loaded = load_models(
        settings.models,
        roles,
        cache_dir=settings.resolved_models_cache_dir,
        device=settings.device,
        dtype=settings.dtype,
    )
    for role, seconds in loaded.load_seconds.items():
        metrics.MODEL_LOAD.labels(role).set(seconds)
    return Engine(loaded, native_kernels=settings.native_kernels)
