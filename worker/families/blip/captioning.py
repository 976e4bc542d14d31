"""Greedy caption decoding for BLIP's text decoder: what `generate` computes, with less work per token.

Two things make stock decoding slow on a CPU, beyond the framework's per-step overhead:

- the cross-attention keys and values over the image tokens are projected once per layer
  (577 x 768 x 768 twice: 16 GFLOP per image for the base decoder) and then read again from
  memory at every step (14 MB per layer for 8 images: the cache does not fit in the CPU caches);
- the self-attention cache is re-allocated and copied at every step.

Here the key and value projections are folded into the queries instead ("absorbed"): with
k_j = Wk x_j + bk, a head's score q . k_j equals (Wk^T q) . x_j plus a term that is the same for every
image token (so the softmax drops it), and its output sum_j p_j (Wv x_j + bv) equals
Wv (sum_j p_j x_j) + bv. Each step then reads only the image embeddings, which every layer shares
and which stay in the cache, and a 20-token caption costs about 5 GFLOP per image instead of 16.
The self-attention cache is a preallocated tensor. Tokens are chosen as stock greedy search chooses
them: argmax of the float32 logits, the end token forbidden until `min_new_tokens`, rows that ended
padded with the pad token.

On CUDA a step is launch-bound rather than compute-bound, and the steps run at one fixed shape instead
(`_FixedSteps`): the self-attention reads the whole preallocated cache with the positions not yet written
masked out, and every piece of state (tokens, step number, finished rows) is a tensor updated in place, so
the step is captured once as a CUDA graph and replayed (`worker/families/blip/cuda.py`). On CPUs the growing
cache is cheaper and stays.

Equal to stock `generate` up to float rounding: the parity tests compare token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional
from transformers import GenerationConfig, PreTrainedModel

from worker.families.blip.cuda import GraphCache, StepGraph, decode_graphs_wanted
from worker.families.blip.linear import key_value

# Generation settings that do not change what greedy search picks.
_NEUTRAL_SETTINGS = {
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "max_length",
    "max_new_tokens",
    "min_new_tokens",
    "_from_model_config",
    "transformers_version",
}


def plain_greedy(config: GenerationConfig) -> bool:
    """True if `generate` with this config is plain greedy search (no penalties, bans or sampling)."""
    settings = config.to_diff_dict()
    if settings.get("min_length", 0) or settings.get("num_beams", 1) != 1 or settings.get("do_sample", False):
        return False
    return set(settings) - {"min_length", "num_beams", "do_sample"} <= _NEUTRAL_SETTINGS


@torch.inference_mode()
def greedy_captions(
    decoder: PreTrainedModel,
    image_embeds: torch.Tensor,
    *,
    bos: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    fixed_steps: bool | None = None,
) -> torch.Tensor:
    """The tokens generated after `bos` for each image, (images, steps); rows that ended are padded.

    `fixed_steps`: every step at one shape, replayed as a CUDA graph on CUDA (`_FixedSteps`); None decides
    by the device (`decode_graphs_wanted`: CUDA, unless MODTAG_CUDA_GRAPHS is off).
    """
    if fixed_steps is None:
        fixed_steps = decode_graphs_wanted(image_embeds.device)
    if fixed_steps:
        return _fixed_captions(decoder, image_embeds, (bos, eos, pad), max_new_tokens, min_new_tokens)
    text: Any = decoder
    bert, head = text.bert, text.cls.predictions
    layers = list(bert.encoder.layer)
    batch = image_embeds.shape[0]
    self_attention = layers[0].attention.self
    # The decoder's products read the image tokens in its dtype (float32 ones from a mixed-precision encoder
    # are rounded once, here: see worker/families/blip/precision.py).
    device, dtype = image_embeds.device, self_attention.query.weight.dtype
    image_embeds = image_embeds.to(dtype)
    heads, head_size = self_attention.num_attention_heads, self_attention.attention_head_size
    cache_shape = (len(layers), 2, batch, heads, max_new_tokens, head_size)
    cache = torch.empty(cache_shape, dtype=dtype, device=device)
    image_t = image_embeds.transpose(1, 2)  # (images, width, image tokens): the score products' right side
    cross = [_Absorbed.of(layer.crossattention.self) for layer in layers]

    tokens = torch.full((batch,), bos, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        position = torch.full((batch, 1), step, dtype=torch.long, device=device)
        hidden = bert.embeddings(input_ids=tokens[:, None], position_ids=position)  # (images, 1, width)
        for index, layer in enumerate(layers):
            hidden = _self_attention(layer.attention, hidden, cache[index], step, heads, head_size)
            hidden = cross[index](layer.crossattention, hidden, image_embeds, image_t)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        logits = head(hidden[:, -1, :]).float()
        if step < min_new_tokens:
            logits[:, eos] = -torch.inf
        chosen = logits.argmax(dim=-1)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        generated.append(chosen)
        unfinished &= chosen != eos
        tokens = chosen
        if not bool(unfinished.any()):
            break
    return torch.stack(generated, dim=1)


# Helpers.

# Steps replayed between two looks at whether every row has ended (each look waits for the device).
_CHECK_EVERY = 4
_GRAPHS = "_modtag_decode_graphs"


def _fixed_captions(
    decoder: PreTrainedModel,
    image_embeds: torch.Tensor,
    ids: tuple[int, int, int],
    max_new_tokens: int,
    min_new_tokens: int,
) -> torch.Tensor:
    rows, image_tokens, width = image_embeds.shape
    # Batches are padded to a power of two: a worker's batches of 1 to 16 images make 5 shapes to capture, not 16.
    # The padding rows start finished, so they neither delay the end nor take part in it.
    batch = 1 << (rows - 1).bit_length()
    text: Any = decoder
    dtype = text.bert.encoder.layer[0].attention.self.query.weight.dtype
    key = (batch, image_tokens, width, dtype, str(image_embeds.device), ids, max_new_tokens, min_new_tokens)
    cache: GraphCache | None = getattr(decoder, _GRAPHS, None)
    if cache is None:
        cache = GraphCache()
        object.__setattr__(decoder, _GRAPHS, cache)  # per model instance, never in its state dict

    def build() -> _FixedSteps:
        return _FixedSteps(
            decoder, (batch, image_tokens, width), image_embeds.device, ids, max_new_tokens, min_new_tokens
        )

    def capture(state: _FixedSteps) -> StepGraph:
        state.start(image_embeds)
        return StepGraph(state.step)

    state: _FixedSteps
    graph: StepGraph | None
    if image_embeds.device.type == "cuda":
        state, graph = cache.get(key, build, capture)
    else:  # no graphs on CPUs: the fixed steps run eagerly (the tests' way of checking them)
        state, graph = build(), None
    state.start(image_embeds)
    run = graph.replay if graph is not None else state.step
    for step in range(max_new_tokens):
        run()
        if (step + 1) % _CHECK_EVERY == 0 and not bool(state.unfinished.any()):
            break
    return state.result(rows)


class _FixedSteps:
    """Greedy decoding with every step at one shape, its state in tensors updated in place (capturable).

    The self-attention attends over the whole cache (max_new_tokens positions) with the positions after the
    current step masked out; the cache starts zeroed, so the masked positions add exact zeros.
    """

    def __init__(
        self,
        decoder: PreTrainedModel,
        shape: tuple[int, int, int],
        device: torch.device,
        ids: tuple[int, int, int],
        max_new_tokens: int,
        min_new_tokens: int,
    ) -> None:
        text: Any = decoder
        self.bert, self.head = text.bert, text.cls.predictions
        self.layers = list(self.bert.encoder.layer)
        self.bos, self.eos, self.pad = ids
        self.min_new_tokens = min_new_tokens
        module = self.layers[0].attention.self
        self.heads, self.head_size = module.num_attention_heads, module.attention_head_size
        batch = shape[0]  # images and padding rows
        dtype = module.query.weight.dtype
        self.image_embeds = torch.zeros(shape, dtype=dtype, device=device)
        self.image_t = self.image_embeds.transpose(1, 2)
        cache_shape = (len(self.layers), 2, batch, self.heads, max_new_tokens, self.head_size)
        self.cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        self.tokens = torch.empty(batch, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.unfinished = torch.empty(batch, dtype=torch.bool, device=device)
        self.generated = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
        # (1, positions): SDPA wants a mask of at least two dimensions; it broadcasts over rows and heads.
        self.positions = torch.arange(max_new_tokens, device=device)[None]
        self.visible = torch.empty((1, max_new_tokens), dtype=torch.bool, device=device)
        self.cross = [_Absorbed.of(layer.crossattention.self) for layer in self.layers]

    def start(self, image_embeds: torch.Tensor) -> None:
        """Set the buffers for a new call on these image tokens (as many rows as the buffers or fewer: padding)."""
        rows = image_embeds.shape[0]
        self.image_embeds[:rows].copy_(image_embeds)
        self.image_embeds[rows:].zero_()
        self.cache.zero_()
        self.tokens.fill_(self.bos)
        self.step_index.zero_()
        self.unfinished.fill_(True)
        self.unfinished[rows:] = False  # padding rows are finished from the start: pad tokens, never the end token
        self.generated.fill_(self.pad)

    def step(self) -> None:
        """One token for every row, from the buffers into the buffers; no host synchronisation."""
        batch = self.tokens.shape[0]
        torch.le(self.positions, self.step_index, out=self.visible)
        position = self.step_index.expand(batch, 1)
        hidden = self.bert.embeddings(input_ids=self.tokens[:, None], position_ids=position)
        for index, layer in enumerate(self.layers):
            hidden = self._self_attention(layer.attention, hidden, self.cache[index])
            hidden = self.cross[index](layer.crossattention, hidden, self.image_embeds, self.image_t)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        logits = self.head(hidden[:, -1, :]).float()
        if self.min_new_tokens:
            logits[:, self.eos].masked_fill_(self.step_index < self.min_new_tokens, -torch.inf)
        chosen = torch.where(self.unfinished, logits.argmax(dim=-1), self.pad)
        self.generated.index_copy_(1, self.step_index, chosen[:, None])
        self.unfinished &= chosen != self.eos
        self.tokens.copy_(chosen)
        self.step_index += 1

    def result(self, rows: int) -> torch.Tensor:
        """The first `rows` rows' tokens up to the step where each had ended (as the growing path stops), a copy."""
        generated = self.generated[:rows]
        ended = (generated == self.eos).cummax(dim=1).values.all(dim=0)  # (steps,): every row ended by then
        steps = int(ended.int().argmax()) + 1 if bool(ended.any()) else generated.shape[1]
        return generated[:, :steps].clone()

    def _self_attention(self, attention: Any, hidden: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        module = attention.self
        batch, heads, head_size = hidden.shape[0], self.heads, self.head_size
        query = module.query(hidden).view(batch, heads, 1, head_size)
        key, value = key_value(module, hidden)
        cache[0].index_copy_(2, self.step_index, key.reshape(batch, heads, 1, head_size))
        cache[1].index_copy_(2, self.step_index, value.reshape(batch, heads, 1, head_size))
        context = functional.scaled_dot_product_attention(
            query, cache[0], cache[1], attn_mask=self.visible, scale=head_size**-0.5
        )
        output: torch.Tensor = attention.output(context.view(batch, 1, heads * head_size), hidden)
        return output


def _self_attention(
    attention: Any, hidden: torch.Tensor, cache: torch.Tensor, step: int, heads: int, head_size: int
) -> torch.Tensor:
    # Causal self-attention of the new token over itself and every earlier one: no mask needed.
    module = attention.self
    batch = hidden.shape[0]
    query = module.query(hidden).view(batch, heads, 1, head_size)  # one token: (b, 1, h, d) is (b, h, 1, d)
    key, value = key_value(module, hidden)
    cache[0, :, :, step] = key.view(batch, heads, head_size)
    cache[1, :, :, step] = value.view(batch, heads, head_size)
    keys, values = cache[0, :, :, : step + 1], cache[1, :, :, : step + 1]
    scores = torch.matmul(query, keys.transpose(-1, -2)) * head_size**-0.5
    context = torch.matmul(scores.softmax(dim=-1), values).view(batch, 1, heads * head_size)
    output: torch.Tensor = attention.output(context, hidden)
    return output


class _Absorbed:
    """One layer's cross-attention with the key and value projections folded into query and output."""

    def __init__(self, key_weight: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor | None) -> None:
        self.key_weight = key_weight  # (heads, head size, width)
        self.value_weight = value_weight  # (heads, head size, width)
        self.value_bias = value_bias  # (heads, head size)

    @classmethod
    def of(cls, module: Any) -> _Absorbed:
        heads, head_size = module.num_attention_heads, module.attention_head_size
        width = module.key.weight.shape[1]
        value_bias = None if module.value.bias is None else module.value.bias.view(heads, head_size)
        return cls(
            module.key.weight.view(heads, head_size, width),
            module.value.weight.view(heads, head_size, width),
            value_bias,
        )

    def __call__(
        self, attention: Any, hidden: torch.Tensor, image_embeds: torch.Tensor, image_t: torch.Tensor
    ) -> torch.Tensor:
        module = attention.self
        heads, head_size = module.num_attention_heads, module.attention_head_size
        batch = hidden.shape[0]
        query = module.query(hidden).view(batch, heads, head_size)
        # Scores: (Wk_h^T q_h) . x_j for every image token j; the key bias only shifts a row's scores.
        folded = torch.einsum("bhd,hdw->bhw", query, self.key_weight) * head_size**-0.5
        probabilities = torch.bmm(folded, image_t).softmax(dim=-1)  # (b, heads, image tokens)
        mixed = torch.bmm(probabilities, image_embeds)  # (b, heads, width): sum_j p_j x_j
        context = torch.einsum("bhw,hdw->bhd", mixed, self.value_weight)
        if self.value_bias is not None:
            context = context + self.value_bias
        output: torch.Tensor = attention.output(context.reshape(batch, 1, heads * head_size), hidden)
        return output
