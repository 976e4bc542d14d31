"""`modtag bench --peers`: the bench's vision stage through OpenVINO and ONNX Runtime beside modtag's, in one run.

The vision encoder is most of the engine's time, and it is what a user would hand to another runtime.
The same caption model's vision encoder (stock float32 weights, exported once per peer) runs on the same
batch of preprocessed photos as modtag's engine runs it (fused attention, packed or int8 linear
layers) at each dtype, and as the engine runs it with PyTorch's attention instead of the native kernel
(worker/families/blip/native), the figure before that kernel. The timings interleave, each round in another order
and each timed call follows an untimed one of the same runtime (a runtime's threads may still spin after
it returns, slowing whichever runs next; a worker runs one runtime only), so load from other processes
hits every runtime alike and none pays for another's threads.
The peers are an optional extra (`pip install 'modtag[peers]'`); without them the report says so.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.families.blip.attention import has_native_attention
from worker.families.blip.engine import Engine
from worker.families.blip.models import fast_dtype, load_models, resolve_device
from worker.families.blip.native import cpu_supports
from worker.families.blip.quant import int8_linear_available

PEERS = ("openvino", "onnxruntime")
INSTALL_HINT = (
    "peers: neither openvino nor onnxruntime is installed; pip install 'modtag[peers]' "
    "to time the vision stage through them in the same run"
)


def installed_peers() -> list[str]:
    """The peer runtimes this environment can import."""
    return [name for name in PEERS if importlib.util.find_spec(name) is not None]


def peers_bench(
    models: str, cache_dir: Path, device: str, batch_size: int, repeat: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """ms per image of the caption model's vision encoder, per runtime and dtype, on one batch of photos."""
    from modtag.bench.common import photos

    peers = installed_peers()
    torch_device = resolve_device(device)
    if not peers or torch_device.type != "cpu":
        message = INSTALL_HINT if not peers else "peers: OpenVINO and ONNX Runtime are compared on CPUs only"
        return {"installed": peers, "message": message, "ms_per_image": {}}
    stock = load_models(models, {"caption"}, cache_dir=cache_dir, device=device, dtype="float32").get("caption")
    pixels = stock.processor(images=photos(batch_size), return_tensors="pt")["pixel_values"].float()
    runners: dict[str, Callable[[], object]] = {}
    errors: dict[str, str] = {}
    dtypes = ["float32"] + ([] if fast_dtype(torch_device) == torch.float32 else ["bfloat16"])
    engines: list[Engine] = []
    kernel_runs = False
    for dtype in [*dtypes, *(["int8"] if int8_linear_available() else [])]:
        encoder, compute = _modtag_encoder(models, cache_dir, device, dtype, True, engines, log)
        kernel_runs = kernel_runs or has_native_attention(encoder)
        runners[f"modtag {dtype}"] = _torch_runner(encoder, pixels.to(compute))
    # The figures before the native kernel, where it runs here.
    for dtype in [dtype for dtype in dtypes if kernel_runs and cpu_supports(getattr(torch, dtype))]:
        encoder, compute = _modtag_encoder(models, cache_dir, device, dtype, False, engines, log)
        runners[f"modtag {dtype}, torch attention"] = _torch_runner(encoder, pixels.to(compute))
    vision: nn.Module = stock.model.vision_model  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="modtag-peers-") as tmp:
        for peer in peers:
            log(f"peers: converting the vision encoder for {peer}")
            try:
                runners.update(_PEER_RUNNERS[peer](vision, pixels, dtypes, Path(tmp)))
            except Exception as exc:  # a peer that cannot convert this model is reported, not fatal
                errors[peer] = f"{type(exc).__name__}: {exc}"[:300]
        log("peers: timing, interleaved")
        times: dict[str, list[float]] = {name: [] for name in runners}
        order = list(runners)
        with torch.inference_mode():
            for run in runners.values():
                run()  # warm-up
            for round_ in range(repeat):
                for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                    run = runners[name]
                    run()  # untimed: the previous runtime's threads, which may spin on after it returns, settle
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
    del engines
    gc.collect()
    return {
        "installed": peers,
        "batch_size": batch_size,
        "ms_per_image": {name: statistics.median(seconds) * 1000 / batch_size for name, seconds in times.items()},
        "errors": errors,
        "versions": {peer: _version(peer) for peer in peers},
    }


