"""Nearest PDQ hash in a bank by Hamming distance: multi-index hashing over 16-bit chunks, in numpy.

Why multi-index hashing: a 256-bit hash cut into 16 chunks of 16 bits that differs from the query in
at most d bits has at least one chunk within d // 16 bits of the query's (pigeonhole: 16 chunks all
2 bits off would be 32 bits). For the usual d = 31, each chunk is looked up at its own value and its
16 one-bit neighbours in a sorted copy of that chunk's column (17 x 16 binary searches), and only the
few items found there (about n / 4000 for random hashes) get the full 256-bit distance. A full scan
(XOR and popcount of every hash) is the fallback for d >= 32 and small banks, where it is as fast.
`modtag bench --banks N` measures both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_CHUNKS = 16
_CHUNK_BITS = 16
_SCAN_BELOW = 4096  # banks smaller than this are scanned: building chunk tables would cost more than it saves
_FLIPS = np.array([1 << bit for bit in range(_CHUNK_BITS)], dtype=np.uint16)


@dataclass(frozen=True)
class Nearest:
    """The closest hash within the distance asked for: its position in the index and its distance."""

    position: int
    distance: int


class PdqIndex:
    """An immutable index over PDQ hashes (64 hex digits each), answering the nearest one within a distance."""

    def __init__(self, hashes: Sequence[str]) -> None:
        self.size = len(hashes)
        raw = bytes.fromhex("".join(hashes)) if hashes else b""
        # Big-endian words keep the hex text's bit order; the distance does not care, the chunks must agree.
        self._words = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 4)
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        if self.size >= _SCAN_BELOW:
            columns = np.frombuffer(raw, dtype=">u2").astype(np.uint16).reshape(-1, _CHUNKS)
            for chunk in range(_CHUNKS):
                order = np.argsort(columns[:, chunk], kind="stable").astype(np.int32)
                self._chunks.append((columns[order, chunk], order))

    @property
    def nbytes(self) -> int:
        """The memory the index holds, in bytes."""
        return int(self._words.nbytes + sum(values.nbytes + order.nbytes for values, order in self._chunks))

    def nearest(self, pdq: str, max_distance: int) -> Nearest | None:
        """The closest indexed hash at most `max_distance` bits from `pdq`, or None."""
        if self.size == 0:
            return None
        query = np.frombuffer(bytes.fromhex(pdq), dtype=">u8").astype(np.uint64)
        if self._chunks and max_distance < 2 * _CHUNKS:
            candidates = self._candidates(pdq)
            if candidates.size == 0:
                return None
            distances = _distances(self._words[candidates], query)
            best = int(np.argmin(distances))
            position, distance = int(candidates[best]), int(distances[best])
        else:
            distances = _distances(self._words, query)
            position = int(np.argmin(distances))
            distance = int(distances[position])
        return Nearest(position, distance) if distance <= max_distance else None

    def _candidates(self, pdq: str) -> np.ndarray:
        """Positions whose hash has some chunk within one bit of the query's: a superset of every match <= 31."""
        chunks = np.frombuffer(bytes.fromhex(pdq), dtype=">u2").astype(np.uint16)
        found: list[np.ndarray] = []
        for chunk, (values, order) in enumerate(self._chunks):
            probes = np.concatenate(([chunks[chunk]], chunks[chunk] ^ _FLIPS))
            starts = np.searchsorted(values, probes, side="left")
            ends = np.searchsorted(values, probes, side="right")
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                if end > start:
                    found.append(order[start:end])
        return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int32)


def _distances(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words ^ query).sum(axis=1, dtype=np.uint16)
