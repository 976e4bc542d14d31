"""The BLIP inference engine: captions, yes/no probes and image-text matches for a batch of images.

It computes what the stock per-image, per-question, per-text calls compute (`worker/families/blip/baseline.py`;
the parity tests hold it to 1e-4 in float32) with far less work:

- each image goes through each role's vision encoder once, batched across the images of a call;
- the questions (or texts) of one image share one pass of the text encoder: they are packed side by
  side into one sequence with a block-diagonal attention mask and positions restarting at 0 for each
  one, so they cannot see each other, while the cross-attention keys and values over the image
  tokens (577 at base size, the bulk of a text pass) are computed once per image, not once per text;
- the yes/no answers of all probes of all images come from one decoder step, batched (by question
  length: see `Engine._probe`);
- captions are generated greedily for all images at once (`worker/families/blip/captioning.py`: a preallocated
  self-attention cache, and the image side of cross-attention folded into the queries, which saves
  the per-layer key/value projections of the 577 image tokens);
- on the engine's own model instances (never their classes), attention runs fused (`worker/families/blip/attention.py`:
  SDPA, or cache-sized chunks for bf16 on CPUs) and, on CPUs, linear layers run on weights packed
  once for oneDNN with the bias and the MLPs' GELU fused (`worker/families/blip/linear.py`); everything runs under
  `torch.inference_mode`;
- on int8 models (`MODTAG_DTYPE=int8`), the linear layers of the stages `int8_stages` names run on int8 weights
  (`worker/families/blip/quant.py`), with calibrated static input scales when a calibration is given
  (`worker/families/blip/calibration.py`), and the other stages' at the fast dtype: int8 pays on some stages
  and not on others (`modtag bench` measures each stage both ways and reports `stage_dtypes`).

On CUDA the pixel tensors are prepared in pinned host memory and copied without blocking.

Stages are separate methods (`preprocess` on the CPU, `forward` on the device, `postprocess` to
plain Python), timed and tested apart. A worker runs them one after the other on its one model thread:
preprocessing beside a forward would be a second thread running torch (worker/batcher.py says why not);
what does overlap the models is decoding, in the task threads, while a batch computes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from PIL import Image
from torch import nn
from torch.nn import functional
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    PreTrainedModel,
)

from core.errors import ConfigError, ModelError
from worker.families.blip.attention import install_fused_attention
from worker.families.blip.calibration import Int8Calibration
from worker.families.blip.captioning import greedy_captions, plain_greedy
from worker.families.blip.linear import install_packed_linear
from worker.families.blip.models import LoadedModels, ModelRole
from worker.families.blip.precision import exact_logits, install_input_casts, install_mixed_precision
from worker.families.blip.quant import install_int8_linear

STAGES = ("preprocess", "vision", "caption", "probes", "matches", "answers", "tags")
ANSWER_BUDGET = 16  # at most this many answers of one question are scored in full (see Engine._rank_answers)
ANSWER_ROUND = 8  # answers scored per round while one could still beat the best
TAG_FEATURE_CACHE = 16  # tag sets whose ITC text features are kept, besides those pinned by Engine.warm_tags
INT8_STAGES = ("vision", "caption", "probes", "matches")
"""The stages int8 can be chosen for: every model's vision encoder; the caption decoder; the VQA question encoder and
answer decoder (probes, and answer rankings with them); the ITM text encoder (matches, and tags with them)."""
DEFAULT_INT8_STAGES = ("vision", "probes", "matches")
"""Where `modtag bench` measured int8 faster with agreement kept (its `stage_dtypes`; the README has the figures): the
caption decoder gains little at int8 and its greedy tokens left float32's too often, so it stays at bf16."""


@dataclass(frozen=True)
class AnswerRequest:
    """An open question whose candidate answers are ranked by the VQA decoder's likelihood.

    The result holds exact log-likelihoods for the `required` answers and for every candidate that
    could be the most likely one; candidates proven less likely than the best may be left out.
    """

    key: str  # names the ranking in the output
    question: str
    candidates: tuple[str, ...]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagQuery:
    """Tags to score: ITC similarity of every text, then ITM of the best `top_k` texts of each group."""

    key: str  # names the tag set in the output (a hash of texts, groups and top_k)
    texts: tuple[str, ...]  # their ITC features are cached by these texts: sets that differ only in groups share them
    groups: tuple[int, ...]  # the group of each text
    top_k: int


