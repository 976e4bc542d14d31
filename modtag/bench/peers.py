"""`modtag bench --peers`: the bench's vision stage and packed text row through OpenVINO and ONNX Runtime, in one run.

The vision encoder is most of the engine's time, and it is what a user would hand to another runtime.
The same caption model's vision encoder (stock float32 weights, exported once per peer) runs on the same
batch of preprocessed photos as modtag's engine runs it (fused attention, packed or int8 linear
layers) at each dtype, and as the engine runs it with PyTorch's attention instead of the native kernel
(worker/families/blip/native), the figure before that kernel; the float32 and bf16 encoders run on one
photo too (batch 1: a worker's latency when jobs arrive one by one). The text row is the match (ITM) text
encoder over the bench's 16 texts packed into one sequence over one photo's image tokens, as the engine
runs a match pass, and OpenVINO running the stock text encoder on the same packed inputs at float32.
OpenVINO compiles each shape statically (its best case). The timings interleave, each round in another order
and each timed call follows an untimed one of the same runtime (a runtime's threads may still spin after
it returns, slowing whichever runs next; a worker runs one runtime only), so load from other processes
hits every runtime alike and none pays for another's threads.
The peers are an optional extra (`pip install 'modtag[peers]'`); without them the report says so.
On CUDA there are no peers to run: the report holds the vision stage's share of the card's peak instead
(`modtag/bench/gpu.py`).
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from worker.families.blip.attention import has_native_attention
from worker.families.blip.engine import Engine, ImageRequest
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
    """ms per image of the caption model's vision encoder per runtime and dtype (at `batch_size` and at 1), and
    ms per packed row of the bench's texts through the match text encoder."""
    from modtag.bench.common import TEXTS, photos

    peers = installed_peers()
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        from modtag.bench.gpu import vision_share

        return vision_share(models, cache_dir, torch_device, batch_size, repeat, log)
    if not peers or torch_device.type != "cpu":
        message = INSTALL_HINT if not peers else "peers: OpenVINO and ONNX Runtime are compared on CPUs only"
        return {"installed": peers, "message": message, "ms_per_image": {}}
    stock = load_models(models, {"caption"}, cache_dir=cache_dir, device=device, dtype="float32").get("caption")
    pixels = stock.processor(images=photos(batch_size), return_tensors="pt")["pixel_values"].float()
    single = pixels[:1].clone()
    runners: dict[str, _Runner] = {}
    errors: dict[str, str] = {}
    dtypes = ["float32"] + ([] if fast_dtype(torch_device) == torch.float32 else ["bfloat16"])
    engines: list[Engine] = []
    kernel_runs = False
    for dtype in [*dtypes, *(["int8"] if int8_linear_available() else [])]:
        encoder, compute = _modtag_encoder(models, cache_dir, device, dtype, True, engines, log)
        kernel_runs = kernel_runs or has_native_attention(encoder)
        runners[f"modtag {dtype}"] = _Runner(_torch_runner(encoder, pixels.to(compute)), VISION, batch_size)
        if dtype in dtypes:
            runners[f"modtag {dtype} b1"] = _Runner(_torch_runner(encoder, single.to(compute)), VISION_1, 1)
    # The figures before the native kernel, where it runs here.
    for dtype in [dtype for dtype in dtypes if kernel_runs and cpu_supports(getattr(torch, dtype))]:
        encoder, compute = _modtag_encoder(models, cache_dir, device, dtype, False, engines, log)
        runners[f"modtag {dtype}, torch attention"] = _Runner(
            _torch_runner(encoder, pixels.to(compute)), VISION, batch_size
        )
    log("peers: modtag text encoder at float32, one packed row")
    text_row = _TextRow.of(models, cache_dir, device, single, TEXTS, engines)
    runners["modtag float32 text"] = _Runner(text_row.modtag, TEXT, 1, calls=TEXT_CALLS)
    vision: nn.Module = stock.model.vision_model  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="modtag-peers-") as tmp:
        for peer in peers:
            log(f"peers: converting the vision encoder for {peer}")
            try:
                runners.update(_PEER_RUNNERS[peer](vision, pixels, dtypes, Path(tmp)))
                if peer == "openvino":
                    runners["openvino float32 text"] = _Runner(_openvino_text_runner(text_row), TEXT, 1, TEXT_CALLS)
            except Exception as exc:  # a peer that cannot convert this model is reported, not fatal
                errors[peer] = f"{type(exc).__name__}: {exc}"[:300]
        # The stock models were only there to convert: their memory goes before the timings (the shared box of 23 GB
        # this was written on ran out with them kept).
        del vision, stock
        text_row.stock = None
        gc.collect()
        log("peers: timing, interleaved")
        times: dict[str, list[float]] = {name: [] for name in runners}
        order = list(runners)
        with torch.inference_mode():
            for runner in runners.values():
                runner.run()  # warm-up
            for round_ in range(repeat):
                for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                    runner = runners[name]
                    runner.run()  # untimed: the previous runtime's threads, which may spin on after it returns, settle
                    started = time.perf_counter()
                    for _ in range(runner.calls):
                        runner.run()
                    times[name].append((time.perf_counter() - started) / runner.calls)
    del engines
    gc.collect()

    def ms(group: str) -> dict[str, float]:
        return {
            name.removesuffix(_SUFFIX[group]): statistics.median(times[name]) * 1000 / runners[name].images
            for name in runners
            if runners[name].group == group
        }

    return {
        "installed": peers,
        "batch_size": batch_size,
        "ms_per_image": ms(VISION),
        "ms_per_image_batch1": ms(VISION_1),
        "text_row": {"texts": len(TEXTS), "tokens": text_row.tokens, "ms": ms(TEXT)},
        "errors": errors,
        "versions": {peer: _version(peer) for peer in peers},
    }


