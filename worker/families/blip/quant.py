"""int8 linear layers for models on CPUs with VNNI, installed per model instance (`MODTAG_DTYPE=int8`).

Every CPU `nn.Linear` of the module given gets symmetric int8 weights, one scale per output channel, prepacked
once for oneDNN; its input is quantized to uint8 with one scale and zero point (asymmetric: the GELU outputs
feeding the second MLP layer are nearly all positive), and oneDNN's int8 product runs on the VNNI dot-product
instructions with the dequantization, the bias and (for BLIP's MLPs) the exact GELU fused into its output,
written in the input's dtype. The engine installs it on the stages `MODTAG_INT8_STAGES` names, not on whole
models (worker/families/blip/engine.py).

The input's scale is either static or dynamic. Static (`set_input_ranges`, from a calibration file:
worker/families/blip/calibration.py): each layer's input range was observed once over calibration photos
(`observe_inputs`), so a call quantizes in one pass with the stored scale, values outside it saturating, and an
image's results no longer depend on the other images of its batch. Dynamic (no calibration, as before): the
range is taken over each call's input, one pass more.

Why per call and not per token: oneDNN's int8 linear takes one activation scale, and a per-token
scale done by hand (`torch._int_mm` and an unfused float epilogue over the int32 products) was
slower than bf16 in the bench; the fused kernel is well ahead of the packed bf16 product at the
vision encoder's shapes (the README has the figures). Its bf16 input is quantized by the native
library (native/quantize.c: two parallel passes) where it builds, else by PyTorch (a float32 copy, a
min/max and fbgemm's one-thread quantizer: several times as long, a visible share of the int8 layers'
time). One consequence of a dynamic scale: an image's results depend slightly on the other images of its batch,
as the activation range is shared (the bench reports how far int8 moves scores and decisions).

Attention, layer norms and everything else stay in the model's dtype (bf16 where the CPU has it).
The float weight is kept, so a model used with gradients, moved off the CPU or fed another dtype falls
back to the stock layer.
"""

from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional
from transformers.models.blip.modeling_blip import BlipMLP
from transformers.models.blip.modeling_blip_text import BlipTextIntermediate

from worker.families.blip.linear import is_exact_gelu
from worker.families.blip.native import native_quantizer
from worker.families.blip.precision import compute_input

_INT8 = "_modtag_int8_weight"
_STATIC = "_modtag_int8_static_input"  # (scale, zero point) of the layer's input, from a calibration

# PyTorch deprecates its quantized tensor type; its quantizer is still eager mode's only vectorized
# float-to-uint8 pass (a tenth of the cost of scale, round and cast as separate passes), and the
# result is read at once as plain uint8, so the warning says nothing about this use.
warnings.filterwarnings(
    "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel", category=UserWarning
)


def install_int8_linear(model: nn.Module) -> int:
    """Quantize every CPU `nn.Linear` of `model` (a model or one of its parts) to int8 weights; returns how many.

    Their inputs are quantized dynamically until `set_input_ranges` gives them calibrated ranges.

    Also fuses the exact GELU of BLIP's MLPs into their first product. Idempotent; does nothing where
    this PyTorch lacks oneDNN's int8 linear (see `int8_linear_available`).
    """
    if not int8_linear_available():
        return 0
    installed = 0
    for module in model.modules():
        if type(module) is not nn.Linear or is_int8_linear(module) or module.weight.device.type != "cpu":
            continue
        object.__setattr__(module, _INT8, _quantize_weight(module))  # not a buffer: never in a state dict
        module.forward = types.MethodType(_int8_forward, module)  # type: ignore[method-assign]
        installed += 1
    for module in model.modules():
        if isinstance(module, BlipMLP) and is_exact_gelu(module.activation_fn) and is_int8_linear(module.fc1):
            module.forward = types.MethodType(_fused_mlp, module)  # type: ignore[method-assign]
        elif (
            isinstance(module, BlipTextIntermediate)
            and is_exact_gelu(module.intermediate_act_fn)
            and is_int8_linear(module.dense)
        ):
            module.forward = types.MethodType(_fused_intermediate, module)  # type: ignore[method-assign]
    return installed


