"""The BLIP inference engine: captions, yes/no probes and image-text matches for a batch of images.

It computes what the stock per-image, per-question, per-text calls compute (`worker/baseline.py`;
the parity tests hold it to 1e-4 in float32) with far less work:

- each image goes through each role's vision encoder once, batched across the images of a call;
- the questions (or texts) of one image share one pass of the text encoder: they are packed side by
  side into one sequence with a block-diagonal attention mask and positions restarting at 0 for each
  one, so they cannot see each other, while the cross-attention keys and values over the image
  tokens (577 at base size, the bulk of a text pass) are computed once per image, not once per text;
- the yes/no answers of all probes of all images come from one decoder step, batched (by question
  length: see `Engine._probe`);
- captions are generated greedily for all images at once (`worker/captioning.py`: a preallocated
  self-attention cache, and the image side of cross-attention folded into the queries, which saves
  the per-layer key/value projections of the 577 image tokens);
- on the engine's own model instances (never their classes), attention runs fused (`worker/attention.py`:
  SDPA, or cache-sized chunks for bf16 on CPUs) and, on CPUs, linear layers run on weights packed
  once for oneDNN with the bias and the MLPs' GELU fused (`worker/linear.py`); everything runs under
  `torch.inference_mode`.

On CUDA the pixel tensors are prepared in pinned host memory and copied without blocking.

Stages are separate methods (`preprocess` on the CPU, `forward` on the device, `postprocess` to
plain Python), so a worker can overlap the preprocessing of a batch with the forward of the previous.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from PIL import Image
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    PreTrainedModel,
)

from core.errors import ConfigError, ModelError
from worker.attention import install_fused_attention
from worker.captioning import greedy_captions, plain_greedy
from worker.linear import install_packed_linear
from worker.models import LoadedModels, Role

STAGES = ("preprocess", "vision", "caption", "probes", "matches")


@dataclass
class ImageRequest:
    """What to compute for one image."""

    image: Image.Image
    caption: bool = True
    probes: Sequence[str] = ()
    texts: Sequence[str] = ()


@dataclass
class ImageOutput:
    """The results for one image. Timings are this image's share of each batched stage, in seconds."""

    caption: str | None
    probes: dict[str, float]
    matches: dict[str, float]
    timings: dict[str, float]
    caption_ids: tuple[int, ...] = ()
    """The generated caption tokens after the bos, up to and including the eos if one was generated."""


@dataclass
class TextPass:
    """One forward of a text encoder: rows of packed texts, each row over one image, and where each text sits."""

    image_rows: torch.Tensor  # (rows,) index into the role's image embeddings
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length), restarting at 0 for each text
    segments: torch.Tensor  # (rows, length, length) bool: which tokens may attend to which
    first: torch.Tensor  # (texts,) flat index into (rows * length) of each text's first token ([CLS])
    pairs: torch.Tensor  # (texts,) index of each text in the batch's pair list
    by_length: list[tuple[torch.Tensor, torch.Tensor]]  # texts of one length: (their positions, flat token index)


