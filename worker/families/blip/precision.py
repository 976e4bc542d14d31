"""Mixed precision for BLIP at bfloat16 (or float16): the products in the fast dtype, the judgement in float32.

Run wholly in bfloat16, a transformer drifts from its float32 self mostly through what is not a matrix
product: the residual stream is rounded to 8 bits of mantissa after every sublayer (24 roundings in a
12-layer encoder, each of the size of the largest activations), layer norms read and write it at that
precision, and the final projections round the values a threshold is compared with. The matrix products
themselves accumulate in float32 inside the kernels; only their inputs and outputs are rounded.

`install_mixed_precision` keeps, on one model instance:

- every layer norm in float32 (weights, arithmetic and output), so the residual stream that runs
  between them (from the vision embeddings' output on: the sums of each sublayer's output and its input)
  stays float32;
- the final projections (`vision_proj`, `text_proj`, `itm_head`) in float32: the ITC features and
  the ITM logits a policy's thresholds are compared with;
- every other linear layer in the fast dtype: its input is rounded to that dtype once, at the product
  (`worker/families/blip/linear.py` and `quant.py` do it in their kernels' wrappers; a layer neither
  packed nor quantized, on a GPU, gets a small wrapper here), and its output is in that dtype, so
  attention and the MLPs compute as before.

This is what OpenVINO does to a bf16 model by default (its "keep precision sensitive operations in
float32"). The vision output, the ITM probabilities and the caption tokens then follow float32 much
more closely (`modtag bench` reports the drift beside the speed); the cost is the extra float32
traffic of the residual adds and layer norms, small beside the products.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional
from transformers.models.blip.modeling_blip import BlipVisionEmbeddings

_MARK = "_modtag_mixed_precision"
_STOCK = "_modtag_stock_forward"
# The layers whose output is a score, a feature a threshold sees or the logits a caption token is chosen from
# (by module name): computed in float32.
FLOAT32_HEADS = ("vision_proj", "text_proj", "itm_head", "cls.predictions.decoder")


def install_mixed_precision(model: nn.Module) -> bool:
    """Keep the layer norms, the residual stream and the final projections of `model` in float32.

    Only for a model loaded in bfloat16 or float16; returns whether it installed (idempotent: False when
    done before or when the model computes in float32). Install it before the linear layers are packed or
    quantized, so the float32 heads are packed at float32.
    """
    dtype = _compute_dtype(model)
    if getattr(model, _MARK, False) or dtype is None:
        return False
    for name, head in model.named_modules():
        if isinstance(head, nn.Linear) and name.endswith(FLOAT32_HEADS):
            head.float()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
            module.forward = types.MethodType(_float32_layer_norm, module)  # type: ignore[method-assign]
        elif isinstance(module, BlipVisionEmbeddings):
            # The patch product and position sum stay in the fast dtype: in float32 they cost 2% of the vision
            # encoder's time and moved its output no closer to float32's (measured at base size).
            object.__setattr__(module, _STOCK, module.forward)
            module.forward = types.MethodType(_float32_embeddings, module)  # type: ignore[method-assign]
    object.__setattr__(model, _MARK, True)
    return True


def has_mixed_precision(model: nn.Module) -> bool:
    """True if `install_mixed_precision` was installed on `model`."""
    return bool(getattr(model, _MARK, False))


def compute_input(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` in the dtype `layer` computes in: float32 residuals meet a bf16 layer here, rounded once."""
    dtype = layer.weight.dtype
    if inputs.dtype == dtype or not inputs.is_floating_point() or not dtype.is_floating_point:
        return inputs
    return inputs.to(dtype)


def install_input_casts(model: nn.Module) -> int:
    """Give every plain linear layer of a mixed-precision `model` a forward that casts its input; returns how many.

    For layers neither packed nor quantized (on a GPU, or where the kernels are missing): the packed and
    int8 wrappers cast in their own code. Call it after those were installed.
    """
    if not has_mixed_precision(model):
        return 0
    installed = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = types.MethodType(_casting_linear, module)  # type: ignore[method-assign]
            installed += 1
    return installed


# Helpers.


def _compute_dtype(model: nn.Module) -> torch.dtype | None:
    for parameter in model.parameters():
        if parameter.dtype in (torch.bfloat16, torch.float16):
            return parameter.dtype
        if parameter.is_floating_point():
            return None
    return None


def _float32_layer_norm(self: nn.LayerNorm, inputs: torch.Tensor) -> torch.Tensor:
    return functional.layer_norm(inputs.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def _float32_embeddings(self: BlipVisionEmbeddings, *args: object, **kwargs: object) -> torch.Tensor:
    # The residual stream starts here: float32 from the first layer on.
    output: torch.Tensor = getattr(self, _STOCK)(*args, **kwargs)
    return output.float()


def _casting_linear(self: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return functional.linear(compute_input(self, inputs), self.weight, self.bias)
