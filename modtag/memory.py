"""A process's memory as Linux reports it, for the benches and tests that measure it (no torch, no API imports)."""

from __future__ import annotations

from pathlib import Path


def process_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak resident set) of `pid`, in MB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields
