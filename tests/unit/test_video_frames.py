"""core/video.py on real clips encoded by PyAV: what the probe says, which frames are kept, and broken input refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, VideoError
from core.hashes import pdq_distance, pdq_hash
from core.settings import load_settings
from core.video import Sampling, VideoLimits, probe, sample_frames, sniff_video
from tests.support import videos
from tests.support.photos import photo_image

LIMITS = VideoLimits(max_bytes=50 * 1024 * 1024, max_seconds=60, max_side=4096, min_side=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clips")


def kept(path: Path, sampling: Sampling | None = None, limits: VideoLimits = LIMITS) -> list[tuple[float, str]]:
    return [(frame.time_s, frame.reason) for frame in sample_frames(path, sampling or Sampling(), limits)]


def test_probe_reads_each_container(clips: Path) -> None:
    names = ["astronaut", "coffee"]
    mp4 = probe(videos.shots_clip(clips, names, 2.0), LIMITS)
    assert (mp4.container, mp4.codec, mp4.width, mp4.height, mp4.duration_s) == ("mp4", "h264", 160, 120, 4.0)
    assert (mp4.frame_rate, mp4.frame_count, mp4.animated, mp4.mime) == (10.0, 40, False, "video/mp4")
    webm = probe(videos.shots_clip(clips, names, 2.0, codec="vp9"), LIMITS)
    assert (webm.container, webm.codec, webm.duration_s, webm.mime) == ("webm", "vp9", 4.0, "video/webm")
    mov = probe(videos.shots_clip(clips, names, 2.0, codec="mpeg4"), LIMITS)
    assert (mov.container, mov.codec, mov.mime) == ("mov", "mpeg4", "video/quicktime")
    for fmt, container in (("GIF", "gif"), ("WEBP", "webp"), ("PNG", "apng")):
        info = probe(videos.animated_image(clips, fmt), LIMITS)
        assert (info.container, info.animated, info.width, info.height) == (container, True, 96, 72)
        assert info.duration_s == 2.0


def test_a_static_shot_costs_one_frame(clips: Path) -> None:
    assert kept(videos.static_clip(clips, seconds=10.0)) == [(0.0, "first")]


def test_cuts_between_samples_are_kept_as_scene_changes(clips: Path) -> None:
    path = videos.shots_clip(clips, ["astronaut", "coffee", "chelsea", "rocket"], seconds=2.5)
    assert kept(path) == [(0.0, "first"), (2.5, "scene"), (5.0, "interval"), (7.5, "scene")]
    # Without the scene score, only the interval samples that show something new: 2.5 s cuts land on 3 s and 8 s.
    assert kept(path, Sampling(scene_threshold=0)) == [
        (0.0, "first"),
        (3.0, "interval"),
        (5.0, "interval"),
        (8.0, "interval"),
    ]


def test_without_the_pdq_skip_every_sample_is_kept(clips: Path) -> None:
    path = videos.static_clip(clips, seconds=5.0)
    assert [time for time, _ in kept(path, Sampling(pdq_skip=-1))] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_panning_shot_is_sampled_each_second(clips: Path) -> None:
    path = videos.write_clip(clips / "pan.mp4", [videos.Shot(4.0, photo_image("astronaut"), pan=0.2)])
    assert [time for time, _ in kept(path)] == [0.0, 1.0, 2.0, 3.0]


def test_kept_frames_carry_their_pdq_hash_and_full_image(clips: Path) -> None:
    frames = list(sample_frames(videos.shots_clip(clips, ["chelsea", "rocket"], 1.5), Sampling(), LIMITS))
    assert [frame.index for frame in frames] == [0, 15]
    for frame in frames:
        assert frame.image.mode == "RGB" and frame.image.size == (160, 120)
        assert frame.pdq_quality >= 50
        assert pdq_hash(frame.image) == (frame.pdq, frame.pdq_quality)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animated_image_is_judged_on_its_frames(clips: Path, fmt: str) -> None:
    path = videos.animated_image(clips, fmt)
    frames = list(sample_frames(path, Sampling(), LIMITS))
    assert [(frame.index, frame.time_s) for frame in frames] == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]
    originals = videos.still_frames(path)
    for frame, original in zip(frames, originals, strict=True):
        assert pdq_hash(frame.image)[0] == frame.pdq
        assert pdq_distance(pdq_hash(original)[0], frame.pdq) <= 16  # the same pictures, in order
    assert len({frame.pdq for frame in frames}) == 4


def test_the_frame_cap_stretches_the_interval_over_the_whole_video(clips: Path) -> None:
    names = ["astronaut", "coffee", "chelsea", "rocket"] * 3
    path = videos.shots_clip(clips, names, seconds=1.25)  # 15 s, a cut every 1.25 s
    frames = kept(path, Sampling(max_frames=5))
    assert len(frames) == 5
    assert frames[-1][0] >= 11.0  # the end of the video is still seen


def test_the_frame_cap_holds_with_scene_changes_everywhere(clips: Path) -> None:
    path = videos.shots_clip(clips, ["astronaut", "coffee", "chelsea", "rocket"] * 4, seconds=0.5)
    assert len(kept(path, Sampling(max_frames=6))) <= 6


@pytest.mark.parametrize(
    ("make", "code", "status"),
    [
        (videos.corrupt_clip, "video_corrupt", 422),
        (videos.truncated_clip, "video_corrupt", 422),
        (videos.audio_only, "video_no_stream", 422),
        (videos.unsupported_codec_clip, "video_codec_unsupported", 422),
        (videos.huge_frames_clip, "video_frame_too_large", 422),
    ],
)
def test_broken_and_hostile_files_are_refused_with_a_code(clips: Path, make, code: str, status: int) -> None:  # type: ignore[no-untyped-def]
    path = make(clips)
    with pytest.raises(VideoError) as probed:
        probe(path, LIMITS)
    assert (probed.value.code, probed.value.http_status) == (code, status)
    with pytest.raises(VideoError) as sampled:
        list(sample_frames(path, Sampling(), LIMITS))
    assert sampled.value.code == code


def test_limits_on_length_bytes_and_emptiness(clips: Path, tmp_path: Path) -> None:
    path = videos.shots_clip(clips, ["astronaut", "coffee"], seconds=2.0)
    short = VideoLimits(max_bytes=LIMITS.max_bytes, max_seconds=3, max_side=4096, min_side=8)
    with pytest.raises(VideoError, match=r"4\.0 s long; the limit is 3 s") as too_long:
        probe(path, short)
    assert too_long.value.code == "video_too_long"
    small = VideoLimits(max_bytes=1000, max_seconds=60, max_side=4096, min_side=8)
    with pytest.raises(VideoError) as too_large:
        probe(path, small)
    assert (too_large.value.code, too_large.value.http_status) == ("video_too_large", 413)
    tiny = VideoLimits(max_bytes=LIMITS.max_bytes, max_seconds=60, max_side=4096, min_side=200)
    with pytest.raises(VideoError) as too_small:
        probe(path, tiny)
    assert too_small.value.code == "video_frame_too_small"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError) as nothing:
        probe(empty, LIMITS)
    assert nothing.value.code == "video_empty"
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a video at all\n" * 10)
    with pytest.raises(VideoError) as unsupported:
        probe(text, LIMITS)
    assert (unsupported.value.code, unsupported.value.http_status) == ("video_unsupported", 415)


def test_probe_reads_an_open_file_and_leaves_it_rewound(clips: Path) -> None:
    path = videos.shots_clip(clips, ["astronaut", "coffee"], seconds=2.0)
    with path.open("rb") as handle:
        assert probe(handle, LIMITS).duration_s == 4.0
        assert handle.tell() == 0
        assert len(list(sample_frames(handle, Sampling(), LIMITS))) == 2


def test_sniff_names_video_containers_and_nothing_else() -> None:
    assert sniff_video(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00") == "mp4"
    assert sniff_video(b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00") == "mov"
    ebml = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\x82\x84"
    assert sniff_video(ebml + b"webm") == "webm"
    assert sniff_video(ebml + b"matroska") == "matroska"
    assert sniff_video(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") is None  # a still AVIF image
    assert sniff_video(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None
    assert sniff_video(b"") is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MODTAG_VIDEO_FPS", "0"),
        ("MODTAG_VIDEO_FPS", "1000"),
        ("MODTAG_VIDEO_SCENE_THRESHOLD", "1.5"),
        ("MODTAG_VIDEO_PDQ_SKIP", "-1"),
        ("MODTAG_VIDEO_MAX_FRAMES", "0"),
        ("MODTAG_VIDEO_MAX_FRAMES", "99999999"),
        ("MODTAG_MAX_VIDEO_BYTES", "-1"),
        ("MODTAG_MAX_VIDEO_SECONDS", "nan"),
        ("MODTAG_MAX_VIDEO_SIDE", "lots"),
        ("MODTAG_VIDEO_DECODE_THREADS", "1000"),
    ],
)
def test_a_bad_video_setting_stops_the_process_naming_it(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None)
    assert variable in refused.value.message and refused.value.code == "settings_invalid"
