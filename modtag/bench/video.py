"""`modtag bench --video`: what a minute of video costs the sampler and the engine, against the naive way.

A generated clip (1080p, 60 s, 25 fps, H.264 by PyAV: still shots, panning shots and cuts between them; kept in the
models cache so that a second run skips the encoding) is judged twice in one process, on the same models:

- **modtag**: `core.video.sample_frames` (fps samples plus scene changes, PDQ repeats skipped), each kept frame sent
  to the engine in batches as it is found: decode + sample + hash time, frames kept (and why), engine time;
- **naive**: every frame decoded, one a second taken (no scene score, no skipping) and every one through the engine.

Each way's figures: seconds, and seconds per minute of video. Memory: the resident set sampled every 10 ms while
each way runs, as the rise over the resident set just before it (the models are loaded by then); and the sampler's
rise alone on a quarter-length clip beside the full one: bounded by the decoding window, it does not grow with the
video's length. The engine's workload per frame is the engine bench's (a caption, 8 probes, 16 texts).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.video import Sampling, VideoLimits, probe, sample_frames
from modtag.bench.common import (
    CAPTION_TOKENS,
    PROBES,
    TEXTS,
    BenchOptions,
    Log,
    bench_fast_dtype,
    check_options,
    dtype_name,
    load_average,
    load_roles,
    machine_info,
)
from modtag.clips import Shot, write_clip
from modtag.memory import process_memory_mb
from worker.families.blip.engine import Engine, ImageRequest
from worker.families.blip.models import resolve_device

# The clip's shots as shares of its length: (share, photo, pan per second). Still stretches, two pans, five cuts
# between sample points (at 10.5, 18.2, 30.5, 36.4 and 45.5 s of a minute), and a return to the first photo (a repeat
# the PDQ skip does not hide: it is not the previous kept frame).
_SHOTS: tuple[tuple[float, str, float], ...] = (
    (10.5 / 60, "astronaut", 0.0),
    (7.7 / 60, "coffee", 0.04),
    (12.3 / 60, "chelsea", 0.0),
    (5.9 / 60, "rocket", 0.08),
    (9.1 / 60, "astronaut", 0.0),
    (14.5 / 60, "coffee", 0.0),
)
_CLIP_VERSION = 2  # in the cached clip's name: a change to the shots encodes a new one
_MEMORY_POLL_S = 0.01


@dataclass(frozen=True)
class VideoBenchOptions:
    """The clip: its length, frame size and rate; the sampling judged (`Sampling`'s defaults: the settings')."""

    seconds: float = 60.0
    size: tuple[int, int] = (1920, 1080)
    fps: int = 25
    sampling: Sampling = field(default_factory=Sampling)


def run_video_bench(options: BenchOptions, video: VideoBenchOptions | None = None) -> dict[str, Any]:
    """Both ways on the same clip and models; the report `modtag bench --video --json` prints."""
    check_options(options)
    video = video or VideoBenchOptions()
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    fast = bench_fast_dtype(options, device)
    log = Log(options.progress)
    load_before = load_average()
    clip, encode_s = _clip(options.cache_dir, video, video.seconds, log)
    quarter, _ = _clip(options.cache_dir, video, video.seconds / 4, log)
    limits = VideoLimits(max_bytes=1 << 40, max_seconds=max(video.seconds, 1.0) * 2, max_side=8192, min_side=8)
    info = probe(clip, limits)

    log(f"video: loading {options.models} at {dtype_name(fast)}")
    models = load_roles(options, fast)
    engine = Engine(
        models, max_caption_tokens=CAPTION_TOKENS, min_caption_tokens=CAPTION_TOKENS, max_batch=options.batch_size
    )
    # Kernels, caches and a full batch's buffers, not timed: the first way measured must not pay for them.
    engine.run([_request(Image.new("RGB", video.size, (128, 128, 128)))] * options.batch_size)

    log("video: the sampler alone on a quarter and on the whole clip (memory)")
    _sampler_alone(quarter, video.sampling, limits)  # the decoder's buffers and pools, allocated once: not timed
    quarter_rise = _sampler_alone(quarter, video.sampling, limits)
    whole_rise = _sampler_alone(clip, video.sampling, limits)
    log("video: both ways' frames (modtag's sampler; every second's frame)")
    kept, sample_s = _timed_list(sample_frames(clip, video.sampling, limits))
    every, decode_s = _timed_list(_every_second(clip, video.sampling.threads))
    reasons: dict[str, int] = {}
    for frame in kept:
        reasons[frame.reason] = reasons.get(frame.reason, 0) + 1
    log(f"video: {len(kept)} and {len(every)} frames through the engine, the two ways' batches interleaved")
    modtag_engine_s, naive_engine_s = _interleaved(
        engine, options.batch_size, [frame.image for frame in kept], every, log
    )
    modtag: dict[str, Any] = {
        "frames": len(kept),
        "reasons": reasons,
        "decode_sample_hash_s": sample_s,
        "engine_s": modtag_engine_s,
        "total_s": sample_s + modtag_engine_s,
    }
    naive: dict[str, Any] = {
        "frames": len(every),
        "decode_s": decode_s,
        "engine_s": naive_engine_s,
        "total_s": decode_s + naive_engine_s,
    }
    minutes = info.duration_s / 60
    for way in (modtag, naive):
        way["seconds_per_minute_of_video"] = way["total_s"] / minutes
    return {
        "clip": {
            "seconds": info.duration_s,
            "size": f"{info.width}x{info.height}",
            "fps": video.fps,
            "codec": info.codec,
            "bytes": clip.stat().st_size,
            "shots": len(_SHOTS),
            "cuts": len(_SHOTS) - 1,
            "encode_s": encode_s,
        },
        "sampling": {
            "fps": video.sampling.fps,
            "scene_threshold": video.sampling.scene_threshold,
            "pdq_skip": video.sampling.pdq_skip,
            "max_frames": video.sampling.max_frames,
            "decode_threads": video.sampling.threads or min(4, os.cpu_count() or 1),
        },
        "modtag": modtag,
        "naive": naive,
        "speedup": naive["total_s"] / modtag["total_s"],
        "process_peak_rss_mb": process_memory_mb(os.getpid())["VmHWM"],
        "sampler_memory_rise_mb": {
            f"{info.duration_s / 4:g}s": quarter_rise,
            f"{info.duration_s:g}s": whole_rise,
        },
        "models": options.models,
        "dtype": models.dtype_name,
        "batch_size": options.batch_size,
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": load_average()},
    }


def format_video_report(report: dict[str, Any]) -> str:
    """The report as a few lines a person reads."""
    clip, modtag, naive = report["clip"], report["modtag"], report["naive"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in modtag["reasons"].items())
    memory = ", ".join(f"{length}: {rise:.1f} MB" for length, rise in report["sampler_memory_rise_mb"].items())
    return "\n".join(
        [
            f"video bench: {clip['seconds']:g} s of {clip['size']} {clip['codec']} at {clip['fps']} fps, "
            f"{clip['cuts']} cuts; {report['models']} at {report['dtype']} on {report['machine']['processor']}",
            f"modtag: {modtag['frames']} frames kept ({reasons}); decode + sample + hash "
            f"{modtag['decode_sample_hash_s']:.2f} s, engine {modtag['engine_s']:.2f} s, "
            f"total {modtag['total_s']:.2f} s "
            f"= {modtag['seconds_per_minute_of_video']:.2f} s per minute of video",
            f"naive:  {naive['frames']} frames (1 a second); decode {naive['decode_s']:.2f} s, engine "
            f"{naive['engine_s']:.2f} s, total {naive['total_s']:.2f} s = "
            f"{naive['seconds_per_minute_of_video']:.2f} s per minute of video",
            f"speedup {report['speedup']:.1f}x; the sampler's memory rise by clip length: {memory}; the process's "
            f"peak {report['process_peak_rss_mb']:.0f} MB (models included)",
        ]
    )


# --- the two ways ----------------------------------------------------------------------------------


def _every_second(clip: Path, threads: int) -> Iterator[Image.Image]:
    """The first decoded frame at or after each whole second, as RGB: what a plain 1 fps sampler sends."""
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads or min(4, os.cpu_count() or 1)
        next_second = 0.0
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= next_second:
                next_second = float(int(frame.time) + 1)
                yield frame.to_image()


def _sampler_alone(clip: Path, sampling: Sampling, limits: VideoLimits) -> float:
    """The resident set's rise while the sampler runs through `clip`, its frames dropped as they come."""
    with _peak_rise() as rise:
        for _ in sample_frames(clip, sampling, limits):
            pass
    return rise()


