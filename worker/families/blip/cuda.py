"""CUDA graphs for the engine's fixed-shape steps (caption decoding), and whether to use them.

A caption step on a GPU is launch-bound: a few hundred small kernels (12 layers of projections, attention,
norms) that each finish in microseconds, issued one by one from Python. Captured once as a CUDA graph, a
step is one launch. Only a step whose shapes and buffers never change can be captured: the caption
decoder's fixed-shape step (`worker/families/blip/captioning.py`) keeps all of its state in tensors it
updates in place, so replaying the graph is running the step again.

Nothing here touches CUDA at import, nor unless a call is handed a CUDA tensor: the process that runs the
models initialises CUDA on its first batch, never a parent that forks later. `MODTAG_CUDA_GRAPHS=false`
turns the graphs off (the worker calls `enable_decode_graphs`); decoding then runs its eager steps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)

GRAPHS_PER_MODEL = 6  # captured shapes kept per decoder: batches padded to 1, 2, 4, 8, 16 rows, and one more
WARMUP_STEPS = 2  # steps run on a side stream before capture, as PyTorch asks (allocator and cuBLAS set-up)


def enable_decode_graphs(on: bool) -> None:
    """Whether caption decoding on CUDA may replay captured graphs: `MODTAG_CUDA_GRAPHS`, process-wide."""
    global _graphs_enabled
    _graphs_enabled = on


def decode_graphs_wanted(device: torch.device) -> bool:
    """True where caption steps should run as CUDA graphs: on a CUDA device, unless turned off."""
    return _graphs_enabled and device.type == "cuda"


class StepGraph:
    """A step function captured as a CUDA graph: `replay()` runs it again on the same buffers.

    `step` must read and write only tensors allocated before the capture (the graph keeps their addresses)
    and must not synchronise with the host (no `.item()`, no data-dependent shapes). The warm-up steps run
    on those buffers: the caller resets them before each use.
    """

    def __init__(self, step: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: a CUDA call another thread makes meanwhile (a task thread pinning memory) is not an error
        # of this capture, and is not captured either.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            step()

    def replay(self) -> None:
        self.graph.replay()


class GraphCache:
    """Per model: the decoding states and their captured graphs, by shape, least recently used first.

    A shape whose capture failed is remembered as eager (None graph) and not tried again.
    """

    def __init__(self, size: int = GRAPHS_PER_MODEL) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[Any, StepGraph | None]] = OrderedDict()

    def get(
        self, key: Hashable, build: Callable[[], Any], capture: Callable[[Any], StepGraph]
    ) -> tuple[Any, StepGraph | None]:
        """The state for `key` (built on first use) and its graph (captured then, or None if that failed)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        state = build()
        graph: StepGraph | None
        try:
            graph = capture(state)
        except RuntimeError as exc:  # an operation that cannot be captured: the steps run eagerly, as before
            log.warning("caption decoding: CUDA graph capture failed (%s); this shape decodes step by step", exc)
            graph = None
        self._entries[key] = (state, graph)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return state, graph

    def __len__(self) -> int:
        return len(self._entries)


_graphs_enabled = True
