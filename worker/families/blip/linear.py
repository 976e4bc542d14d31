"""Prepacked oneDNN linear layers for models on the CPU, installed per model instance.

On the CPU, `nn.Linear` runs through `addmm`: every call lays the weight out again in the blocked
format the matrix kernels read, and adds the bias in a separate pass over the output. Packing each
weight once (what `torch.compile`'s freezing does) and fusing the bias into the product is 5-15%
faster on the vision encoder's shapes and up to twice as fast on the one-token steps of caption
decoding. In bfloat16 the results are those of `nn.Linear` (bitwise at BLIP's sizes; a small layer
may differ by the stock layer's extra rounding of its separate bias add); in float32 oneDNN replaces
MKL, which sums in another order (differences around 1e-6, relative). The GELU after the first layer of
each MLP (vision and text) is fused into that product too, saving a pass over the widest activations;
in bfloat16 it then rounds once instead of twice. Where a layer's output is added to the residual stream
(the text layers' output products here; the vision layers' attention and MLP outputs through
`linear_add`, from worker/families/blip/attention.py), the sum is fused into the product as well when
the residual has the layer's dtype (float32 models): one pass over the output instead of two, which at
batch 1 is a tenth of the vision encoder's time outside the products.

The key and value products of each text attention read the same input (the text, or the image tokens in
cross-attention) and run as one packed product of twice the width (`key_value`): fewer, wider products,
which matters most for the short rows of a text pass and a decoding step. Their separate packed copies are
dropped for it, so the memory stays that of one copy.

The packed copy doubles the memory of the linear weights. It is made when installed: a model moved
or cast afterwards falls back to the stock layer for inputs the copy does not match.
"""

from __future__ import annotations

import types
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional
from transformers.activations import GELUActivation
from transformers.models.blip.modeling_blip import BlipMLP
from transformers.models.blip.modeling_blip_text import (
    BlipTextIntermediate,
    BlipTextOutput,
    BlipTextSelfAttention,
    BlipTextSelfOutput,
)

from worker.families.blip.precision import compute_input

_PACKED = "_modtag_packed_weight"
_PACKED_KV = "_modtag_packed_key_value"
_BIAS_KV = "_modtag_key_value_bias"
_DTYPES = (torch.float32, torch.bfloat16)


def install_packed_linear(model: nn.Module) -> int:
    """Pack the weight of every CPU `nn.Linear` of `model` (float32 or bfloat16); returns how many.

    Also fuses the exact GELU of BLIP's MLPs into their first product. Does nothing where PyTorch lacks
    the oneDNN linear kernel (returns 0). Idempotent.
    """
    installed = _pack_linears(model)
    for module in model.modules():
        if isinstance(module, BlipMLP) and is_exact_gelu(module.activation_fn) and hasattr(module.fc1, _PACKED):
            module.forward = types.MethodType(_fused_mlp, module)  # type: ignore[method-assign]
        elif (
            isinstance(module, BlipTextIntermediate)
            and is_exact_gelu(module.intermediate_act_fn)
            and hasattr(module.dense, _PACKED)
        ):
            module.forward = types.MethodType(_fused_intermediate, module)  # type: ignore[method-assign]
        elif isinstance(module, BlipTextSelfOutput | BlipTextOutput) and hasattr(module.dense, _PACKED):
            module.forward = types.MethodType(_fused_output, module)  # type: ignore[method-assign]
        elif isinstance(module, BlipTextSelfAttention):
            _fuse_key_value(module)
    return installed