def is_int8_linear(module: nn.Module) -> bool:
    """True if `module` is a linear layer running on int8 weights."""
    return hasattr(module, _INT8)


def has_int8_linear(model: nn.Module) -> bool:
    """True if some linear layer of `model` runs on int8 weights."""
    return any(is_int8_linear(module) for module in model.modules())


def int8_layer_names(model: nn.Module) -> list[str]:
    """The names (in `model`) of its int8 linear layers, in module order."""
    return [name for name, module in model.named_modules() if is_int8_linear(module)]


def set_input_ranges(model: nn.Module, ranges: Mapping[str, tuple[float, float]]) -> int:
    """Give the int8 layers of `model` named in `ranges` a static input scale from their (low, high); returns how many.

    Layers not named keep quantizing dynamically; a name that is no int8 layer of `model` is ignored (the
    calibration file's own checks come first: worker/families/blip/calibration.py).
    """
    applied = 0
    for name, module in model.named_modules():
        if is_int8_linear(module) and name in ranges:
            low, high = ranges[name]
            object.__setattr__(module, _STATIC, _scale_and_zero_point(low, high))
            applied += 1
    return applied


def has_static_inputs(module: nn.Module) -> bool:
    """True if `module` is an int8 linear layer quantizing its input with a calibrated scale."""
    return hasattr(module, _STATIC)


@contextmanager
def observe_inputs() -> Iterator[dict[nn.Module, tuple[float, float]]]:
    """Record, per int8 layer called on this thread inside the block, the (low, high) of every input it saw.

    Calibration: the layers quantize dynamically meanwhile (a static scale would clip what it observes).
    """
    seen: dict[nn.Module, tuple[float, float]] = {}
    _SCRATCH.observed = seen
    try:
        yield seen
    finally:
        _SCRATCH.observed = None


@lru_cache(maxsize=1)
def int8_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's int8 linear and it agrees with a float product here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        layer = nn.Linear(64, 48)
        inputs = torch.randn(2, 5, 64, generator=generator)
        with torch.no_grad():
            object.__setattr__(layer, _INT8, _quantize_weight(layer))
            got = _int8_linear(layer, inputs, "none")
            expected = functional.linear(inputs, layer.weight, layer.bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, expected, rtol=0.05, atol=0.05))


# Helpers.

# The rows oneDNN lays the packed weight out for; the vision encoder's batches are thousands of tokens.
_ROWS_HINT = 4096


@dataclass(frozen=True)
class _Int8Weight:
    packed: torch.Tensor  # int8, oneDNN's blocked layout
    scales: torch.Tensor  # (out,) float32, per output channel
    zero_points: torch.Tensor  # (out,) int64 zeros: symmetric
    bias: torch.Tensor | None  # float32: oneDNN adds it before rounding to the output dtype


def _quantize_weight(layer: nn.Linear) -> _Int8Weight:
    weight = layer.weight.detach().float()
    # 127, not 128: a symmetric range keeps -w and w exact opposites.
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(quantized, [_ROWS_HINT, layer.in_features])
    bias = None if layer.bias is None else layer.bias.detach().float()
    return _Int8Weight(
        packed=packed, scales=scales, zero_points=torch.zeros(layer.out_features, dtype=torch.long), bias=bias
    )


