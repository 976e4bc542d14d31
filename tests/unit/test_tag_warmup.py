"""Warm-up of tag text features: computed without an image, kept, and the same results as computed on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from core.settings import Settings
from policies import load_policies
from worker.families.blip.adapter import BlipFamily
from worker.families.blip.engine import Engine, ImageRequest, TagQuery
from worker.families.blip.models import LoadedModels
from worker.runtime import WorkerRuntime

TAGS = ("a photo of a mug", "a photo of a cat", "a photo of a rocket", "a photo of a red item",
        "a photo of a blue item", "an item made of wood", "an item made of glass", "a photo of a person")  # fmt: skip
GROUPS = (0, 0, 0, 1, 1, 2, 2, 0)


class TextPasses:
    """Counts the ITM text encoder's forwards: unimodal ones (ITC features, no image) and over an image (ITM)."""

    def __init__(self, loaded: LoadedModels) -> None:
        self.unimodal = 0
        self.with_image = 0
        self._encoder: Any = loaded.get("itm").model.text_encoder  # type: ignore[attr-defined]

    def __enter__(self) -> TextPasses:
        self._handle = self._encoder.register_forward_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.remove()

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if kwargs.get("encoder_hidden_states") is None:
            self.unimodal += 1
        else:
            self.with_image += 1


def test_after_warm_up_a_tags_request_runs_no_text_pass_and_gives_the_same_tags(
    loaded: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    query = TagQuery("t", TAGS, GROUPS, top_k=2)
    requests = [ImageRequest(photo, caption=False, tags=[query]) for photo in (photos["chelsea"], photos["rocket"])]
    cold = Engine(loaded)
    with TextPasses(loaded) as passes:
        expected = cold.run(requests)
    assert passes.unimodal == 1  # the 8 tags in one chunk, on demand

    warm = Engine(loaded)
    with TextPasses(loaded) as passes:
        assert warm.warm_tags([query]) == len(TAGS)
    assert passes.unimodal == 1 and passes.with_image == 0  # no image needed
    with TextPasses(loaded) as passes:
        outputs = warm.run(requests)
    assert passes.unimodal == 0 and passes.with_image >= 1  # only the ITM re-rank over the image
    for output, reference in zip(outputs, expected, strict=True):
        assert output.tags == reference.tags  # exactly: the same computation, only earlier
        assert len(output.tags["t"]) == 2 + 2 + 2  # top 2 of each of the 3 groups


def test_warm_up_encodes_each_text_set_once(loaded: LoadedModels) -> None:
    engine = Engine(loaded)
    # Two sets over the same texts (the listing and tagging policies over one taxonomy) share features.
    queries = [TagQuery("a", TAGS, GROUPS, 3), TagQuery("b", TAGS, GROUPS, 5), TagQuery("a", TAGS, GROUPS, 3)]
    with TextPasses(loaded) as passes:
        assert engine.warm_tags(queries) == len(TAGS)
        assert engine.warm_tags(queries) == 0  # already there
    assert passes.unimodal == 1
    # More than one chunk of texts (max_batch * 4 per forward).
    many = tuple(f"a photo of item {i}" for i in range(70))
    with TextPasses(loaded) as passes:
        assert Engine(loaded, max_batch=8).warm_tags([TagQuery("m", many, (0,) * 70, 5)]) == 70
    assert passes.unimodal == 3  # 32 + 32 + 6


def test_chunked_text_features_land_on_their_own_texts(
    loaded: LoadedModels, stock: LoadedModels, photos: dict[str, Image.Image]
) -> None:
    # Texts of many lengths, encoded in chunks of similar length (4 per chunk with max_batch=1): each
    # text's shortlist place must be the one the stock ITC (a separate, untouched model copy) gives it.
    itm: Any = stock.get("itm")
    texts = tuple(f"a photo of a {'very ' * (i % 7)}nice item number {i}" for i in range(40))
    groups = tuple(i % 2 for i in range(40))
    inputs = itm.processor(images=photos["rocket"], text=list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        similarity = itm.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"][:1],
            use_itm_head=False,
        ).itm_score[0]
    expected = {
        texts[i] for group in (0, 1) for i in sorted(range(group, 40, 2), key=lambda i: -float(similarity[i]))[:4]
    }
    query = TagQuery("v", texts, groups, top_k=4)
    for max_batch in (1, 16):
        [output] = Engine(loaded, max_batch=max_batch).run(
            [ImageRequest(photos["rocket"], caption=False, tags=[query])]
        )
        assert set(output.tags["v"]) == expected, max_batch


def test_warmed_sets_are_never_evicted(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded, tag_feature_cache=1)
    pinned = TagQuery("p", TAGS, GROUPS, 2)
    engine.warm_tags([pinned])
    others = [TagQuery(f"o{i}", (f"a photo of thing {i}", "a photo of a cat"), (0, 0), 1) for i in range(3)]
    with TextPasses(loaded) as passes:
        for other in others:
            engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[other])])
        assert passes.unimodal == 3
        engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[pinned, others[-1]])])
        assert passes.unimodal == 3  # the pinned set and the most recent other are still cached
        engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[others[0]])])
        assert passes.unimodal == 4  # evicted: one place for unpinned sets
    # A later warm-up replaces the pins: the first set becomes an ordinary (evictable) entry.
    engine.warm_tags([others[1]])
    with TextPasses(loaded) as passes:
        engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[others[2]])])
        engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[pinned])])
    assert passes.unimodal == 2


