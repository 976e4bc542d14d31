"""`modtag bench --tags`: what tagging and attribute checks cost, at the fast dtype only.

The one-time text features of the built-in tagging policy's tags, the ITM model's vision pass, the tags
check (ITC over every tag, ITM on the top few of each group), the naive way (ITM over every tag) on
`naive_images` photos, and the listing policy's colour and product-type answer rankings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modtag.bench.common import (
    ATTRIBUTE_CONTEXT,
    ATTRIBUTE_POLICY,
    PHOTOS,
    TAGS_POLICY,
    BenchOptions,
    Log,
    bench_fast_dtype,
    check_options,
    dtype_name,
    load_average,
    machine_info,
    photos,
    quiet_transformers,
    stage_totals,
)
from worker.families.blip.engine import Engine, ImageOutput, ImageRequest, TagQuery
from worker.families.blip.models import load_models, resolve_device


def run_tags_bench(options: BenchOptions) -> dict[str, Any]:
    """What tags and attribute checks cost at the fast dtype, on the same photos; the report's `tags` holds it.

    The ITM and VQA models, loaded once; the built-in policies' checks as the worker builds them:
    (a) the tag set's text features on a new engine (`Engine.warm_tags`, what a worker does at
    start); (b) the ITM model's vision pass per image; (c) the tagging policy's tags check per image;
    (d) the naive way, ITM over every tag, on the first `naive_images` photos, with how many of its
    best tags per group the check's ITC shortlist held; (e) the listing policy's colour and
    product-type checks. Every figure is the best of `repeat` timed runs (those of (b), (c) and (e)
    after an untimed run).
    """
    check_options(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = bench_fast_dtype(options, device)
    images = photos(options.images)
    naive_count = min(options.naive_images, len(images))
    log = Log(options.progress)
    load_before = load_average()

    from policies import TagsCheck, load_policies
    from worker.families.blip.adapter import answer_request, tag_query

    policies = load_policies([])
    [tags_check] = [check for _, check in policies[TAGS_POLICY].checks() if isinstance(check, TagsCheck)]
    tag_set = tags_check.tag_set()
    query = tag_query(tag_set)
    answers = [answer_request(q) for q in policies[ATTRIBUTE_POLICY].requirements(ATTRIBUTE_CONTEXT).answers]
    with quiet_transformers():
        log(f"tags {dtype_name(fast)}: loading {options.models} (vqa, itm)")
        loaded = load_models(
            options.models, {"vqa", "itm"}, cache_dir=options.cache_dir, device=options.device, dtype=dtype_name(fast)
        )
    # The first text pass creates the kernels: time the tag set's texts without that one-time cost.
    Engine(loaded, max_batch=options.batch_size).warm_tags([TagQuery("kernels", ("a mug", "a red item"), (0, 0), 1)])
    log(f"text features of {len(query.texts)} tags")
    text_runs: list[float] = []
    for _ in range(options.repeat):  # each on a new engine: no cached features or tokens, as at a worker's start
        engine = Engine(loaded, max_batch=options.batch_size)
        started = time.perf_counter()
        encoded = engine.warm_tags([query])
        text_runs.append(time.perf_counter() - started)
    text_seconds = min(text_runs)

    log(f"tags check on {len(images)} photos")
    tags_run = _timed_runs(engine, [ImageRequest(image, caption=False, tags=[query]) for image in images], options)
    log(f"naive: ITM over all {len(query.texts)} tags on {naive_count} photo(s)")
    naive_requests = [ImageRequest(image, caption=False, texts=query.texts) for image in images[:naive_count]]
    naive_runs: list[float] = []
    for _ in range(options.repeat):  # after the tags check, the ITM model's kernels are warm
        started = time.perf_counter()
        naive_outputs = engine.run(naive_requests)
        naive_runs.append(time.perf_counter() - started)
    naive_seconds = min(naive_runs)
    attribute_runs = []
    for answer in answers:
        log(f"attribute: {answer.question!r} ({len(answer.candidates)} answers)")
        requests = [ImageRequest(image, caption=False, answers=[answer]) for image in images]
        attribute_runs.append((answer, _timed_runs(engine, requests, options)))

    tags_per_image = tags_run.seconds / len(images)
    naive_per_image = naive_seconds / naive_count
    report_tags: dict[str, Any] = {
        "policy": TAGS_POLICY,
        "taxonomy": tags_check.taxonomy,
        "dtype": dtype_name(fast),
        "batch_size": options.batch_size,
        "texts": len(query.texts),
        "groups": len(set(query.groups)),
        "top_k": query.top_k,
        "itm_texts_per_image": sum(min(query.top_k, query.groups.count(g)) for g in set(query.groups)),
        "text_features": {
            "texts": encoded,
            "seconds": text_seconds,
            "runs_s": text_runs,
            "texts_per_s": encoded / text_seconds if text_seconds else None,
        },
        "vision_itm": {
            "seconds_per_image": tags_run.stage("vision"),
            "preprocess_seconds_per_image": tags_run.stage("preprocess"),
        },
        "tags_check": {
            "images": len(images),
            "runs_s": tags_run.runs,
            "seconds_per_image": tags_per_image,
            "images_per_s": 1 / tags_per_image,
            "itc_seconds_per_image": tags_run.stage("tags"),
            "itm_seconds_per_image": tags_run.stage("matches"),
            "beyond_vision_seconds_per_image": tags_run.stage("tags") + tags_run.stage("matches"),
            "stages_s_per_image": tags_run.stages,
        },
        "naive_itm_all": {
            "images": naive_count,
            "texts": len(query.texts),
            "runs_s": naive_runs,
            "seconds_per_image": naive_per_image,
            "times_the_tags_check": naive_per_image / tags_per_image,
            **_shortlist_agreement(query, tags_run.outputs[:naive_count], naive_outputs),
        },
        "attributes": [
            {
                "question": answer.question,
                "candidates": len(answer.candidates),
                "claimed": list(answer.required),
                "answers_scored_per_image": sum(len(o.answers[answer.key]) for o in run.outputs) / len(run.outputs),
                "runs_s": run.runs,
                "seconds_per_image": run.seconds / len(images),
                "beyond_vision_seconds_per_image": run.stage("probes") + run.stage("answers"),
                "stages_s_per_image": run.stages,
            }
            for answer, run in attribute_runs
        ],
    }
    return {
        "workload": {
            "images": len(images),
            "photos": [PHOTOS[i % len(PHOTOS)] for i in range(len(images))],
            "models": options.models,
        },
        "machine": {**machine_info(device), "load_average_before": load_before, "load_average_after": load_average()},
        "tags": report_tags,
    }


@dataclass
class _TimedRuns:
    """The best of some timed engine runs over the same requests: its seconds, outputs and stage shares."""

    seconds: float
    runs: list[float]
    outputs: list[ImageOutput]

    @property
    def stages(self) -> dict[str, float]:
        """Per-image seconds of each engine stage in the best run."""
        return {stage: seconds / len(self.outputs) for stage, seconds in stage_totals(self.outputs).items()}

    def stage(self, name: str) -> float:
        return self.stages.get(name, 0.0)


def _timed_runs(engine: Engine, requests: list[ImageRequest], options: BenchOptions) -> _TimedRuns:
    def run_all() -> list[ImageOutput]:
        outputs: list[ImageOutput] = []
        for start in range(0, len(requests), options.batch_size):
            outputs.extend(engine.run(requests[start : start + options.batch_size]))
        return outputs

    engine.run(requests[: options.batch_size])  # untimed: one-time kernel and token-cache work
    runs: list[tuple[float, list[ImageOutput]]] = []
    for _ in range(options.repeat):
        started = time.perf_counter()
        outputs = run_all()
        runs.append((time.perf_counter() - started, outputs))
    seconds, best = min(runs, key=lambda run: run[0])
    return _TimedRuns(seconds=seconds, runs=[run[0] for run in runs], outputs=best)


def _shortlist_agreement(
    query: TagQuery, tagged: Sequence[ImageOutput], naive: Sequence[ImageOutput]
) -> dict[str, float]:
    # How many of the naive way's best `top_k` tags per group (by ITM over every tag) the tags check's
    # ITC shortlist held, and how far the shortlisted tags' ITM scores are from the naive way's.
    held = wanted = 0
    diffs = [0.0]
    for output, reference in zip(tagged, naive, strict=True):
        scored = output.tags[query.key]
        diffs += [abs(score - reference.matches[text]) for text, score in scored.items()]
        for group in set(query.groups):
            members = [text for text, g in zip(query.texts, query.groups, strict=True) if g == group]
            best = sorted(members, key=lambda text: -reference.matches[text])[: query.top_k]
            held += sum(text in scored for text in best)
            wanted += len(best)
    return {"shortlist_recall": held / wanted if wanted else 1.0, "max_abs_score_diff": max(diffs)}
