"""Mixed precision for BLIP at bfloat16 (or float16): the products in the fast dtype, the judgement in float32.

Run wholly in bfloat16, a transformer drifts from its float32 self mostly through what is not a matrix
product: the residual stream is rounded to 8 bits of mantissa after every sublayer (24 roundings in a
12-layer encoder, each of the size of the largest activations), layer norms read and write it at that
precision, and the final projections round the values a threshold is compared with. The matrix products
themselves accumulate in float32 inside the kernels; only their inputs and outputs are rounded.

`install_mixed_precision` keeps, on one model instance:

- every layer norm in float32 (weights, arithmetic and output), so the residual stream that runs
  between them (from the embeddings' output on: the sums of each sublayer's output and its input) stays
  float32; the text embeddings' token and position rows are summed in float32;
- the final projections (`vision_proj`, `text_proj`, `itm_head`) in float32: the ITC features and
  the ITM logits a policy's thresholds are compared with;
- the language-model heads' largest logits (and those of the ids `exact_logits` names, such as the yes/no
  answers of probes) in float32: a caption's next token is the argmax of logits that differ by less than
  bf16's rounding, and a probe's P(yes) is a softmax over two of them. The head's product over the whole
  vocabulary stays in bf16 (in float32 it alone cost 3% of the workload's time);
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
from transformers.models.blip.modeling_blip_text import BlipTextLMPredictionHead

_MARK = "_modtag_mixed_precision"
_STOCK = "_modtag_stock_forward"
_EXACT_IDS = "_modtag_exact_ids"
# The layers whose output is a score or a feature a threshold sees (by module name): computed in float32.
FLOAT32_HEADS = ("vision_proj", "text_proj", "itm_head")
# The language-model heads' logits (30,522 per token) come from the bf16 product; the largest of them, which the
# next caption token is chosen from, are then computed again in float32 (see `_refined_logits`).
REFINED_LOGITS = 16


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
        elif isinstance(module, BlipTextLMPredictionHead):
            module.forward = types.MethodType(_refined_logits, module)  # type: ignore[method-assign]
        elif isinstance(module, nn.Embedding):
            # Token and position embeddings are summed in float32: the text side's residual stream starts there.
            object.__setattr__(module, _STOCK, module.forward)
            module.forward = types.MethodType(_float32_output, module)  # type: ignore[method-assign]
        elif isinstance(module, BlipVisionEmbeddings):
            # The patch product and position sum stay in the fast dtype: in float32 they cost 2% of the vision
            # encoder's time and moved its output no closer to float32's (measured at base size).
            object.__setattr__(module, _STOCK, module.forward)
            module.forward = types.MethodType(_float32_output, module)  # type: ignore[method-assign]
    object.__setattr__(model, _MARK, True)
    return True


def exact_logits(model: nn.Module, token_ids: list[int]) -> None:
    """Have `model`'s language-model heads compute the logits of `token_ids` in float32 too (mixed precision)."""
    for module in model.modules():
        if isinstance(module, BlipTextLMPredictionHead):
            object.__setattr__(module, _EXACT_IDS, torch.tensor(token_ids, dtype=torch.long))


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


def _float32_output(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    # Where the residual stream starts: float32 from here on.
    output: torch.Tensor = getattr(self, _STOCK)(*args, **kwargs)
    return output.float()


def _refined_logits(self: BlipTextLMPredictionHead, hidden_states: torch.Tensor) -> torch.Tensor:
    # The stock head, then its largest logits (and the named ones) again from the float32 transform output and
    # the same weights in float32 arithmetic: the argmax and the named softmaxes are float32's, the rest bf16's.
    states = self.transform(hidden_states)
    decoder: nn.Linear = self.decoder
    logits = decoder(states).float()
    picked = logits.topk(min(REFINED_LOGITS, logits.shape[-1]), dim=-1).indices
    named: torch.Tensor | None = getattr(self, _EXACT_IDS, None)
    if named is not None:
        picked = torch.cat([picked, named.to(picked.device).expand(*picked.shape[:-1], -1)], dim=-1)
    rows = decoder.weight[picked].float()  # (..., picked, width)
    exact = torch.einsum("...w,...pw->...p", states.float(), rows)
    if decoder.bias is not None:
        exact = exact + decoder.bias[picked].float()
    return logits.scatter_(-1, picked, exact)


def _casting_linear(self: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return functional.linear(compute_input(self, inputs), self.weight, self.bias)