def format_peers(peers: dict[str, Any]) -> list[str]:
    """The peers' lines of the bench's table."""
    if "peak_flops" in peers:  # a GPU: the vision stage against the card (gpu.py)
        from modtag.bench.gpu import format_vision_share

        return format_vision_share(peers)
    if not peers["ms_per_image"]:
        return [peers["message"]]
    lines = [f"vision stage, ms per image (batches of {peers['batch_size']}; median of interleaved runs):"]
    lines += _fastest_first(peers["ms_per_image"])
    if peers.get("ms_per_image_batch1"):
        lines += ["vision stage, ms per image at batch 1:", *_fastest_first(peers["ms_per_image_batch1"])]
    row = peers.get("text_row")
    if row and row["ms"]:
        lines += [f"match text encoder, ms per packed row ({row['texts']} texts, {row['tokens']} tokens, one photo):"]
        lines += _fastest_first(row["ms"])
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


# The timed rows: the vision encoder at the bench's batch size and at 1, and the packed text row.
VISION, VISION_1, TEXT = "vision", "vision batch 1", "text row"
_SUFFIX = {VISION: "", VISION_1: " b1", TEXT: " text"}
TEXT_CALLS = 4  # a text row takes a tenth of a batch of images: a few calls per timing keep the clock's share small


@dataclass(frozen=True)
class _Runner:
    run: Callable[[], object]
    group: str
    images: int  # what one call's time is divided by (images, or 1 for a text row)
    calls: int = 1  # calls per timing


def _fastest_first(ms: dict[str, float]) -> list[str]:
    width = max(map(len, ms)) + 2
    return [f"  {name:<{width}}{value:>7.1f}" for name, value in sorted(ms.items(), key=lambda kv: kv[1])]