def format_peers(peers: dict[str, Any]) -> list[str]:
    """The peers' lines of the bench's table."""
    if not peers["ms_per_image"]:
        return [peers["message"]]
    lines = [f"vision stage, ms per image (batches of {peers['batch_size']}; median of interleaved runs):"]
    width = max(map(len, peers["ms_per_image"])) + 2
    fastest_first = sorted(peers["ms_per_image"].items(), key=lambda kv: kv[1])
    lines += [f"  {name:<{width}}{ms:>6.0f}" for name, ms in fastest_first]
    lines += [f"  {peer} failed: {error}" for peer, error in peers["errors"].items()]
    return lines


# Helpers.


def _modtag_encoder(
    models: str,
    cache_dir: Path,
    device: str,
    dtype: str,
    native: bool,
    engines: list[Engine],
    log: Callable[[str], None],
) -> tuple[nn.Module, torch.dtype]:
    """The caption model's vision encoder at `dtype` with the engine's attention and linear layers, and the dtype
    it computes in (bf16 for int8)."""
    log(f"peers: modtag vision encoder at {dtype}" + ("" if native else ", PyTorch's attention"))
    loaded = load_models(models, {"caption"}, cache_dir=cache_dir, device=device, dtype=dtype)
    engines.append(Engine(loaded, native_kernels=native))  # kept until the timings are done
    encoder: nn.Module = loaded.get("caption").model.vision_model  # type: ignore[assignment]
    return encoder, loaded.dtype


def _torch_runner(vision: nn.Module, pixels: torch.Tensor) -> Callable[[], object]:
    return lambda: vision(pixel_values=pixels).last_hidden_state


def _openvino_runners(
    vision: nn.Module, pixels: torch.Tensor, dtypes: list[str], _: Path
) -> dict[str, Callable[[], object]]:
    import openvino

    converted = openvino.convert_model(vision, example_input={"pixel_values": pixels})
    core = openvino.Core()
    runners: dict[str, Callable[[], object]] = {}
    inputs = pixels.numpy()
    for dtype in dtypes:
        # One synchronous request of the whole batch, as modtag runs it, on as many threads as torch has.
        compiled = core.compile_model(
            converted,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "f32" if dtype == "float32" else "bf16",
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            },
        )
        runners[f"openvino {dtype}"] = _call(compiled, inputs)
    return runners


def _call(function: Callable[[Any], object], argument: object) -> Callable[[], object]:
    return lambda: function(argument)


def _onnxruntime_runners(
    vision: nn.Module, pixels: torch.Tensor, _: list[str], tmp: Path
) -> dict[str, Callable[[], object]]:
    import onnxruntime

    path = tmp / "vision.onnx"
    wrapped = _LastHiddenState(vision)
    with torch.no_grad():
        torch.onnx.export(wrapped, (pixels,), str(path), input_names=["pixel_values"], dynamo=False)
    options = onnxruntime.SessionOptions()
    # Its threads otherwise spin on after each run, taking the cores from whichever runtime runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {"pixel_values": pixels.numpy()}
    return {"onnxruntime float32": lambda: session.run(None, inputs)}


class _LastHiddenState(nn.Module):
    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.vision(pixel_values=pixel_values).last_hidden_state
        return hidden


_PEER_RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor, list[str], Path], dict[str, Callable[[], object]]]] = {
    "openvino": _openvino_runners,
    "onnxruntime": _onnxruntime_runners,
}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