def _int8_forward(self: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return _int8_linear(self, inputs, "none")


def _int8_linear(layer: nn.Linear, inputs: torch.Tensor, activation: str) -> torch.Tensor:
    weight: _Int8Weight = getattr(layer, _INT8)
    # A float32 residual (worker/families/blip/precision.py) is quantized from the model's dtype, as before.
    inputs = compute_input(layer, inputs)
    if (
        torch.is_grad_enabled()
        or inputs.device.type != "cpu"
        or inputs.dtype not in (torch.float32, torch.bfloat16)
        or inputs.numel() == 0
    ):
        stock = functional.linear(inputs, layer.weight.to(inputs.dtype), _cast(layer.bias, inputs.dtype))
        return functional.gelu(stock) if activation == "gelu" else stock
    observed: dict[nn.Module, tuple[float, float]] | None = getattr(_SCRATCH, "observed", None)
    static: tuple[float, int] | None = None if observed is not None else getattr(layer, _STATIC, None)
    if observed is not None:
        _observe(observed, layer, inputs)
    quantizer = native_quantizer() if inputs.dtype == torch.bfloat16 else None
    if static is not None:
        scale, zero_point = static
        if quantizer is not None:
            quantized = quantizer.static(inputs.reshape(-1, layer.in_features), scale, zero_point)
        else:
            rows = _float_rows(inputs, layer.in_features)
            quantized = torch.quantize_per_tensor(rows, scale, zero_point, torch.quint8).view(torch.uint8)
    elif quantizer is not None:
        # The same scale, zero point and rounding in two parallel passes over the bfloat16 input (blip/native).
        quantized, scale, zero_point = quantizer(inputs.reshape(-1, layer.in_features))
    else:
        rows = _float_rows(inputs, layer.in_features)
        low, high = (float(value) for value in torch.aminmax(rows))
        scale, zero_point = _scale_and_zero_point(low, high)
        # fbgemm's vectorized quantizer; the view reads its uint8 storage without a copy.
        quantized = torch.quantize_per_tensor(rows, scale, zero_point, torch.quint8).view(torch.uint8)
    # ("gelu", "none") is the exact, erf-based GELU, as BLIP's configs ask.
    algorithm = "none" if activation == "gelu" else ""
    output: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
        quantized,
        scale,
        zero_point,
        weight.packed,
        weight.scales,
        weight.zero_points,
        weight.bias,
        1.0,
        0,
        inputs.dtype,
        activation,
        [],
        algorithm,
    )
    return output.view(*inputs.shape[:-1], layer.out_features)


def _scale_and_zero_point(low: float, high: float) -> tuple[float, int]:
    # The range must hold 0 so that zero (padding, ReLU-like outputs) stays exact.
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 or 1.0
    return scale, min(255, max(0, round(-low / scale)))


def _observe(observed: dict[nn.Module, tuple[float, float]], layer: nn.Module, inputs: torch.Tensor) -> None:
    low, high = (float(value) for value in torch.aminmax(inputs.detach()))
    if layer in observed:
        known_low, known_high = observed[layer]
        low, high = min(low, known_low), max(high, known_high)
    observed[layer] = (low, high)


def _float_rows(inputs: torch.Tensor, features: int) -> torch.Tensor:
    """The input as float32 rows (the quantizer reads float32), in this thread's reused buffer.

    A fresh float32 copy of a vision batch's MLP input is 57 MB: allocated per call, the kernel maps new
    pages every time, which is many times slower than copying into warm memory.
    """
    rows = inputs.reshape(-1, features)
    if rows.dtype == torch.float32:
        return rows.contiguous()
    buffer: torch.Tensor | None = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < rows.numel():
        buffer = torch.empty(rows.numel(), dtype=torch.float32)
        _SCRATCH.buffer = buffer
    return buffer[: rows.numel()].view(rows.shape).copy_(rows)


# Per thread: only the thread running a model uses it (in a worker, the batcher's model thread). It holds the
# float32 buffer and, while `observe_inputs` runs, the ranges observed.
_SCRATCH = threading.local()


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _fused_mlp(self: BlipMLP, hidden_states: torch.Tensor) -> torch.Tensor:
    fc2: nn.Linear = self.fc2
    return fc2(_int8_linear(self.fc1, hidden_states, "gelu"))


def _fused_intermediate(self: BlipTextIntermediate, hidden_states: torch.Tensor) -> torch.Tensor:
    return _int8_linear(self.dense, hidden_states, "gelu")