@dataclass
class _TextRow:
    """One match pass as the engine runs it: the bench's texts packed in one row over one photo's image tokens."""

    modtag: Callable[[], object]
    stock: nn.Module | None  # the stock float32 text encoder, for the peers to convert (then dropped)
    inputs: dict[str, torch.Tensor]  # what the engine hands the text encoder for this row
    tokens: int

    @classmethod
    def of(
        cls,
        models: str,
        cache_dir: Path,
        device: str,
        pixels: torch.Tensor,
        texts: tuple[str, ...],
        engines: list[Engine],
    ) -> _TextRow:
        loaded = load_models(models, {"itm"}, cache_dir=cache_dir, device=device, dtype="float32")
        stock: Any = load_models(models, {"itm"}, cache_dir=cache_dir, device=device, dtype="float32").get("itm").model
        engine = Engine(loaded)
        engines.append(engine)
        model: Any = loaded.get("itm").model
        image = Image.new("RGB", (pixels.shape[-1], pixels.shape[-2]))  # the texts' packing needs a request only
        batch = engine.preprocess([ImageRequest(image, caption=False, texts=texts)])
        (text_pass,) = batch.match_passes
        with torch.no_grad():  # not inference mode: OpenVINO traces the text encoder on these tensors
            image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
            additive = torch.zeros(text_pass.segments.shape, dtype=torch.float32)
            additive.masked_fill_(~text_pass.segments, torch.finfo(torch.float32).min)
        inputs = {
            "input_ids": text_pass.input_ids,
            "position_ids": text_pass.position_ids,
            "attention_mask": additive[:, None],
            "encoder_hidden_states": image_embeds,
        }
        # Engine._encode_texts is the engine's match pass itself, mask building and all.
        return cls(
            lambda: engine._encode_texts(model.text_encoder, image_embeds, text_pass),
            stock.text_encoder,
            inputs,
            int(text_pass.input_ids.shape[1]),
        )


def _torch_runner(vision: nn.Module, pixels: torch.Tensor) -> Callable[[], object]:
    return lambda: vision(pixel_values=pixels).last_hidden_state


def _openvino_runners(vision: nn.Module, pixels: torch.Tensor, dtypes: list[str], _: Path) -> dict[str, _Runner]:
    import openvino

    converted = openvino.convert_model(vision, example_input={"pixel_values": pixels})
    runners: dict[str, _Runner] = {}
    for batch, group in ((pixels.shape[0], VISION), (1, VISION_1)):
        inputs = pixels[:batch].numpy()
        converted.reshape({"pixel_values": list(inputs.shape)})
        for dtype in dtypes:
            name = f"openvino {dtype}{_SUFFIX[group]}"
            runners[name] = _Runner(_call(_openvino_compile(converted, dtype), inputs), group, batch)
        if pixels.shape[0] == 1:
            break
    return runners


def _openvino_compile(converted: Any, dtype: str) -> Any:
    import openvino

    # One synchronous request of the whole batch, as modtag runs it, on as many threads as torch has.
    return openvino.Core().compile_model(
        converted,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "f32" if dtype == "float32" else "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        },
    )


def _openvino_text_runner(row: _TextRow) -> Callable[[], object]:
    import openvino

    assert row.stock is not None  # converted before the timings drop it
    converted = openvino.convert_model(_TextEncoder(row.stock), example_input=tuple(row.inputs.values()))
    compiled = _openvino_compile(converted, "float32")
    inputs = [tensor.numpy() for tensor in row.inputs.values()]
    return _call(compiled, inputs)


def _call(function: Callable[[Any], object], argument: object) -> Callable[[], object]:
    return lambda: function(argument)


def _onnxruntime_runners(vision: nn.Module, pixels: torch.Tensor, _: list[str], tmp: Path) -> dict[str, _Runner]:
    import onnxruntime

    path = tmp / "vision.onnx"
    wrapped = _LastHiddenState(vision)
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            (pixels,),
            str(path),
            input_names=["pixel_values"],
            dynamic_axes={"pixel_values": {0: "batch"}},
            dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    # Its threads otherwise spin on after each run, taking the cores from whichever runtime runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runners = {"onnxruntime float32": _Runner(_session_call(session, pixels), VISION, pixels.shape[0])}
    if pixels.shape[0] > 1:
        runners["onnxruntime float32 b1"] = _Runner(_session_call(session, pixels[:1]), VISION_1, 1)
    return runners


def _session_call(session: Any, pixels: torch.Tensor) -> Callable[[], object]:
    inputs = {"pixel_values": pixels.numpy()}
    return lambda: session.run(None, inputs)


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        hidden: torch.Tensor = self.text_encoder(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        ).last_hidden_state
        return hidden


class _LastHiddenState(nn.Module):
    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.vision(pixel_values=pixel_values).last_hidden_state
        return hidden


_PEER_RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor, list[str], Path], dict[str, _Runner]]] = {
    "openvino": _openvino_runners,
    "onnxruntime": _onnxruntime_runners,
}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