@dataclass
class ImageRequest:
    """What to compute for one image."""

    image: Image.Image
    caption: bool = True
    probes: Sequence[str] = ()
    texts: Sequence[str] = ()
    answers: Sequence[AnswerRequest] = ()
    tags: Sequence[TagQuery] = ()
    embedding: bool = False  # the image's ITC embedding (the ITM model's vision pass: shared with texts and tags)


@dataclass
class ImageOutput:
    """The results for one image. Timings are this image's share of each batched stage, in seconds."""

    caption: str | None
    probes: dict[str, float]
    matches: dict[str, float]
    timings: dict[str, float]
    caption_ids: tuple[int, ...] = ()
    """The generated caption tokens after the bos, up to and including the eos if one was generated."""
    answers: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per AnswerRequest key: the log-likelihood of each scored answer."""
    tags: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per TagQuery key: the ITM probability of each re-ranked text."""
    embedding: tuple[float, ...] | None = None
    """The L2-normalised ITC image embedding (vision [CLS] through vision_proj), when asked for."""


@dataclass
class BatchOutput:
    """One batch's results: an output per request, and the wall time of each stage that ran, for the whole batch."""

    images: list[ImageOutput]
    timings: dict[str, float]


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
    images: dict[ModelRole, list[int]]  # per role: the request index of each row of pixels[role]
    pixels: dict[ModelRole, torch.Tensor]
    probe_pairs: list[tuple[int, str]]  # (request index, question), unique per request: probes and answer questions
    match_pairs: list[tuple[int, str]]
    probe_passes: list[TextPass]
    match_passes: list[TextPass]
    timings: dict[str, float] = field(default_factory=dict)
    answer_work: list[_AnswerWork] = field(default_factory=list)
    tag_work: list[tuple[int, TagQuery]] = field(default_factory=list)  # (request index, query)


@dataclass
class RawOutputs:
    """The forward's results, on the CPU, in the batch's order."""

    caption_tokens: list[torch.Tensor]  # per caption image: generated ids after the bos
    probe_yes: torch.Tensor  # (probe pairs,) P(yes)
    match_scores: torch.Tensor  # (match pairs,) P(match)
    timings: dict[str, float] = field(default_factory=dict)
    answers: list[dict[str, float]] = field(default_factory=list)  # per answer work item
    tags: list[dict[str, float]] = field(default_factory=list)  # per tag work item
    embeddings: dict[int, list[float]] = field(default_factory=dict)  # request index -> ITC image embedding


