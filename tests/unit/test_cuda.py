"""The GPU paths' gating and their graph cache, on the CPU.

The captures themselves need a GPU: where a test stands in for one it says so. The fixed-shape decoding
steps that CUDA replays are checked token for token against stock generate in test_captioning.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from core.settings import Settings
from worker.families.blip.cuda import GraphCache, StepGraph, decode_graphs_wanted, enable_decode_graphs


@pytest.fixture
def graphs_setting() -> Iterator[None]:
    yield
    enable_decode_graphs(True)  # the process-wide default, for the tests after this one


def test_graphs_are_for_cuda_devices_only_and_can_be_turned_off(graphs_setting: None) -> None:
    # torch.device("cuda") is a name: making one initialises nothing, on a machine with or without CUDA.
    assert decode_graphs_wanted(torch.device("cuda")) and decode_graphs_wanted(torch.device("cuda:1"))
    assert not decode_graphs_wanted(torch.device("cpu"))
    enable_decode_graphs(False)
    assert not decode_graphs_wanted(torch.device("cuda"))


def test_the_setting_turns_graphs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODTAG_CUDA_GRAPHS", "false")
    assert Settings(_env_file=None).cuda_graphs is False  # type: ignore[call-arg]
    monkeypatch.delenv("MODTAG_CUDA_GRAPHS")
    assert Settings(_env_file=None).cuda_graphs is True  # type: ignore[call-arg]


def test_deciding_touches_no_cuda_state() -> None:
    # The worker process may fork before it runs a model: nothing before the first decode may start CUDA.
    decode_graphs_wanted(torch.device("cuda"))
    GraphCache()
    assert not torch.cuda.is_initialized()


def test_the_cache_keeps_a_few_shapes_and_does_not_retry_a_failed_capture() -> None:
    # A stand-in for torch.cuda.CUDAGraph capture, which needs a GPU: it records what was captured, or fails
    # as capturing an operation that synchronises with the host does (a RuntimeError).
    captured: list[Any] = []

    def capture(state: Any) -> StepGraph:
        captured.append(state)
        if state == "uncapturable":
            raise RuntimeError("operation not permitted when stream is capturing")
        return object.__new__(StepGraph)  # a graph object without its CUDA capture

    cache = GraphCache(size=2)
    first, graph = cache.get("batch 8", lambda: "state 8", capture)
    assert (first, graph is not None) == ("state 8", True)
    assert cache.get("batch 8", lambda: "never built", capture)[0] == "state 8"
    assert cache.get("odd", lambda: "uncapturable", capture) == ("uncapturable", None)
    assert cache.get("odd", lambda: "uncapturable", capture) == ("uncapturable", None)
    assert captured == ["state 8", "uncapturable"]  # each shape captured once, a failure not retried
    cache.get("batch 3", lambda: "state 3", capture)
    assert len(cache) == 2  # the least recently used shape ("batch 8") went
    assert cache.get("batch 8", lambda: "state 8 again", capture)[0] == "state 8 again"
