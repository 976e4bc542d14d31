"""Fused attention for the BLIP models an engine runs, installed per model instance.

The stock BLIP classes compute attention eagerly: a score matrix, a scale, a mask add, a softmax and a
second product, each a separate pass over memory, with copies of the heads in between.
`torch.nn.functional.scaled_dot_product_attention` (SDPA) does the same arithmetic in one kernel
(FlashAttention on CUDA and CPU): used on GPUs and for float32 on CPUs (where it beats the eager code
on the vision encoder).
For bfloat16 on CPUs without AMX that kernel is slower than the eager code, and `attend` runs the two
products per cache-sized chunk of heads instead. The replacements keep the stock modules, weights,
masks and cache handling and change only how the attention is computed: in float32 they agree with
the stock classes to about 1e-6.

The vision encoder layers are replaced too, only to hand the residual to the two products that end in it
(`worker/families/blip/linear.py`'s `linear_add`: fused into a packed float32 product, the stock sum otherwise).

On CPUs with AVX-512 the vision encoders' self-attention runs a native kernel instead (worker/families/blip/native: the
scores of a block of query rows kept in cache, about 1.5x PyTorch's attention), where it can be built.

They are installed on the given model's module instances, never on the classes, so other models of the
same class (the stock baseline's, in `modtag bench` and the parity tests) keep the stock arithmetic.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoderLayer
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from worker.families.blip.linear import key_value, linear_add, mlp_add
from worker.families.blip.native import HEAD_SIZE, NativeAttention, native_attention

_MARK = "_modtag_fused_attention"
_NATIVE = "_modtag_native_attention"


def install_fused_attention(model: nn.Module, native: bool = True) -> int:
    """Replace the attention of every BLIP vision and text attention module in `model`; returns how many.

    `native`: the vision encoders' self-attention runs the native kernel where it can (worker/families/blip/native).
    Idempotent: modules already replaced are left alone (and not counted).
    """
    kernel = native_attention() if native else None
    installed = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            continue
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_vision_attention, module)  # type: ignore[method-assign]
            setattr(module, _NATIVE, kernel)
        elif isinstance(module, BlipTextSelfAttention):
            module.forward = types.MethodType(_text_attention, module)  # type: ignore[method-assign]
        elif isinstance(module, BlipEncoderLayer):
            # Not counted: the layer only hands its residual on (see _vision_layer).
            module.forward = types.MethodType(_vision_layer, module)  # type: ignore[method-assign]
            setattr(module, _MARK, True)
            continue
        else:
            continue
        setattr(module, _MARK, True)
        installed += 1
    return installed


def has_fused_attention(model: nn.Module) -> bool:
    """True if every BLIP attention module of `model` runs the fused attention."""
    modules = [m for m in model.modules() if isinstance(m, BlipAttention | BlipTextSelfAttention)]
    return bool(modules) and all(getattr(m, _MARK, False) for m in modules)


def has_native_attention(model: nn.Module) -> bool:
    """True if the vision attention of `model` runs the native kernel (at the dtypes this CPU has it for)."""
    return any(
        getattr(m, _NATIVE, None) is not None and m.head_dim == HEAD_SIZE
        for m in model.modules()
        if isinstance(m, BlipAttention)
    )


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(query key^T * scale + mask) value per head: (batch, heads, n, d) in, (batch, n, heads, d) out.

    `mask` is additive (or None) and broadcasts over the heads. SDPA where its kernel is fast: on CUDA
    and for float32 on the CPU. For bfloat16 and float16 on a CPU without AMX, PyTorch's flash kernel
    widens every block to float32 and runs at a third of the matrix units' speed; there, two batched
    products per cache-sized chunk of heads with an in-place softmax are 1.5 to 3 times faster
    (and round the scores to the dtype, as the stock eager code does).
    """
    if query.device.type != "cpu" or query.dtype == torch.float32:
        context = functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return context.transpose(1, 2)
    batch, heads, length, _ = query.shape
    keys = key.shape[-2]
    # Contiguous (batch, heads, tokens, d) operands: the products then read them in place, where
    # views into the fused qkv projection would be copied chunk by chunk. The scale is a power of
    # two for every BLIP size, so scaling the query first is exact.
    scaled = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.mul(query, scale, out=scaled)
    key, value = key.contiguous(), value.contiguous()
    out = torch.empty((batch, heads, length, value.shape[-1]), dtype=query.dtype, device=query.device)
    scores_per_image = heads * length * keys
    if scores_per_image <= _CHUNK_SCORES:
        # Whole images per chunk (all of them for a decoding step).
        step = _even_step(batch, _CHUNK_SCORES // scores_per_image)
        for start in range(0, batch, step):
            images = slice(start, start + step)
            image_mask = None if mask is None else (mask[images] if mask.shape[0] > 1 else mask)
            scores = torch.matmul(scaled[images], key[images].transpose(-1, -2))
            _masked_softmax_(scores, image_mask)
            torch.matmul(scores, value[images], out=out[images])
        return out.transpose(1, 2)
    # Large images (a ViT's 577 x 577 per head): a few heads of one image per chunk, in one buffer.
    step = _even_step(heads, _CHUNK_SCORES // (length * keys))
    buffer = torch.empty((min(step, heads), length, keys), dtype=query.dtype, device=query.device)
    for image in range(batch):
        image_mask = None if mask is None else mask[image if mask.shape[0] > 1 else 0]
        for start in range(0, heads, step):
            head_slice = slice(start, start + step)
            scores = buffer[: len(range(heads)[head_slice])]
            torch.bmm(scaled[image, head_slice], key[image, head_slice].transpose(1, 2), out=scores)
            _masked_softmax_(scores, image_mask)
            torch.bmm(scores, value[image, head_slice], out=out[image, head_slice])
    return out.transpose(1, 2)


# Helpers.

# Score elements per chunk of the reduced-precision CPU path: 1M bfloat16 scores (2 MB) stay in the
# caches between the two products: 3 heads of a ViT-B image (577 x 577 each) per chunk. Measured on
# a 2-core Zen 4: 3 to 4 heads per chunk beat 1 (small products) and 12 (scores spill to memory).
_CHUNK_SCORES = 1024 * 1024


def _even_step(count: int, most: int) -> int:
    """The chunk size that splits `count` into as few chunks of at most `most` as possible, evenly."""
    chunks = -(-count // max(1, most))
    return -(-count // chunks)


def _masked_softmax_(scores: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None:
        scores += mask
    torch.softmax(scores, dim=-1, out=scores)


# Replacement forwards.


def _vision_layer(self: BlipEncoderLayer, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    # The stock BlipEncoderLayer.forward, each residual sum handed to the product before it.
    attention = self.self_attn
    normed = self.layer_norm1(hidden_states)
    if getattr(attention, _MARK, False):
        hidden_states = _vision_attention(attention, normed, residual=hidden_states)[0]
    else:
        hidden_states = attention(hidden_states=normed, **kwargs)[0] + hidden_states
    return mlp_add(self.mlp, self.layer_norm2(hidden_states), hidden_states)


def _vision_attention(
    self: BlipAttention, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, **_: Any
) -> tuple[torch.Tensor, None]:
    # The stock forward: one qkv projection, softmax(q k^T * scale) v per head, the output projection
    # (plus `residual`, when the encoder layer hands it over). It returns the attention probabilities as
    # well, which nothing in the engine reads.
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    kernel: NativeAttention | None = getattr(self, _NATIVE, None)
    if kernel is not None and kernel.supports(query, key, value):
        context = kernel(query, key, value, self.scale)
    else:
        context = attend(query, key, value, None, self.scale)
    context = context.reshape(batch, length, width)
    if residual is not None:
        return linear_add(self.projection, context, residual), None
    return self.projection(context), None


def _text_attention(
    self: BlipTextSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    # The stock BlipTextSelfAttention.forward line for line, SDPA instead of the eager softmax.
    # Like the stock code, cross-attention uses `encoder_attention_mask` (which BlipTextAttention
    # never passes in transformers 5, so image tokens are never masked) and self-attention the
    # additive `attention_mask` built by the text model.
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)

    is_cross_attention = encoder_hidden_states is not None
    mask = encoder_attention_mask if is_cross_attention else attention_mask

    is_updated = False
    current_cache: Any = None
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            is_updated = bool(cache.is_updated.get(self.layer_idx))
            current_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        else:
            current_cache = cache

    current_states = encoder_hidden_states if is_cross_attention else hidden_states
    assert current_states is not None
    if is_cross_attention and cache is not None and is_updated:
        key = current_cache.layers[self.layer_idx].keys
        value = current_cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
        key, value = key_value(self, current_states)  # one packed product where fused (linear.py)
        key, value = key.view(kv_shape).transpose(1, 2), value.view(kv_shape).transpose(1, 2)
        if cache is not None:
            key, value = current_cache.update(key, value, self.layer_idx, kwargs=kwargs)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    if mask is not None and mask.is_floating_point():
        mask = mask.to(device=query.device, dtype=query.dtype)
    context = attend(query, key, value, mask, self.attention_head_size**-0.5)
    return context.reshape(*input_shape, self.all_head_size), None