def key_value(attention: nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(attention.key(states), attention.value(states))` of a text attention, as one packed product where fused.

    The two are views into one output (each row's key, then its value): dense along the width, strided over rows.
    """
    key: nn.Linear = attention.key  # type: ignore[assignment]
    value: nn.Linear = attention.value  # type: ignore[assignment]
    packed: torch.Tensor | None = getattr(attention, _PACKED_KV, None)
    if (
        packed is None
        or torch.is_grad_enabled()
        or states.device.type != "cpu"
        or key.weight.dtype != packed.dtype
        or value.weight.dtype != packed.dtype
        or key.weight.device.type != "cpu"
    ):
        return key(states), value(states)
    inputs = compute_input(key, states)
    if inputs.dtype != packed.dtype:
        return key(states), value(states)
    bias: torch.Tensor | None = getattr(attention, _BIAS_KV)
    both: torch.Tensor = torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), packed, bias, "none", [], "")
    width = key.weight.shape[0]
    return both[..., :width], both[..., width:]


def linear_add(layer: nn.Linear, inputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`layer(inputs) + residual`, the sum fused into a packed layer's product where the dtypes allow.

    Exactly the stock sum's value (oneDNN adds the residual to the finished output); any other case runs the
    layer and adds as the stock code does, dtype promotion included (a float32 residual under mixed precision).
    """
    packed: torch.Tensor | None = getattr(layer, _PACKED, None)
    if (
        packed is None
        or torch.is_grad_enabled()
        or inputs.dtype != packed.dtype
        or residual.dtype != packed.dtype
        or layer.weight.dtype != packed.dtype
        or inputs.device.type != "cpu"
        or residual.device.type != "cpu"
        or residual.shape != (*inputs.shape[:-1], layer.weight.shape[0])
    ):
        output: torch.Tensor = layer(inputs)
        return output + residual
    # The kernel reads both operands as dense rows (see _packed_linear).
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
        inputs.contiguous(), residual.contiguous(), packed, layer.bias, "add"
    )
    return result


def mlp_add(mlp: nn.Module, inputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`mlp(inputs) + residual` for a vision MLP, the sum fused into its second product where it runs packed."""
    forward = mlp.__dict__.get("forward")
    if isinstance(mlp, BlipMLP) and getattr(forward, "__func__", None) is _fused_mlp:
        return linear_add(mlp.fc2, _packed_linear(mlp.fc1, inputs, "gelu"), residual)
    output: torch.Tensor = mlp(inputs)
    return output + residual


def has_packed_linear(model: nn.Module) -> bool:
    """True if some linear layer of `model` runs on a packed weight."""
    return any(hasattr(module, _PACKED) for module in model.modules())


@lru_cache(maxsize=4)
def packed_linear_available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch has the oneDNN linear kernels and they agree with `nn.Linear` here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        layer = nn.Linear(64, 48).to(dtype)
        inputs = torch.randn(2, 5, 64, generator=generator).to(dtype)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, _BATCH_HINT)
            got = torch.ops.mkldnn._linear_pointwise(inputs, packed, layer.bias, "none", [], "")
            expected = functional.linear(inputs, layer.weight, layer.bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2))


# Helpers.

# The batch size oneDNN optimises the packed layout for; measured to make no difference here
# between a one-token decoding step and a batch of 8 images' 577 tokens.
_BATCH_HINT = 4096


def _pack_linears(model: nn.Module) -> int:
    installed = 0
    for module in model.modules():
        # A layer whose forward was replaced per instance already (int8, `worker/families/blip/quant.py`) keeps it.
        if type(module) is not nn.Linear or hasattr(module, _PACKED) or "forward" in module.__dict__:
            continue
        weight = module.weight
        if weight.device.type != "cpu" or weight.dtype not in _DTYPES or not packed_linear_available(weight.dtype):
            continue
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
        # A plain attribute, not a buffer: it never enters a state dict.
        object.__setattr__(module, _PACKED, packed)
        module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        installed += 1
    return installed


def _fuse_key_value(attention: BlipTextSelfAttention) -> None:
    key: nn.Linear = attention.key
    value: nn.Linear = attention.value
    if hasattr(attention, _PACKED_KV) or not (
        isinstance(getattr(key, _PACKED, None), torch.Tensor)
        and isinstance(getattr(value, _PACKED, None), torch.Tensor)
    ):
        return
    if (key.bias is None) != (value.bias is None) or key.weight.shape[1] != value.weight.shape[1]:
        return
    with torch.no_grad():
        weight = torch.cat([key.weight.detach(), value.weight.detach()])
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
        bias = None if key.bias is None else torch.cat([key.bias.detach(), value.bias.detach()])  # type: ignore[union-attr]
    object.__setattr__(attention, _PACKED_KV, packed)
    object.__setattr__(attention, _BIAS_KV, bias)
    for layer in (key, value):
        # The separate copies go (memory); None still marks the layer as seen, so packing again skips it, and a
        # direct call runs the stock layer.
        del layer.__dict__["forward"]
        object.__setattr__(layer, _PACKED, None)


def _packed_forward(self: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return _packed_linear(self, inputs, "none")


def _packed_linear(layer: nn.Linear, inputs: torch.Tensor, activation: str) -> torch.Tensor:
    packed: torch.Tensor = getattr(layer, _PACKED)
    if layer.weight.dtype == packed.dtype:
        # A float32 residual meeting a bf16 layer (worker/families/blip/precision.py) is rounded once, here.
        inputs = compute_input(layer, inputs)
    if (
        torch.is_grad_enabled()  # the packed kernel has no backward
        or inputs.dtype != packed.dtype
        or inputs.device.type != "cpu"
        or layer.weight.dtype != packed.dtype
        or layer.weight.device.type != "cpu"
    ):
        output = functional.linear(inputs, layer.weight, layer.bias)
        return functional.gelu(output) if activation == "gelu" else output
    # The kernel reads its input as dense rows: a strided view would give wrong numbers.
    # ("gelu", "none") is the exact, erf-based GELU, as BLIP's configs ask.
    algorithm = "none" if activation == "gelu" else ""
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        inputs.contiguous(), packed, layer.bias, activation, [], algorithm
    )
    return result


def _fused_mlp(self: BlipMLP, hidden_states: torch.Tensor) -> torch.Tensor:
    fc2: nn.Linear = self.fc2
    return fc2(_packed_linear(self.fc1, hidden_states, "gelu"))


def _fused_intermediate(self: BlipTextIntermediate, hidden_states: torch.Tensor) -> torch.Tensor:
    return _packed_linear(self.dense, hidden_states, "gelu")


def _fused_output(
    self: BlipTextSelfOutput | BlipTextOutput, hidden_states: torch.Tensor, input_tensor: torch.Tensor
) -> torch.Tensor:
    # The stock forward: dense, dropout (the identity outside training), LayerNorm(hidden + input_tensor).
    if self.training:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
    normed: torch.Tensor = self.LayerNorm(linear_add(self.dense, hidden_states, input_tensor))
    return normed


def is_exact_gelu(activation: object) -> bool:
    return isinstance(activation, GELUActivation) and getattr(activation, "act", None) is functional.gelu
