"""`modtag bench --banks N`: what matching an image against a bank of N PDQ hashes costs (core/pdqindex.py).

Random hashes stand in for a bank (real banks are as spread out: PDQ bits are balanced by design);
each query is a banked hash with `flips` bits changed (a near copy, found) or a fresh random hash
(an unrelated image, not found). Reported: build time, the index's memory, and the lookup time per
image by multi-index hashing and by a full scan, best of `repeat` rounds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from core.hashes import DEFAULT_MAX_DISTANCE
from core.pdqindex import PdqIndex


def run_banks_bench(
    size: int, *, queries: int = 200, flips: int = 24, repeat: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Build an index of `size` random hashes and time `queries` lookups (half near copies, half strangers)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(size, 32), dtype=np.uint8)
    hashes = [row.tobytes().hex() for row in raw]
    started = time.perf_counter()
    index = PdqIndex(hashes)
    build_s = time.perf_counter() - started
    probes, expected = _queries(rng, raw, queries, flips)
    mih = min(_timed(index, probes, DEFAULT_MAX_DISTANCE) for _ in range(repeat))
    # A distance of 32 or more takes the full scan: the same answers, timed on a few queries (it is slow on 1e6).
    scan = min(_timed(index, probes[:20], 2 * 16) for _ in range(repeat))
    found = [index.nearest(probe, DEFAULT_MAX_DISTANCE) for probe in probes]
    right = sum(
        (hit is not None and hit.position == want) if want is not None else hit is None
        for hit, want in zip(found, expected, strict=True)
    )
    return {
        "bank_size": size,
        "max_distance": DEFAULT_MAX_DISTANCE,
        "build_s": round(build_s, 3),
        "index_bytes": index.nbytes,
        "lookup_ms_per_image": round(mih * 1000, 3),
        "scan_ms_per_image": round(scan * 1000, 3),
        "queries": len(probes),
        "correct": right,
    }


def format_banks_report(report: dict[str, Any]) -> str:
    return (
        f"PDQ bank of {report['bank_size']:,} hashes: built in {report['build_s']:.2f} s, "
        f"{report['index_bytes'] / 2**20:.1f} MiB; lookup {report['lookup_ms_per_image']:.2f} ms per image "
        f"(full scan {report['scan_ms_per_image']:.2f} ms); {report['correct']}/{report['queries']} answers right"
    )


def _queries(rng: np.random.Generator, raw: np.ndarray, count: int, flips: int) -> tuple[list[str], list[int | None]]:
    probes: list[str] = []
    expected: list[int | None] = []
    for number in range(count):
        if number % 2 == 0:
            position = int(rng.integers(0, len(raw)))
            bits = np.unpackbits(raw[position])
            bits[rng.choice(256, size=flips, replace=False)] ^= 1
            probes.append(np.packbits(bits).tobytes().hex())
            expected.append(position)
        else:
            probes.append(rng.integers(0, 256, size=32, dtype=np.uint8).tobytes().hex())
            expected.append(None)
    return probes, expected


def _timed(index: PdqIndex, probes: list[str], max_distance: int) -> float:
    started = time.perf_counter()
    for probe in probes:
        index.nearest(probe, max_distance)
    return (time.perf_counter() - started) / len(probes)