@dataclass
class PreparedBatch:
    """The CPU side of a call: pixel values per role and packed, tokenized texts."""

    requests: list[ImageRequest]
    images: dict[Role, list[int]]  # per role: the request index of each row of pixels[role]
    pixels: dict[Role, torch.Tensor]
    probe_pairs: list[tuple[int, str]]  # (request index, question), unique per request
    match_pairs: list[tuple[int, str]]
    probe_passes: list[TextPass]
    match_passes: list[TextPass]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RawOutputs:
    """The forward's results, on the CPU, in the batch's order."""

    caption_tokens: list[torch.Tensor]  # per caption image: generated ids after the bos
    probe_yes: torch.Tensor  # (probe pairs,) P(yes)
    match_scores: torch.Tensor  # (match pairs,) P(match)
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """Runs captions, probes and matches for batches of images on loaded BLIP models.

    With `fused_attention` and `packed_linear` (the defaults) the engine replaces the attention and the
    linear layers of the given models' modules (not of their classes): the same results within float
    rounding, faster. Load a separate copy to run the stock arithmetic beside it, as `modtag bench`
    and the parity tests do. On CPUs the packed weights are a second copy of the linear layers' weights,
    nearly doubling the models' memory. `fast_decoding` generates captions with `worker/captioning.py`
    (when the decoder's generation config is plain greedy search) instead of transformers' `generate`.
    """

    def __init__(
        self,
        models: LoadedModels,
        *,
        max_caption_tokens: int = 30,
        min_caption_tokens: int = 0,
        max_batch: int = 16,
        max_row_tokens: int = 512,
        token_cache_size: int = 4096,
        fused_attention: bool = True,
        packed_linear: bool = True,
        fast_decoding: bool = True,
    ) -> None:
        if max_caption_tokens < 1 or not 0 <= min_caption_tokens <= max_caption_tokens:
            raise ConfigError(
                f"caption tokens: need 0 <= min ({min_caption_tokens}) <= max ({max_caption_tokens}) and max >= 1",
                code="engine_config_invalid",
            )
        if max_batch < 1 or max_row_tokens < 1 or token_cache_size < 0:
            raise ConfigError(
                "max_batch and max_row_tokens must be positive, token_cache_size not negative",
                code="engine_config_invalid",
            )
        self.models = models
        self.fast_decoding = fast_decoding
        for loaded in models.models.values():
            if fused_attention:
                install_fused_attention(loaded.model)
            if packed_linear:
                install_packed_linear(loaded.model)
        self.max_caption_tokens = max_caption_tokens
        self.min_caption_tokens = min_caption_tokens
        self.max_batch = max_batch
        self.max_row_tokens = max_row_tokens
        self._token_cache: OrderedDict[tuple[Role, str], tuple[int, ...]] = OrderedDict()
        self._token_cache_size = token_cache_size
        self._lock = threading.Lock()
        self._text = {role: _TextConfig.of(loaded.model) for role, loaded in models.models.items()}
        self._answer_ids = self._yes_no_ids() if "vqa" in models else None

    def describe(self) -> dict[str, Any]:
        """The loaded models, for a decision's `models` field."""
        return self.models.describe()

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageOutput]:
        """Caption, probe and match each request's image; results in the order of `requests`."""
        batch = self.preprocess(requests)
        raw = self.forward(batch)
        return self.postprocess(batch, raw)

    def preprocess(self, requests: Sequence[ImageRequest]) -> PreparedBatch:
        """CPU work: validate, resize and normalise the images, tokenize and pack the texts."""
        started = time.perf_counter()
        reqs = list(requests)
        for request in reqs:
            _validate(request)
        images: dict[Role, list[int]] = {
            "caption": [i for i, r in enumerate(reqs) if r.caption],
            "vqa": [i for i, r in enumerate(reqs) if r.probes],
            "itm": [i for i, r in enumerate(reqs) if r.texts],
        }
        images = {role: rows for role, rows in images.items() if rows}
        for role in images:
            self.models.get(role)  # a clear error now rather than a KeyError later
        pixels = self._pixels(reqs, images)
        probe_pairs = [(i, q) for i in images.get("vqa", []) for q in dict.fromkeys(reqs[i].probes)]
        match_pairs = [(i, t) for i in images.get("itm", []) for t in dict.fromkeys(reqs[i].texts)]
        probe_passes = self._pack("vqa", probe_pairs, images.get("vqa", []))
        match_passes = self._pack("itm", match_pairs, images.get("itm", []))
        return PreparedBatch(
            requests=reqs,
            images=images,
            pixels=pixels,
            probe_pairs=probe_pairs,
            match_pairs=match_pairs,
            probe_passes=probe_passes,
            match_passes=match_passes,
            timings={"preprocess": time.perf_counter() - started},
        )

    def forward(self, batch: PreparedBatch) -> RawOutputs:
        """Device work, under inference mode: vision encoders, caption generation, probes, matches."""
        timings: dict[str, float] = {}
        with torch.inference_mode():
            started = time.perf_counter()
            embeds = {role: self._encode_images(role, pixels) for role, pixels in batch.pixels.items()}
            timings["vision"] = _synced_elapsed(started, self.models.device)

            started = time.perf_counter()
            caption_tokens = self._generate_captions(embeds["caption"]) if "caption" in embeds else []
            timings["caption"] = time.perf_counter() - started

            started = time.perf_counter()
            probe_yes = (
                self._probe(embeds["vqa"], batch.probe_passes, len(batch.probe_pairs)) if "vqa" in embeds else _EMPTY
            )
            timings["probes"] = time.perf_counter() - started

            started = time.perf_counter()
            match_scores = (
                self._match(embeds["itm"], batch.match_passes, len(batch.match_pairs)) if "itm" in embeds else _EMPTY
            )
            timings["matches"] = time.perf_counter() - started
        return RawOutputs(
            caption_tokens=caption_tokens, probe_yes=probe_yes, match_scores=match_scores, timings=timings
        )

    def postprocess(self, batch: PreparedBatch, raw: RawOutputs) -> list[ImageOutput]:
        """Plain Python results: caption strings, P(yes) per question, P(match) per text, timings."""
        started = time.perf_counter()
        outputs = [ImageOutput(caption=None, probes={}, matches={}, timings={}) for _ in batch.requests]
        if raw.caption_tokens:
            tokenizer = self.models.get("caption").processor.tokenizer
            eos = self._text["caption"].sep
            for request_index, tokens in zip(batch.images["caption"], raw.caption_tokens, strict=True):
                ids = _until_eos(tokens.tolist(), eos)
                outputs[request_index].caption_ids = tuple(ids)
                outputs[request_index].caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
        for (request_index, question), p_yes in zip(batch.probe_pairs, raw.probe_yes.tolist(), strict=True):
            outputs[request_index].probes[question] = p_yes
        for (request_index, text), score in zip(batch.match_pairs, raw.match_scores.tolist(), strict=True):
            outputs[request_index].matches[text] = score
        decode_seconds = time.perf_counter() - started
        self._share_timings(batch, raw, outputs, decode_seconds)
        return outputs

    # Forward stages.

    def _encode_images(self, role: Role, pixels: torch.Tensor) -> torch.Tensor:
        model = cast(_BlipModel, self.models.get(role).model)
        chunks = []
        for chunk in pixels.split(self.max_batch):
            pixel_values = chunk.to(self.models.device, self.models.dtype, non_blocking=chunk.is_pinned())
            chunks.append(model.vision_model(pixel_values=pixel_values).last_hidden_state)
        return torch.cat(chunks)

    def _generate_captions(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        # What BlipForConditionalGeneration.generate does, minus its vision pass: the decoder's
        # generate from the [DEC] bos, eos = [SEP], over the image tokens (greedy, KV cache on).
        model = cast(BlipForConditionalGeneration, self.models.get("caption").model)
        text = self._text["caption"]
        extra = {"min_new_tokens": self.min_caption_tokens} if self.min_caption_tokens else {}
        tokens: list[torch.Tensor] = []
        if self.fast_decoding and plain_greedy(model.text_decoder.generation_config):
            for chunk in image_embeds.split(self.max_batch):
                generated = greedy_captions(
                    model.text_decoder,
                    chunk,
                    bos=text.bos,
                    eos=text.sep,
                    pad=text.pad,
                    max_new_tokens=self.max_caption_tokens,
                    min_new_tokens=self.min_caption_tokens,
                )
                tokens.extend(generated.cpu())
            return tokens
        for chunk in image_embeds.split(self.max_batch):
            bos = torch.full((chunk.shape[0], 1), text.bos, dtype=torch.long, device=chunk.device)
            generated = model.text_decoder.generate(
                input_ids=bos,
                eos_token_id=text.sep,
                pad_token_id=text.pad,
                encoder_hidden_states=chunk,
                encoder_attention_mask=torch.ones(chunk.shape[:-1], dtype=torch.long, device=chunk.device),
                max_new_tokens=self.max_caption_tokens,
                do_sample=False,
                num_beams=1,
                **extra,
            )
            tokens.extend(generated[:, 1:].cpu())
        return tokens

    def _probe(self, image_embeds: torch.Tensor, passes: list[TextPass], count: int) -> torch.Tensor:
        # BlipForQuestionAnswering.generate's first step: the question encoder over the image, then
        # the decoder from [DEC] over the question tokens, whose mask stock generate sets to all ones.
        # Masking the padding of batched questions would not help: BLIP's text attention in
        # transformers 5 drops the cross-attention mask (BlipTextAttention passes it on as
        # `attention_mask`, which BlipTextSelfAttention ignores for cross-attention), so stock batched
        # generate attends to the pads. Questions of one token length go together instead: no padding,
        # the same numbers as one stock call per question.
        model = cast(BlipForQuestionAnswering, self.models.get("vqa").model)
        assert self._answer_ids is not None  # set in __init__ whenever the VQA model is loaded
        bos_id = self._text["vqa"].bos
        result = torch.empty(count, dtype=torch.float32)
        for text_pass in passes:
            hidden = self._encode_texts(model.text_encoder, image_embeds, text_pass)
            flat = hidden.flatten(0, 1)
            for positions, token_index in text_pass.by_length:
                questions = flat[token_index.to(hidden.device)]
                bos = torch.full((questions.shape[0], 1), bos_id, dtype=torch.long, device=hidden.device)
                logits = model.text_decoder(
                    input_ids=bos,
                    encoder_hidden_states=questions,
                    encoder_attention_mask=torch.ones(questions.shape[:-1], dtype=torch.long, device=hidden.device),
                    use_cache=False,
                ).logits[:, -1, :]
                yes_no = logits[:, self._answer_ids].float().softmax(dim=-1)[:, 0]
                result[text_pass.pairs[positions]] = yes_no.cpu()
        return result

    def _match(self, image_embeds: torch.Tensor, passes: list[TextPass], count: int) -> torch.Tensor:
        # BlipForImageTextRetrieval.forward with use_itm_head: the ITM head on each text's [CLS].
        model = cast(BlipForImageTextRetrieval, self.models.get("itm").model)
        result = torch.empty(count, dtype=torch.float32)
        for text_pass in passes:
            hidden = self._encode_texts(model.text_encoder, image_embeds, text_pass)
            cls = hidden.flatten(0, 1)[text_pass.first.to(hidden.device)]
            scores = model.itm_head(cls).float().softmax(dim=-1)[:, 1]
            result[text_pass.pairs] = scores.cpu()
        return result

    def _encode_texts(
        self, text_encoder: torch.nn.Module, image_embeds: torch.Tensor, text_pass: TextPass
    ) -> torch.Tensor:
        device, dtype = image_embeds.device, image_embeds.dtype
        # The 4D mask is used as given (additive); the image tokens need no mask (stock: all ones).
        additive = torch.zeros(text_pass.segments.shape, dtype=dtype, device=device)
        additive.masked_fill_(~text_pass.segments.to(device), torch.finfo(dtype).min)
        output = text_encoder(
            input_ids=text_pass.input_ids.to(device),
            position_ids=text_pass.position_ids.to(device),
            attention_mask=additive[:, None],
            encoder_hidden_states=image_embeds.index_select(0, text_pass.image_rows.to(device)),
        )
        hidden: torch.Tensor = output.last_hidden_state
        return hidden

    # Preprocess helpers.

    def _pixels(self, reqs: list[ImageRequest], images: dict[Role, list[int]]) -> dict[Role, torch.Tensor]:
        # Roles whose image processors are configured alike (the usual case) share one resize.
        by_config: dict[str, list[Role]] = {}
        for role in images:
            image_processor = self.models.get(role).processor.image_processor
            by_config.setdefault(image_processor.to_json_string(), []).append(role)
        pixels: dict[Role, torch.Tensor] = {}
        for roles in by_config.values():
            union = sorted({i for role in roles for i in images[role]})
            image_processor = self.models.get(roles[0]).processor.image_processor
            values = image_processor(images=[reqs[i].image for i in union], return_tensors="pt")["pixel_values"]
            if self.models.device.type == "cuda":
                values = values.pin_memory()  # the forward's copy to the GPU then need not block
            row_of = {request_index: row for row, request_index in enumerate(union)}
            for role in roles:
                rows = [row_of[i] for i in images[role]]
                pixels[role] = values if rows == list(range(len(union))) else values[rows]
                if values.is_pinned() and not pixels[role].is_pinned():
                    pixels[role] = pixels[role].pin_memory()
        return pixels

    def _pack(self, role: Role, pairs: list[tuple[int, str]], image_requests: list[int]) -> list[TextPass]:
        if not pairs:
            return []
        image_row = {request_index: row for row, request_index in enumerate(image_requests)}
        tokens = [self._tokens(role, text) for _, text in pairs]
        budget = max(self.max_row_tokens, max(len(t) for t in tokens))
        # Greedy packing: a row holds texts of one image only, up to `budget` tokens.
        rows: list[tuple[int, list[int]]] = []
        row_length = 0
        for pair_index, (request_index, _) in enumerate(pairs):
            size = len(tokens[pair_index])
            image = image_row[request_index]
            if rows and rows[-1][0] == image and row_length + size <= budget:
                rows[-1][1].append(pair_index)
                row_length += size
            else:
                rows.append((image, [pair_index]))
                row_length = size
        pad_id = self._text[role].pad
        return [
            _build_pass(rows[start : start + self.max_batch], tokens, pad_id)
            for start in range(0, len(rows), self.max_batch)
        ]

    def _tokens(self, role: Role, text: str) -> tuple[int, ...]:
        key = (role, text)
        with self._lock:
            cached = self._token_cache.get(key)
            if cached is not None:
                self._token_cache.move_to_end(key)
                return cached
        loaded = self.models.get(role)
        # Stock tokenization ([CLS] text [SEP]), cut at the position embeddings' length, where
        # the stock call would fail.
        limit = self._text[role].max_positions
        ids = tuple(loaded.processor.tokenizer(text, truncation=True, max_length=limit)["input_ids"])
        with self._lock:
            self._token_cache[key] = ids
            while len(self._token_cache) > self._token_cache_size:
                self._token_cache.popitem(last=False)
        return ids

    def _yes_no_ids(self) -> list[int]:
        tokenizer = self.models.get("vqa").processor.tokenizer
        ids = []
        for answer in ("yes", "no"):
            pieces = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ModelError(
                    f"the VQA tokenizer splits {answer!r} into {len(pieces)} tokens; probes need it as one token "
                    f"(use a BLIP VQA checkpoint with its own tokenizer)",
                    code="model_invalid",
                )
            ids.append(pieces[0])
        return ids

    def _share_timings(
        self, batch: PreparedBatch, raw: RawOutputs, outputs: list[ImageOutput], decode_seconds: float
    ) -> None:
        # Each image gets an equal share of the stages it took part in, so summing the outputs'
        # timings gives the wall time of the call.
        totals = {**batch.timings, **raw.timings}
        totals["caption"] = totals.get("caption", 0.0) + decode_seconds
        users: dict[str, set[int]] = {
            "preprocess": set(range(len(outputs))),
            "vision": {i for rows in batch.images.values() for i in rows},
            "caption": set(batch.images.get("caption", [])),
            "probes": set(batch.images.get("vqa", [])),
            "matches": set(batch.images.get("itm", [])),
        }
        for index, output in enumerate(outputs):
            output.timings = {
                stage: (totals.get(stage, 0.0) / len(users[stage]) if index in users[stage] else 0.0)
                for stage in STAGES
            }


# Helpers.


@dataclass(frozen=True)
class _TextConfig:
    """The token ids and limits of a model's text side, as its stock generate uses them."""

    bos: int  # [DEC]
    sep: int  # [SEP], the eos of generation
    pad: int
    max_positions: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> _TextConfig:
        text_config: Any = model.config.text_config
        return cls(
            bos=int(text_config.bos_token_id),
            sep=int(text_config.sep_token_id),
            pad=int(text_config.pad_token_id),
            max_positions=int(text_config.max_position_embeddings),
        )


_EMPTY = torch.empty(0, dtype=torch.float32)

_BlipModel = BlipForConditionalGeneration | BlipForQuestionAnswering | BlipForImageTextRetrieval


def _validate(request: ImageRequest) -> None:
    if not isinstance(request.image, Image.Image):
        raise TypeError(f"ImageRequest.image must be a PIL image, not {type(request.image).__name__}")
    for kind, texts in (("probes", request.probes), ("texts", request.texts)):
        if isinstance(texts, str):
            raise TypeError(f"ImageRequest.{kind} must be a sequence of strings, not one string")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"ImageRequest.{kind} must hold strings, not {type(text).__name__}")


