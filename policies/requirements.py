"""What a policy asks of the models: the questions, texts, answer rankings, tag sets, text reading and pixel
measurements one image needs, and the capabilities (`policies.capabilities`) that compute them."""

from __future__ import annotations

from dataclasses import dataclass

from policies.capabilities import MODEL_FREE, Capability


@dataclass(frozen=True)
class AnswerQuery:
    """An open question whose candidate answers the VQA decoder ranks by likelihood.

    The engine returns exact log-likelihoods for the `required` answers (the job's claims) and for
    every candidate that could be the most likely one; candidates it can prove less likely than the
    best (their first token alone is) may be left out.
    """

    key: str  # a hash of (question, candidates): which ranking the stored log-likelihoods belong to
    question: str
    candidates: tuple[str, ...]
    required: tuple[str, ...] = ()

    def requiring(self, other: AnswerQuery) -> AnswerQuery:
        """The same ranking, scoring exactly the answers either requires."""
        required = tuple(dict.fromkeys((*self.required, *other.required)))
        return AnswerQuery(self.key, self.question, self.candidates, required)


@dataclass(frozen=True)
class TagSet:
    """The tags of one tags check: every text gets ITC; the best `top_k` of each group get ITM."""

    key: str  # a hash of (texts, groups, top_k): the same tags share cached text features
    texts: tuple[str, ...]
    groups: tuple[int, ...]  # the group index of each text
    top_k: int


@dataclass(frozen=True)
class BankQuery:
    """A bank a hash check matches the image against, at the largest PDQ distance any of its checks allows."""

    bank: str
    max_distance: int


@dataclass(frozen=True)
class ExampleQuery:
    """An example set an `examples` check votes with, with the most neighbours any of its checks asks for."""

    set: str
    k: int


@dataclass(frozen=True)
class Requirements:
    """What the engine must compute for a policy (deduplicated, in first-seen order).

    Without a job's context, `texts` holds the fixed match texts only and `describe` says that each
    job adds texts from its context; with one, its describe chunks are included and attribute
    candidates include the claims.
    """

    caption: bool
    probes: tuple[str, ...]
    texts: tuple[str, ...]
    answers: tuple[AnswerQuery, ...] = ()
    tag_sets: tuple[TagSet, ...] = ()
    describe: bool = False
    banks: tuple[BankQuery, ...] = ()  # not a model output: the worker matches hashes before any model runs
    read_text: bool = False  # the lines of text in the image (OCR)
    measures: tuple[str, ...] = ()  # pixel measurements by name (worker/families/pixels)
    embedding: bool = False  # the image embedding (for an examples check, or stored for similar-image search)
    examples: tuple[ExampleQuery, ...] = ()  # not a model output: the worker looks the embedding up in these sets

    @property
    def capabilities(self) -> frozenset[Capability]:
        """The capabilities these requirements ask for (the bank lookup included: it is not a model's)."""
        wanted = {
            Capability.CAPTION: self.caption,
            Capability.YES_NO: bool(self.probes),
            Capability.TEXT_MATCH: bool(self.texts or self.describe),
            Capability.ANSWER_RANK: bool(self.answers),
            Capability.TAGS: bool(self.tag_sets),
            Capability.TEXT_READ: self.read_text,
            Capability.PIXELS: bool(self.measures),
            Capability.BANK_MATCH: bool(self.banks),
            Capability.IMAGE_EMBEDDING: self.embedding or bool(self.examples),
            Capability.EXAMPLE_MATCH: bool(self.examples),
        }
        return frozenset(capability for capability, needed in wanted.items() if needed)

    @property
    def model_capabilities(self) -> frozenset[Capability]:
        """The capabilities some model family must compute (the worker's own steps left out)."""
        return self.capabilities - MODEL_FREE

    def merge(self, other: Requirements) -> Requirements:
        """Everything either needs: what one engine pass computes for an active policy and its shadows."""
        needs = RequirementsBuilder()
        for part in (self, other):
            needs.add(part)
        return needs.build()

    @property
    def empty(self) -> bool:
        """True when no model needs to run (bank lookups are not model work)."""
        return not (
            self.caption
            or self.probes
            or self.texts
            or self.answers
            or self.tag_sets
            or self.read_text
            or self.measures
            or self.embedding
            or self.examples
        )


class RequirementsBuilder:
    """Collects what each check asks for (a check kind's `require` writes here), deduplicated in first-seen order."""

    def __init__(self) -> None:
        self.caption = False
        self.describe = False  # some check adds texts from each job's context
        self._probes: dict[str, None] = {}
        self._texts: dict[str, None] = {}
        self._answers: dict[str, AnswerQuery] = {}
        self._tag_sets: dict[str, TagSet] = {}
        self._banks: dict[str, int] = {}
        self.read_text = False
        self._measures: dict[str, None] = {}
        self.embedding = False
        self._examples: dict[str, int] = {}

    def probe(self, question: str) -> None:
        self._probes.setdefault(question)

    def text(self, text: str) -> None:
        self._texts.setdefault(text)

    def answer(self, query: AnswerQuery) -> None:
        known = self._answers.get(query.key)
        self._answers[query.key] = query if known is None else known.requiring(query)

    def tag_set(self, tag_set: TagSet) -> None:
        self._tag_sets.setdefault(tag_set.key, tag_set)

    def bank(self, query: BankQuery) -> None:
        self._banks[query.bank] = max(query.max_distance, self._banks.get(query.bank, query.max_distance))

    def text_lines(self) -> None:
        """The lines of text in the image (OCR)."""
        self.read_text = True

    def measure(self, name: str) -> None:
        """One pixel measurement of the image, by name."""
        self._measures.setdefault(name)

    def image_embedding(self) -> None:
        """The image's embedding (an examples check asks for its sets instead, which implies it)."""
        self.embedding = True

    def example_set(self, query: ExampleQuery) -> None:
        self._examples[query.set] = max(query.k, self._examples.get(query.set, query.k))

    def add(self, needs: Requirements) -> None:
        """Everything `needs` asks for, besides what was collected."""
        self.caption = self.caption or needs.caption
        self.describe = self.describe or needs.describe
        for question in needs.probes:
            self.probe(question)
        for text in needs.texts:
            self.text(text)
        for query in needs.answers:
            self.answer(query)
        for tag_set in needs.tag_sets:
            self.tag_set(tag_set)
        for bank in needs.banks:
            self.bank(bank)
        self.read_text = self.read_text or needs.read_text
        for name in needs.measures:
            self.measure(name)
        self.embedding = self.embedding or needs.embedding
        for example_query in needs.examples:
            self.example_set(example_query)

    def build(self) -> Requirements:
        return Requirements(
            caption=self.caption,
            probes=tuple(self._probes),
            texts=tuple(self._texts),
            answers=tuple(self._answers.values()),
            tag_sets=tuple(self._tag_sets.values()),
            describe=self.describe,
            banks=tuple(BankQuery(bank, distance) for bank, distance in self._banks.items()),
            read_text=self.read_text,
            measures=tuple(self._measures),
            embedding=self.embedding,
            examples=tuple(ExampleQuery(name, k) for name, k in self._examples.items()),
        )