class Engine:
    """Runs captions, probes and matches for batches of images on loaded BLIP models.

    With `fused_attention` and `packed_linear` (the defaults) the engine replaces the attention and the
    linear layers of the given models' modules (not of their classes): the same results within float
    rounding, faster. Load a separate copy to run the stock arithmetic beside it, as `modtag bench`
    and the parity tests do. On CPUs the packed weights are a second copy of the linear layers' weights,
    nearly doubling the models' memory. `native_kernels` runs the vision encoders' self-attention in the
    native kernel (worker/families/blip/native) on CPUs with AVX-512 where a C compiler can build it. `fast_decoding`
    generates captions with `worker/families/blip/captioning.py` (when the decoder's generation config is plain greedy
    search) instead of transformers' `generate`. `mixed_precision` keeps, for models loaded in bf16 or fp16,
    the layer norms, the residual stream and the final projections in float32 (`worker/families/blip/precision.py`).
    On int8 models, `int8_stages` (of INT8_STAGES; None: DEFAULT_INT8_STAGES) run on int8 linear layers, with
    `int8_calibration`'s static input scales where given (else dynamic ones); the other stages at the fast dtype.
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
        native_kernels: bool = True,
        packed_linear: bool = True,
        fast_decoding: bool = True,
        mixed_precision: bool = True,
        answer_budget: int = ANSWER_BUDGET,
        tag_feature_cache: int = TAG_FEATURE_CACHE,
        int8_stages: Collection[str] | None = None,
        int8_calibration: Int8Calibration | None = None,
    ) -> None:
        if max_caption_tokens < 1 or not 0 <= min_caption_tokens <= max_caption_tokens:
            raise ConfigError(
                f"caption tokens: need 0 <= min ({min_caption_tokens}) <= max ({max_caption_tokens}) and max >= 1",
                code="engine_config_invalid",
            )
        if max_batch < 1 or max_row_tokens < 1 or token_cache_size < 0 or tag_feature_cache < 0:
            raise ConfigError(
                "max_batch and max_row_tokens must be positive, token_cache_size and tag_feature_cache not negative",
                code="engine_config_invalid",
            )
        self.models = models
        self.fast_decoding = fast_decoding
        self.int8_stages = resolve_int8_stages(int8_stages) if models.int8 else ()
        for loaded in models.models.values():
            if mixed_precision:
                install_mixed_precision(loaded.model)
        # After mixed precision (its float32 heads are left out) and before packing (which leaves int8 layers alone).
        for stage in self.int8_stages:
            for part in _stage_parts(models, stage):
                install_int8_linear(part)
        if int8_calibration is not None and self.int8_stages:
            int8_calibration.apply(models)
        for loaded in models.models.values():
            if fused_attention:
                install_fused_attention(loaded.model, native=native_kernels)
            if packed_linear:
                install_packed_linear(loaded.model)
            install_input_casts(loaded.model)
        self.max_caption_tokens = max_caption_tokens
        self.min_caption_tokens = min_caption_tokens
        self.max_batch = max_batch
        self.max_row_tokens = max_row_tokens
        self.answer_budget = max(answer_budget, 1)
        self._token_cache: OrderedDict[tuple[ModelRole, str], tuple[int, ...]] = OrderedDict()
        self._token_cache_size = token_cache_size
        self._lock = threading.Lock()
        self._text = {role: _TextConfig.of(loaded.model) for role, loaded in models.models.items()}
        self._answer_ids = self._yes_no_ids() if "vqa" in models else None
        if self._answer_ids is not None:
            exact_logits(models.get("vqa").model, self._answer_ids)  # a probe's P(yes) from float32 logits
        # ITC text features by tag texts, least recently used first; pinned texts are never evicted.
        self._tag_features: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._tag_feature_cache = tag_feature_cache
        self._pinned_tags: frozenset[tuple[str, ...]] = frozenset()
        # Entered around each forward stage when set (`modtag bench` counts each stage's FLOPs with it).
        self.stage_observer: Callable[[str], AbstractContextManager[object]] | None = None

    def describe(self) -> dict[str, Any]:
        """The loaded models, for a decision's `models` field."""
        return self.models.describe()

    def warm_tags(self, queries: Sequence[TagQuery]) -> int:
        """Compute the ITC text features of these tag sets now, without an image, and keep them; returns texts encoded.

        A worker calls this at start with its policies' tag sets, so that no job pays the one-time text
        pass over a taxonomy (hundreds of texts). The given sets are pinned, never evicted, in place of
        an earlier warm-up's; other tag sets share `tag_feature_cache` least-recently-used places. Sets
        already cached (or repeated) are not encoded again: 0 means nothing was left to compute.
        """
        queries = list(queries)
        for query in queries:
            _validate_tag_query(query)
        with self._lock:
            self._pinned_tags = frozenset(query.texts for query in queries)
        encoded = 0
        with torch.inference_mode():
            for query in queries:
                with self._lock:
                    cached = query.texts in self._tag_features
                if not cached:
                    self._tag_text_features(query)
                    encoded += len(query.texts)
        return encoded

    def run(self, requests: Sequence[ImageRequest]) -> list[ImageOutput]:
        """Caption, probe and match each request's image; results in the order of `requests`."""
        return self.run_batch(requests).images

    def run_batch(self, requests: Sequence[ImageRequest]) -> BatchOutput:
        """`run`, with the batch's own stage timings: what a worker reports once per batch."""
        batch = self.preprocess(requests)
        raw = self.forward(batch)
        return self.postprocess(batch, raw)

    def preprocess(self, requests: Sequence[ImageRequest]) -> PreparedBatch:
        """CPU work: validate, resize and normalise the images, tokenize and pack the texts."""
        started = time.perf_counter()
        reqs = list(requests)
        for request in reqs:
            _validate(request)
        images: dict[ModelRole, list[int]] = {
            "caption": [i for i, r in enumerate(reqs) if r.caption],
            "vqa": [i for i, r in enumerate(reqs) if r.probes or r.answers],
            "itm": [i for i, r in enumerate(reqs) if r.texts or r.tags or r.embedding],
        }
        images = {role: rows for role, rows in images.items() if rows}
        for role in images:
            self.models.get(role)  # a clear error now rather than a KeyError later
        pixels = self._pixels(reqs, images)
        # An answer's question is encoded like a probe's: one packed pass for both, and one first decoder step.
        probe_pairs = [
            (i, q)
            for i in images.get("vqa", [])
            for q in dict.fromkeys([*reqs[i].probes, *(a.question for a in reqs[i].answers)])
        ]
        match_pairs = [(i, t) for i in images.get("itm", []) for t in dict.fromkeys(reqs[i].texts)]
        pair_index = {pair: index for index, pair in enumerate(probe_pairs)}
        answer_work = [
            _AnswerWork(i, answer, pair_index[(i, answer.question)], self._answer_pieces(answer))
            for i in images.get("vqa", [])
            for answer in {a.key: a for a in reqs[i].answers}.values()
        ]
        tag_work = [(i, query) for i in images.get("itm", []) for query in {q.key: q for q in reqs[i].tags}.values()]
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
            answer_work=answer_work,
            tag_work=tag_work,
        )

    def forward(self, batch: PreparedBatch) -> RawOutputs:
        """Device work, under inference mode: vision encoders, caption generation, probes, matches."""
        timings: dict[str, float] = {}
        with torch.inference_mode():
            started = time.perf_counter()
            with self._observed("vision"):
                embeds = {role: self.encode_images(role, pixels) for role, pixels in batch.pixels.items()}
            timings["vision"] = _synced_elapsed(started, self.models.device)

            started = time.perf_counter()
            with self._observed("caption"):
                caption_tokens = self._generate_captions(embeds["caption"]) if "caption" in embeds else []
            timings["caption"] = time.perf_counter() - started

            started = time.perf_counter()
            questions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            keep = {work.pair for work in batch.answer_work}
            with self._observed("probes"):
                probe_yes = (
                    self._probe(embeds["vqa"], batch.probe_passes, len(batch.probe_pairs), keep, questions)
                    if "vqa" in embeds
                    else _EMPTY
                )
            timings["probes"] = time.perf_counter() - started

            started = time.perf_counter()
            with self._observed("answers"):
                answers = self._rank_answers(batch.answer_work, questions) if batch.answer_work else []
            timings["answers"] = time.perf_counter() - started

            started = time.perf_counter()
            with self._observed("tags"):
                chosen = self._choose_tags(embeds["itm"], batch.images["itm"], batch.tag_work) if batch.tag_work else []
                embeddings = self._image_embeddings(embeds["itm"], batch) if "itm" in embeds else {}
            timings["tags"] = time.perf_counter() - started

            started = time.perf_counter()
            tags: list[dict[str, float]] = []
            with self._observed("matches"):
                if chosen:
                    match_scores, tags = self._match_with_tags(embeds["itm"], batch, chosen)
                else:
                    match_scores = (
                        self._match(embeds["itm"], batch.match_passes, len(batch.match_pairs))
                        if "itm" in embeds
                        else _EMPTY
                    )
            timings["matches"] = time.perf_counter() - started
        return RawOutputs(
            caption_tokens=caption_tokens,
            probe_yes=probe_yes,
            match_scores=match_scores,
            timings=timings,
            answers=answers,
            tags=tags,
            embeddings=embeddings,
        )

    def postprocess(self, batch: PreparedBatch, raw: RawOutputs) -> BatchOutput:
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
            if question in batch.requests[request_index].probes:  # not an answer question's own first step
                outputs[request_index].probes[question] = p_yes
        for (request_index, text), score in zip(batch.match_pairs, raw.match_scores.tolist(), strict=True):
            outputs[request_index].matches[text] = score
        for work, ranked in zip(batch.answer_work, raw.answers, strict=True):
            outputs[work.request].answers[work.answer.key] = ranked
        for (request_index, query), scored in zip(batch.tag_work, raw.tags, strict=True):
            outputs[request_index].tags[query.key] = scored
        for request_index, vector in raw.embeddings.items():
            outputs[request_index].embedding = tuple(vector)
        decode_seconds = time.perf_counter() - started
        timings = self._share_timings(batch, raw, outputs, decode_seconds)
        return BatchOutput(outputs, timings)

    # Forward stages.

    def _observed(self, stage: str) -> AbstractContextManager[object]:
        return nullcontext() if self.stage_observer is None else self.stage_observer(stage)

    def encode_images(self, role: ModelRole, pixels: torch.Tensor) -> torch.Tensor:
        """The last hidden state of `role`'s vision encoder for `pixels` (float32 under mixed precision)."""
        model = cast(_BlipModel, self.models.get(role).model)
        chunks = []
        for chunk in pixels.split(self.max_batch):
            pixel_values = chunk.to(self.models.device, self.models.dtype, non_blocking=chunk.is_pinned())
            chunks.append(model.vision_model(pixel_values=pixel_values).last_hidden_state)
        return torch.cat(chunks)

    def _cross_attention_input(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # Under mixed precision the vision output is float32, and every text layer's key and value products
        # would round it to the models' dtype again, per layer and per pass: round it once, here.
        return image_embeds.to(self.models.dtype)

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

    def _probe(
        self,
        image_embeds: torch.Tensor,
        passes: list[TextPass],
        count: int,
        keep: set[int] | None = None,
        kept: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
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
        image_embeds = self._cross_attention_input(image_embeds)
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
                if keep and kept is not None:
                    # Answer questions: their states and first-step log-probabilities start Engine._rank_answers.
                    for row, pair in enumerate(text_pass.pairs[positions].tolist()):
                        if pair in keep:
                            kept[pair] = (questions[row], logits[row].float().log_softmax(dim=-1))
        return result

    def _match(self, image_embeds: torch.Tensor, passes: list[TextPass], count: int) -> torch.Tensor:
        # BlipForImageTextRetrieval.forward with use_itm_head: the ITM head on each text's [CLS].
        model = cast(BlipForImageTextRetrieval, self.models.get("itm").model)
        result = torch.empty(count, dtype=torch.float32)
        image_embeds = self._cross_attention_input(image_embeds)
        for text_pass in passes:
            hidden = self._encode_texts(model.text_encoder, image_embeds, text_pass)
            cls = hidden.flatten(0, 1)[text_pass.first.to(hidden.device)]
            scores = model.itm_head(cls).float().softmax(dim=-1)[:, 1]
            result[text_pass.pairs] = scores.cpu()
        return result

    def _rank_answers(
        self, work: list[_AnswerWork], questions: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> list[dict[str, float]]:
        # An answer's log-likelihood is the decoder's sum of log-probabilities of its pieces and the
        # eos ([SEP]) after [DEC], over the question's states (what stock BlipForQuestionAnswering is
        # trained on). Every later term is <= 0, so the first step (already computed with the probes)
        # bounds each candidate by its first piece's log-probability. Candidates are scored in full in
        # rounds, best bound first, while one left unscored could still beat the best full score,
        # up to `answer_budget` per question (then the best among those scored stands). The required
        # answers (claims) are always scored. A ranking over 400 product types thus costs about as much
        # as one over 20 colours.
        results: list[dict[str, float]] = [{} for _ in work]
        bounds: list[list[float]] = []
        order: list[list[int]] = []
        pending: list[list[int]] = []
        for item in work:
            first = questions[item.pair][1]
            limits = [first[pieces[0]].item() if pieces else -math.inf for pieces in item.pieces]
            ranked = sorted((c for c, pieces in enumerate(item.pieces) if pieces), key=lambda c: -limits[c])
            required = [item.answer.candidates.index(answer) for answer in item.answer.required]
            bounds.append(limits)
            order.append(ranked)
            claims = [c for c in required if item.pieces[c]]
            first_round = ranked[: max(0, min(ANSWER_ROUND, self.answer_budget - len(claims)))]
            pending.append(list(dict.fromkeys(claims + first_round)))
        while any(pending):
            rows = [(index, candidate) for index, candidates in enumerate(pending) for candidate in candidates]
            scores = self._score_answers([(questions[work[i].pair][0], work[i].pieces[c]) for i, c in rows])
            for (index, candidate), score in zip(rows, scores, strict=True):
                results[index][work[index].answer.candidates[candidate]] = score
            for index, item in enumerate(work):
                scored = results[index]
                best = max(scored.values(), default=-math.inf)
                left = [c for c in order[index] if item.answer.candidates[c] not in scored and bounds[index][c] > best]
                room = self.answer_budget - len(scored)
                pending[index] = left[: min(ANSWER_ROUND, room)] if room > 0 else []
        return results

    def _score_answers(self, rows: list[tuple[torch.Tensor, tuple[int, ...]]]) -> list[float]:
        # Teacher forcing: [DEC] + pieces in, pieces + [SEP] as targets. Rows are right-padded, which
        # the causal self-attention never sees before a row's end; question states of one length go
        # together, since the cross-attention ignores its mask (see Engine._probe).
        model = cast(BlipForQuestionAnswering, self.models.get("vqa").model)
        text = self._text["vqa"]
        scores = [0.0] * len(rows)
        by_length: dict[int, list[int]] = {}
        for index, (states, _) in enumerate(rows):
            by_length.setdefault(states.shape[0], []).append(index)
        for indices in by_length.values():
            for start in range(0, len(indices), self.max_batch * 4):
                chunk = indices[start : start + self.max_batch * 4]
                width = max(len(rows[i][1]) for i in chunk) + 1
                input_ids = torch.full((len(chunk), width), text.pad, dtype=torch.long)
                targets = torch.full((len(chunk), width), -1, dtype=torch.long)
                for row, index in enumerate(chunk):
                    pieces = torch.tensor(rows[index][1], dtype=torch.long)
                    input_ids[row, 0] = text.bos
                    input_ids[row, 1 : len(pieces) + 1] = pieces
                    targets[row, : len(pieces)] = pieces
                    targets[row, len(pieces)] = text.sep
                states = torch.stack([rows[index][0] for index in chunk])
                device = states.device
                logits = model.text_decoder(
                    input_ids=input_ids.to(device),
                    encoder_hidden_states=states,
                    encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=device),
                    use_cache=False,
                ).logits
                log_probs = logits.float().log_softmax(dim=-1)
                valid = (targets >= 0).to(device)
                picked = log_probs.gather(-1, targets.clamp(min=0).to(device)[..., None])[..., 0]
                totals = (picked * valid).sum(dim=-1).cpu().tolist()
                for row, index in enumerate(chunk):
                    scores[index] = totals[row]
        return scores

    def _choose_tags(
        self, image_embeds: torch.Tensor, image_requests: list[int], work: list[tuple[int, TagQuery]]
    ) -> list[list[str]]:
        # ITC as BlipForImageTextRetrieval(use_itm_head=False) computes it: the image's [CLS] through
        # vision_proj against each text's unimodal [CLS] through text_proj, both L2-normalised. Text
        # features of a tag set are computed once (or at start: Engine.warm_tags) and cached by its texts,
        # so each image costs one matrix product over all its tags. The best `top_k` texts of each group
        # are returned, for ITM.
        model = cast(BlipForImageTextRetrieval, self.models.get("itm").model)
        row_of = {request: row for row, request in enumerate(image_requests)}
        image_features = functional.normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        chosen: list[list[str]] = []
        for request, query in work:
            features, groups = self._tag_text_features(query)
            similarity = (features @ image_features[row_of[request]]).cpu()
            texts: list[str] = []
            for members in groups:
                best = members[similarity[members].topk(min(query.top_k, len(members))).indices]
                texts.extend(query.texts[i] for i in best.tolist())
            chosen.append(texts)
        return chosen

    def _image_embeddings(self, image_embeds: torch.Tensor, batch: PreparedBatch) -> dict[int, list[float]]:
        # The image side of ITC (as in _choose_tags) for the requests that ask for it, from the vision pass the
        # ITM model made anyway: no second vision pass.
        rows = [row for row, request in enumerate(batch.images["itm"]) if batch.requests[request].embedding]
        if not rows:
            return {}
        model = cast(BlipForImageTextRetrieval, self.models.get("itm").model)
        picked = image_embeds[torch.tensor(rows, dtype=torch.long, device=image_embeds.device), 0, :]
        features = functional.normalize(model.vision_proj(picked).float(), dim=-1).cpu().tolist()
        return {batch.images["itm"][row]: vector for row, vector in zip(rows, features, strict=True)}

    def _match_with_tags(
        self, image_embeds: torch.Tensor, batch: PreparedBatch, chosen: list[list[str]]
    ) -> tuple[torch.Tensor, list[dict[str, float]]]:
        # The chosen tag texts join the image's match texts in the same packed passes, so the image's
        # cross-attention keys and values are still computed once per image.
        image_requests = batch.images["itm"]
        row_of = {request: row for row, request in enumerate(image_requests)}
        extra = [(request, text) for (request, _), texts in zip(batch.tag_work, chosen, strict=True) for text in texts]
        pairs = sorted(dict.fromkeys([*batch.match_pairs, *extra]), key=lambda pair: row_of[pair[0]])
        scores = self._match(image_embeds, self._pack("itm", pairs, image_requests), len(pairs)).tolist()
        by_pair = dict(zip(pairs, scores, strict=True))
        match_scores = torch.tensor([by_pair[pair] for pair in batch.match_pairs], dtype=torch.float32)
        tags = [
            {text: by_pair[(request, text)] for text in texts}
            for (request, _), texts in zip(batch.tag_work, chosen, strict=True)
        ]
        return match_scores, tags

    def _tag_text_features(self, query: TagQuery) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The L2-normalised ITC features of a tag set's texts (cached by texts) and the text indices of each group."""
        members: dict[int, list[int]] = {}
        for index, group in enumerate(query.groups):
            members.setdefault(group, []).append(index)
        groups = [torch.tensor(m, dtype=torch.long) for m in members.values()]
        with self._lock:
            cached = self._tag_features.get(query.texts)
            if cached is not None:
                self._tag_features.move_to_end(query.texts)
                return cached, groups
        features = self._encode_tag_texts(query.texts)
        with self._lock:
            self._tag_features[query.texts] = features
            unpinned = [texts for texts in self._tag_features if texts not in self._pinned_tags]
            for texts in unpinned[: max(0, len(unpinned) - self._tag_feature_cache)]:
                del self._tag_features[texts]
        return features, groups

    def _encode_tag_texts(self, texts: tuple[str, ...]) -> torch.Tensor:
        # The unimodal text encoder (no image) over chunks of texts, padded and masked: each text's
        # [CLS] through text_proj, as BlipForImageTextRetrieval(use_itm_head=False) computes it.
        # Chunks hold texts of similar length (sorted), so little of the work is padding.
        model = cast(BlipForImageTextRetrieval, self.models.get("itm").model)
        pad = self._text["itm"].pad
        tokens = [self._tokens("itm", text) for text in texts]
        device = self.models.device
        features = torch.empty((len(tokens), model.text_proj.out_features), dtype=torch.float32, device=device)
        order = sorted(range(len(tokens)), key=lambda index: len(tokens[index]))
        for start in range(0, len(order), self.max_batch * 4):
            rows = order[start : start + self.max_batch * 4]
            width = max(len(tokens[index]) for index in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, index in enumerate(rows):
                input_ids[row, : len(tokens[index])] = torch.tensor(tokens[index], dtype=torch.long)
                mask[row, : len(tokens[index])] = 1
            hidden = model.text_encoder(
                input_ids=input_ids.to(device), attention_mask=mask.to(device)
            ).last_hidden_state
            projected = functional.normalize(model.text_proj(hidden[:, 0, :]).float(), dim=-1)
            features[torch.tensor(rows, dtype=torch.long, device=device)] = projected
        return features

    def _encode_texts(
        self, text_encoder: torch.nn.Module, image_embeds: torch.Tensor, text_pass: TextPass
    ) -> torch.Tensor:
        device, dtype = image_embeds.device, self.models.dtype
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

    def _pixels(self, reqs: list[ImageRequest], images: dict[ModelRole, list[int]]) -> dict[ModelRole, torch.Tensor]:
        # Roles whose image processors are configured alike (the usual case) share one resize.
        by_config: dict[str, list[ModelRole]] = {}
        for role in images:
            image_processor = self.models.get(role).processor.image_processor
            by_config.setdefault(image_processor.to_json_string(), []).append(role)
        pixels: dict[ModelRole, torch.Tensor] = {}
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

    def _pack(self, role: ModelRole, pairs: list[tuple[int, str]], image_requests: list[int]) -> list[TextPass]:
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

    def _tokens(self, role: ModelRole, text: str) -> tuple[int, ...]:
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

    def _answer_pieces(self, answer: AnswerRequest) -> list[tuple[int, ...]]:
        # The stock tokenization ([CLS] pieces [SEP], cached) without its special tokens.
        return [self._tokens("vqa", candidate)[1:-1] for candidate in answer.candidates]

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
    ) -> dict[str, float]:
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
            "answers": {work.request for work in batch.answer_work},
            "tags": {request for request, _ in batch.tag_work},
        }
        for index, output in enumerate(outputs):
            output.timings = {
                stage: (totals.get(stage, 0.0) / len(users[stage]) if index in users[stage] else 0.0)
                for stage in STAGES
            }
        return {stage: totals.get(stage, 0.0) for stage in STAGES if users[stage]}  # the stages that ran


def resolve_int8_stages(stages: Collection[str] | None) -> tuple[str, ...]:
    """The int8 stages in INT8_STAGES order (None: the default); ConfigError `int8_stages_invalid` for unknown names."""
    if stages is None:
        return DEFAULT_INT8_STAGES
    unknown = sorted(set(stages) - set(INT8_STAGES))
    if unknown:
        raise ConfigError(
            f"int8 stages {unknown} are not stages; choose among {', '.join(INT8_STAGES)} (MODTAG_INT8_STAGES)",
            code="int8_stages_invalid",
        )
    return tuple(stage for stage in INT8_STAGES if stage in stages)


# Helpers.


def _stage_parts(models: LoadedModels, stage: str) -> list[nn.Module]:
    # The modules whose linear layers compute `stage` (see INT8_STAGES); the float32 heads are outside them.
    parts: dict[str, list[tuple[ModelRole, str]]] = {
        "vision": [(role, "vision_model") for role in models.models],
        "caption": [("caption", "text_decoder")],
        "probes": [("vqa", "text_encoder"), ("vqa", "text_decoder")],
        "matches": [("itm", "text_encoder")],
    }
    return [getattr(models.get(role).model, name) for role, name in parts[stage] if role in models]


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


@dataclass
class _AnswerWork:
    """One answer ranking: the request, its AnswerRequest, its question's probe pair, and each candidate's pieces."""

    request: int
    answer: AnswerRequest
    pair: int
    pieces: list[tuple[int, ...]]  # word pieces of each candidate, without [CLS] / [SEP] (empty: cannot be scored)


_BlipModel = BlipForConditionalGeneration | BlipForQuestionAnswering | BlipForImageTextRetrieval


def _validate(request: ImageRequest) -> None:
    if not isinstance(request.image, Image.Image):
        raise TypeError(f"ImageRequest.image must be a PIL image, not {type(request.image).__name__}")
    for kind, items, item_type in (("answers", request.answers, AnswerRequest), ("tags", request.tags, TagQuery)):
        if any(not isinstance(item, item_type) for item in items):
            raise TypeError(f"ImageRequest.{kind} must hold {item_type.__name__} objects")
    for query in request.tags:
        _validate_tag_query(query)
    for answer in request.answers:
        if any(required not in answer.candidates for required in answer.required):
            raise ValueError(f"AnswerRequest {answer.key!r}: every required answer must be a candidate")
    for kind, texts in (("probes", request.probes), ("texts", request.texts)):
        if isinstance(texts, str):
            raise TypeError(f"ImageRequest.{kind} must be a sequence of strings, not one string")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"ImageRequest.{kind} must hold strings, not {type(text).__name__}")


def _validate_tag_query(query: TagQuery) -> None:
    if not isinstance(query, TagQuery):
        raise TypeError(f"tag sets must be TagQuery objects, not {type(query).__name__}")
    if not isinstance(query.texts, tuple) or any(not isinstance(text, str) for text in query.texts):
        raise TypeError(f"TagQuery {query.key!r}: texts must be a tuple of strings")
    if len(query.texts) != len(query.groups) or query.top_k < 1:
        raise ValueError(f"TagQuery {query.key!r}: one group per text and top_k >= 1")


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