def _build_pass(rows: list[tuple[int, list[int]]], tokens: list[tuple[int, ...]], pad_id: int) -> TextPass:
    lengths = [sum(len(tokens[p]) for p in pair_indices) for _, pair_indices in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width, width), dtype=torch.bool)
    pairs = [p for _, pair_indices in rows for p in pair_indices]
    first = torch.zeros(len(pairs), dtype=torch.long)
    text_index = 0
    for row, (_, pair_indices) in enumerate(rows):
        start = 0
        for pair_index in pair_indices:
            ids = tokens[pair_index]
            size = len(ids)
            end = start + size
            input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(size)
            segments[row, start:end, start:end] = True
            first[text_index] = row * width + start
            text_index += 1
            start = end
        # Padding attends to itself only: a fully masked softmax row would be NaN.
        pad = torch.arange(start, width)
        segments[row, pad, pad] = True
    return TextPass(
        image_rows=torch.tensor([image for image, _ in rows], dtype=torch.long),
        input_ids=input_ids,
        position_ids=position_ids,
        segments=segments,
        first=first,
        pairs=torch.tensor(pairs, dtype=torch.long),
        by_length=_group_by_length(first, [len(tokens[p]) for p in pairs]),
    )


def _group_by_length(first: torch.Tensor, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    groups: dict[int, list[int]] = {}
    for position, length in enumerate(lengths):
        groups.setdefault(length, []).append(position)
    result = []
    for length, positions in sorted(groups.items()):
        where = torch.tensor(positions, dtype=torch.long)
        result.append((where, first[where][:, None] + torch.arange(length)))
    return result


def _until_eos(ids: list[int], eos: int) -> list[int]:
    # Rows that finished early are padded after their eos; a random model may also emit the pad id
    # as a real token, so cut at the eos only.
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _synced_elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