def _timed_list(frames: Iterator[Any]) -> tuple[list[Any], float]:
    """Everything `frames` yields, and the seconds spent producing it."""
    started = time.perf_counter()
    items = list(frames)
    return items, time.perf_counter() - started


def _interleaved(
    engine: Engine, batch_size: int, first: Sequence[Image.Image], second: Sequence[Image.Image], log: Log
) -> tuple[float, float]:
    """Engine seconds of each list's batches, run interleaved in proportion (modtag's third batch among the naive
    way's eighth or so), so that a machine whose load changes during the run slows both alike."""
    chunks: list[tuple[float, int, Sequence[Image.Image]]] = [
        ((index + 0.5) / -(-len(images) // batch_size), way, images[start : start + batch_size])
        for way, images in enumerate((first, second))
        for index, start in enumerate(range(0, len(images), batch_size))
    ]
    spent = [0.0, 0.0]
    for position, way, batch in sorted(chunks, key=lambda chunk: (chunk[0], chunk[1])):
        started = time.perf_counter()
        engine.run([_request(image) for image in batch])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent[way] += time.perf_counter() - started
        log(f"video: {'modtag' if way == 0 else 'naive'} batch at {position:.0%}")
    return spent[0], spent[1]


def _request(image: Image.Image) -> ImageRequest:
    return ImageRequest(image, caption=True, probes=PROBES, texts=TEXTS)


@contextmanager
def _peak_rise() -> Iterator[Callable[[], float]]:
    """The highest resident set (MB) seen while the block runs, less the one before it; read after the block."""
    pid = os.getpid()
    baseline = process_memory_mb(pid)["VmRSS"]
    peak = baseline
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(_MEMORY_POLL_S):
            peak = max(peak, process_memory_mb(pid)["VmRSS"])

    watcher = threading.Thread(target=watch, name="bench-memory", daemon=True)
    watcher.start()
    try:
        yield lambda: round(peak - baseline, 1)
    finally:
        stop.set()
        watcher.join()
        peak = max(peak, process_memory_mb(pid)["VmRSS"])


def _clip(cache_dir: Path, video: VideoBenchOptions, seconds: float, log: Log) -> tuple[Path, float | None]:
    """The bench clip of `seconds`, encoded once into the cache (None: it was there already)."""
    from skimage import data

    width, height = video.size
    path = cache_dir / "bench-video" / f"clip-v{_CLIP_VERSION}-{seconds:g}s-{width}x{height}-{video.fps}fps.mp4"
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"video: encoding a {seconds:g} s {width}x{height} clip (once; kept in {path.parent})")
    shots = [
        Shot(seconds * share, Image.fromarray(getattr(data, name)()).convert("RGB"), pan) for share, name, pan in _SHOTS
    ]
    started = time.perf_counter()
    partial = path.with_suffix(".partial.mp4")
    write_clip(partial, shots, size=video.size, fps=video.fps)
    partial.rename(path)
    return path, time.perf_counter() - started