def test_hostile_tag_sets(loaded: LoadedModels, photos: dict[str, Image.Image]) -> None:
    engine = Engine(loaded)
    with pytest.raises(ValueError):
        engine.warm_tags([TagQuery("t", TAGS, (0,), 1)])
    with pytest.raises(ValueError):
        engine.warm_tags([TagQuery("t", TAGS, GROUPS, 0)])
    with pytest.raises(TypeError):
        engine.warm_tags([TagQuery("t", list(TAGS), GROUPS, 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.warm_tags([TagQuery("t", (1, 2), (0, 0), 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.warm_tags([("t", TAGS, GROUPS, 1)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Engine(loaded).run([ImageRequest(photos["chelsea"], caption=False, tags=[TagQuery("t", "ab", (0, 0), 1)])])  # type: ignore[arg-type]
    # An empty set encodes nothing and tags nothing.
    empty = TagQuery("e", (), (), 1)
    assert engine.warm_tags([empty]) == 0
    [output] = engine.run([ImageRequest(photos["chelsea"], caption=False, tags=[empty])])
    assert output.tags == {"e": {}}
    # Odd but valid texts: empty, very long (cut at the position limit), non-ASCII.
    odd = ("", "word " * 2000, "ünïcödé ✓ 🛍")
    assert engine.warm_tags([TagQuery("odd", odd, (0, 0, 1), 1)]) == 3
    assert engine.warm_tags([]) == 0


@pytest.fixture
def runtime(tmp_path: Path, tiny_models_dir: Path) -> Iterator[WorkerRuntime]:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        batch_wait_ms=1,
    )
    yield WorkerRuntime.from_settings(settings)


def test_worker_load_warms_every_loaded_policys_tag_sets(runtime: WorkerRuntime, caplog: Any) -> None:
    caplog.set_level("INFO", logger="worker.families.blip.adapter")
    engine = blip_engine(runtime)
    policies = load_policies([])
    tag_sets = [t for name in ("listing", "tagging") for t in policies[name].requirements().tag_sets]
    assert len(tag_sets) == 2 and tag_sets[0].texts == tag_sets[1].texts  # one taxonomy, two top_k
    queries = [TagQuery(t.key, t.texts, t.groups, t.top_k) for t in tag_sets]
    assert engine.warm_tags(queries) == 0  # already computed by load()
    size = len(tag_sets[0].texts)
    assert size > 500
    assert f"{size} texts of 2 tag sets encoded" in caplog.text


def test_a_tag_set_new_in_a_reload_is_warmed_on_the_model_thread(tmp_path: Path, tiny_models_dir: Path) -> None:
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        policies_dir=policies_dir,
    )
    runtime = WorkerRuntime.from_settings(settings)
    engine = blip_engine(runtime)
    texts = ("a photo of a teapot", "a photo of a kettle", "a photo of a samovar")
    (policies_dir / "kitchen.yaml").write_text(
        "name: kitchen\n"
        "description: Kettles in kitchen photos.\n"
        "categories:\n"
        "  - name: kettles\n"
        "    description: A kettle of any kind.\n"
        "    checks:\n"
        "      - kind: tags\n"
        f"        tags: [{', '.join(t.removeprefix('a photo of a ') for t in texts)}]\n"
        "        prompt: 'a photo of a {}'\n"
        "    review: 0.9\n"
    )
    assert runtime.registry.refresh(force=True)
    # The reload queued the warm-up on the model thread; a call queued after it runs after it.
    runtime.inference.call(lambda: None)
    query = next(t for t in runtime.policies["kitchen"].requirements().tag_sets)
    assert set(query.texts) == set(texts)
    assert engine.warm_tags([TagQuery(query.key, query.texts, query.groups, query.top_k)]) == 0


def blip_engine(runtime: WorkerRuntime) -> Engine:
    """The BLIP engine a worker loaded for its policies."""
    runtime.load()
    family = runtime.inference.family("blip")
    assert isinstance(family, BlipFamily)
    return family.engine
