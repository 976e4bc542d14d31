"""Listing checks (describe, attribute, tags), taxonomies, shadows, reasons, listing verdicts, reload and replay.

Pure domain tests: model outputs are given by hand, so every expected score is computed here by hand.
The same checks through the real (tiny random) models are in test_engine_checks.py.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import policies.registry
from core.errors import PolicyError
from policies import (
    AttributeCheck,
    Evidence,
    ModelOutputs,
    Policy,
    builtin_taxonomies,
    collect_evidence,
    decide,
    evaluate,
    load_policies,
    load_policy,
    load_taxonomies,
)
from policies.context import MAX_CHUNK_WORDS, context_value, text_chunks
from policies.listing import ListingImage, listing_verdict
from policies.outputs import TextLine
from policies.registry import PolicyRegistry
from policies.registry import _fingerprint as fingerprint
from policies.replay import missing_requirements, outputs_from_evidence
from tests.support.policies import failure, load, policy_with


def one_check(check: str, *, review: str = "0.5", block: str = "null", combine: str = "max") -> Policy:
    return policy_with(check, combine=combine, review=review, block=block)


COLOURS = """\
- kind: attribute
  question: what color is the item?
  field: attributes.color
  values: [red, blue, green]
  synonyms: {crimson: red, navy: blue}
  negate: true
"""


def lls(**probabilities: float) -> dict[str, float]:
    return {answer: math.log(p) for answer, p in probabilities.items()}


def ranked(policy: Policy, context: Mapping[str, Any], values: dict[str, float]) -> ModelOutputs:
    """Outputs holding `values` as the ranking of the policy's (only) answer query for this context."""
    (query,) = policy.requirements(context).answers
    return ModelOutputs(answers={query.key: values})


# --- describe ---------------------------------------------------------------------------------------------


def test_describe_scores_the_best_chunk_of_title_and_description() -> None:
    policy = one_check("- {kind: describe, from: [title, description], negate: true}", review="0.8")
    context = {"title": "Red leather handbag", "description": "Barely used. Ships in two days!"}
    needs = policy.requirements(context)
    assert needs.texts == ("Red leather handbag", "Barely used.", "Ships in two days!") and needs.describe
    outputs = ModelOutputs(matches={"Red leather handbag": 0.9, "Barely used.": 0.3, "Ships in two days!": 0.01})
    decision = decide(policy, outputs, context)
    evidence = decision.evidence[0]
    # max over chunks = 0.9; negated: 1 - 0.9 = 0.1 -> below review 0.8
    assert (evidence.score, evidence.matched, evidence.field) == (0.1, "Red leather handbag", "title")
    assert evidence.scores == outputs.matches and decision.action == "allow"
    mismatch = decide(policy, ModelOutputs(matches=dict.fromkeys(needs.texts, 0.05)), context)
    assert mismatch.categories["c"].score == 0.95 and mismatch.action == "review"
    assert mismatch.contradictions[0].field == "title, description"
    assert mismatch.contradictions[0].claimed == "Red leather handbag" and mismatch.contradictions[0].score == 0.95


def test_describe_without_text_is_context_missing_unless_optional() -> None:
    policy = one_check("- {kind: describe, from: [title, description]}")
    with pytest.raises(PolicyError) as caught:
        policy.requirements({"attributes": {"color": "red"}})
    assert caught.value.code == "context_missing" and "'title' or 'description'" in caught.value.message
    assert policy.missing_context({"description": "  "}) and not policy.missing_context({"title": "a mug"})
    optional = one_check("- {kind: describe, from: [description], required: false, negate: true}")
    assert optional.requirements({}).texts == ()
    assert collect_evidence(optional, ModelOutputs(), {})[0].score == 0.0  # no text: not applicable, even negated


def test_long_descriptions_are_cut_into_itm_sized_chunks() -> None:
    sentence = " ".join(f"word{i}" for i in range(60))
    chunks = text_chunks(f"Short one. {sentence}\n- bullet item\n• another; and more", max_chunks=10)
    assert chunks[0] == "Short one."
    assert all(len(chunk.split()) <= MAX_CHUNK_WORDS for chunk in chunks)
    assert " ".join(chunks[1:4]).split() == sentence.split()  # windows of the long sentence, nothing lost
    assert chunks[4:] == ["bullet item", "another;", "and more"]
    assert text_chunks("same. same. same.", 5) == ["same."]
    assert len(text_chunks(". ".join(f"s{i}" for i in range(100)), 8)) == 8
    assert text_chunks("... !!! ---", 4) == []


def test_context_values_must_be_text_or_numbers() -> None:
    assert context_value({"attributes": {"count": 2.0}}, "attributes.count") == "2"
    assert context_value({"title": "  a   mug "}, "title") == "a mug"
    assert context_value({"attributes": "red"}, "attributes.color") is None
    for bad in ([1], {"a": 1}, True, float("nan")):
        with pytest.raises(ValueError):
            context_value({"title": bad}, "title")
    policy = one_check("- {kind: describe, from: [title]}")
    with pytest.raises(PolicyError) as caught:
        policy.requirements({"title": ["a list"]})
    assert caught.value.code == "context_missing" and "must be text or a number, not a list" in caught.value.message


# --- attribute --------------------------------------------------------------------------------------------


def test_attribute_agreement_is_p_claim_over_p_best() -> None:
    policy = one_check(COLOURS, review="0.7")
    context = {"attributes": {"color": "Navy"}}
    query = policy.requirements(context).answers[0]
    assert (query.candidates, query.required) == (("red", "blue", "green"), ("blue",))
    outputs = ranked(policy, context, lls(red=0.6, blue=0.15, green=0.25))
    decision = decide(policy, outputs, context)
    evidence = decision.evidence[0]
    # agreement = P(blue) / P(red) = 0.15 / 0.6 = 0.25; negated = 0.75
    assert (evidence.claimed, evidence.seen, evidence.score) == ("blue", "red", 0.75)
    assert decision.action == "review"
    assert [c.model_dump() for c in decision.contradictions] == [
        {"category": "c", "field": "attributes.color", "claimed": "blue", "seen": "red", "score": 0.75}
    ]
    agreeing = decide(policy, outputs, {"attributes": {"color": "crimson"}})
    assert agreeing.evidence[0].score == 0.0 and agreeing.contradictions == []  # red is the best answer


def test_attribute_claim_outside_the_vocabulary_is_ranked_too() -> None:
    policy = one_check(COLOURS, review="0.7")
    context = {"attributes": {"color": "Purple"}}
    assert policy.requirements(context).answers[0].candidates == ("red", "blue", "green", "purple")
    outputs = ranked(policy, context, lls(red=0.1, blue=0.1, green=0.1, purple=0.7))
    assert decide(policy, outputs, context).evidence[0].score == 0.0
    # The engine may leave out answers it proved unlikely: the ratio needs the claim and the best only.
    partial = decide(policy, ranked(policy, context, lls(purple=0.2, green=0.4)), context).evidence[0]
    assert (partial.score, partial.seen) == (0.5, "green")  # 1 - 0.2 / 0.4
    with pytest.raises(PolicyError) as caught:  # the claim's own likelihood is needed
        decide(policy, ranked(policy, context, lls(red=0.2, blue=0.3, green=0.5)), context)
    assert caught.value.code == "evidence_missing" and "'purple'" in caught.value.message


def test_attribute_without_a_claim_scores_zero_when_optional() -> None:
    policy = one_check(COLOURS.replace("negate: true", "negate: true\n  required: false"))
    evidence = collect_evidence(policy, ModelOutputs(), {"title": "a mug"})[0]
    assert evidence.score == 0.0 and evidence.claimed is None
    required = one_check(COLOURS)
    assert required.missing_context({}) == ["'attributes.color' (the attribute check of category 'c')"]


def test_attribute_vocabulary_from_the_product_taxonomy() -> None:
    policy = one_check(
        "- {kind: attribute, question: 'what color is it?', field: attributes.color, vocabulary: product.color}"
    )
    check = policy.categories[0].checks[0]
    assert isinstance(check, AttributeCheck)
    assert check.claim({"attributes": {"color": "Crimson"}}) == "red"
    assert check.claim({"attributes": {"color": "light sky blue"}}) == "blue"
    assert len(check.candidates("red")) == len(builtin_taxonomies()["product"].group("color").values)  # type: ignore[union-attr]


def test_attribute_log_likelihoods_must_be_log_probabilities() -> None:
    policy = one_check(COLOURS)
    context = {"attributes": {"color": "red"}}
    for bad in (0.5, float("nan"), float("-inf"), True):
        outputs = ranked(policy, context, {"red": bad, "blue": -1.0, "green": -2.0})  # type: ignore[dict-item]
        with pytest.raises(PolicyError) as caught:
            decide(policy, outputs, context)
        assert caught.value.code == "evidence_invalid"


# --- tags -------------------------------------------------------------------------------------------------


def test_tags_report_reranked_scores_and_a_tags_only_category_never_acts() -> None:
    policy = load_policies()["tagging"]
    tag_set = policy.requirements().tag_sets[0]
    assert len(tag_set.texts) >= 500 and tag_set.top_k == 5 and len(set(tag_set.groups)) == 4
    red, mug, wood = "a photo of a red item", "a photo of a mug", "an item made of wood"
    assert {red, mug, wood} <= set(tag_set.texts)
    outputs = ModelOutputs(tags={tag_set.key: {red: 0.91, mug: 0.97, wood: 0.2}})
    decision = decide(policy, outputs)
    assert [(t.tag, t.group, t.score) for t in decision.tags] == [("mug", "product_type", 0.97), ("red", "color", 0.91)]
    result = decision.categories["product_tags"]
    assert (decision.action, result.score, result.decided_by) == ("allow", 0.97, "tags product")
    assert "reports tags and never acts" in (result.reason or "")
    assert decision.evidence[0].matched == "mug" and decision.evidence[0].query == tag_set.key


def test_inline_tags_can_flag_a_category() -> None:
    policy = one_check("- {kind: tags, tags: [ivory, fur coat], top_k: 1, min_score: 0.3}", review="0.6")
    tag_set = policy.requirements().tag_sets[0]
    assert tag_set.texts == ("a photo of ivory", "a photo of fur coat") and tag_set.groups == (0, 0)
    decision = decide(policy, ModelOutputs(tags={tag_set.key: {"a photo of ivory": 0.65}}))
    assert decision.action == "review" and decision.tags[0].tag == "ivory"


# --- validation: every mistake at file:line with a sentence ------------------------------------------------


@pytest.mark.parametrize(
    ("check", "where", "says"),
    [
        ("- {kind: describe, from: [titel]}", "p.yaml:10:33: categories[0].checks[0].from[0]:", "did you mean 'title'"),
        ("- {kind: describe, from: [attributes.Color]}", ":10:33:", "lowercase letters"),
        ("- {kind: describe, from: [title, title]}", ":10:40: categories[0].checks[0].from[1]:", "already listed"),
        ("- {kind: describe, from: []}", ":10:32:", "at least 1 item"),
        ("- {kind: describe, form: [title]}", ":10:26: categories[0].checks[0].form:", "did you mean 'from'"),
        (
            "- {kind: attribute, question: 'q?', field: attributes.color, values: [a, b], vocabulary: product.color}",
            ":10:9: categories[0].checks[0]:",
            "exactly one of 'vocabulary'",
        ),
        (
            "- {kind: attribute, question: 'q?', field: attributes.color, vocabulary: fashion.color}",
            ":10:80: categories[0].checks[0].vocabulary:",
            "no taxonomy named 'fashion'; loaded taxonomies: product",
        ),
        (
            "- {kind: attribute, question: 'q?', field: attributes.color, vocabulary: product.colour}",
            ":10:80:",
            "has no group 'colour'; its groups: product_type, color, material, style",
        ),
        (
            "- {kind: attribute, question: 'q?', field: attributes.color, values: [a, b], synonyms: {c: d}}",
            ":10:98: categories[0].checks[0].synonyms.c:",
            "maps to 'd', which is not a value",
        ),
        (
            "- {kind: attribute, question: 'q?', field: attributes.color, values: [a, A]}",
            ":10:80:",
            "repeats values[0]",
        ),
        ("- {kind: tags, taxonomy: product, tags: [a]}", ":10:9:", "exactly one of 'taxonomy'"),
        (
            "- {kind: tags, taxonomy: product, groups: [colours]}",
            ":10:50: categories[0].checks[0].groups[0]:",
            "no group",
        ),
        ("- {kind: tags, taxonomy: product, prompt: 'a {}'}", ":10:49:", "'prompt' is for inline tags"),
        ("- {kind: tags, tags: [a], prompt: 'no placeholder'}", ":10:41:", "exactly one '{}'"),
        ("- {kind: tags, tags: [a], top_k: 0}", ":10:40: categories[0].checks[0].top_k:", "greater than or equal to 1"),
        ("- {kind: tags, tags: [a], min_score: 1.5}", ":10:44:", "less than or equal to 1"),
        ("- {kind: tags, tags: [a, b, a]}", ":10:35: categories[0].checks[0].tags[2]:", "repeats tags[0]"),
    ],
)
def test_listing_check_mistakes_point_at_the_line(check: str, where: str, says: str) -> None:
    error = failure(f"name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
                    f"    block: null\n    combine: max\n    checks:\n      {check}\n")  # fmt: skip
    assert error.code == "policy_invalid"
    line = next((line for line in error.message.splitlines() if where in line), "")
    assert where in line and says in line, error.message


def test_only_tags_categories_may_have_no_thresholds() -> None:
    text = "name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    checks:\n      - {}\n"
    assert load(text.replace("{}", "{kind: tags, tags: [a]}")).categories[0].review is None
    error = failure(text.replace("{}", "{kind: describe, from: [title]}"))
    assert "p.yaml:4:5: categories[0]: category 'c' has neither a review nor a block threshold" in error.message


def test_shadow_policies_must_name_an_active_policy(tmp_path: Path) -> None:
    base = (
        "name: {name}\ndescription: d\nshadows: {target}\ncategories:\n"
        "  - {{name: c, description: d, review: 0.5, checks: [{{kind: probe, question: 'q?'}}]}}\n"
    )
    assert "cannot shadow itself" in failure(base.format(name="a", target="a")).message
    (tmp_path / "next.yaml").write_text(base.format(name="moderation-next", target="moderation"))
    policies = load_policies([tmp_path])
    assert policies["moderation-next"].shadows == "moderation"
    assert PolicyRegistry([tmp_path]).shadows_of("moderation") == [policies["moderation-next"]]
    (tmp_path / "typo.yaml").write_text(base.format(name="typo", target="moderaton"))
    with pytest.raises(PolicyError) as caught:
        load_policies([tmp_path])
    assert f"{tmp_path / 'typo.yaml'}:3:10: shadows: no policy named 'moderaton'" in caught.value.message
    (tmp_path / "typo.yaml").write_text(base.format(name="chain", target="moderation-next"))
    with pytest.raises(PolicyError) as caught:
        load_policies([tmp_path])
    assert "'moderation-next' is itself a shadow of 'moderation'" in caught.value.message


def write_taxonomy(directory: Path, text: str, name: str = "mine.yaml") -> Path:
    (directory / "taxonomies").mkdir(exist_ok=True)
    path = directory / "taxonomies" / name
    path.write_text(textwrap.dedent(text))
    return path


TAXONOMY = """\
name: mine
description: A small taxonomy.
groups:
  - name: shape
    prompt: a {} object
    values: [round, square]
    synonyms: {circular: round}
"""


@pytest.mark.parametrize(
    ("edit", "where", "says"),
    [
        (lambda t: t.replace("[round, square]", "[round, square, Round]"), ":6:29: groups[0].values[2]:", "repeats"),
        (lambda t: t.replace("circular: round", "circular: oval"), ":7:26: groups[0].synonyms.circular:", "not one of"),
        (lambda t: t.replace("a {} object", "a object"), ":5:13: groups[0].prompt:", "exactly one '{}'"),
        (lambda t: t.replace("values: [", "values: [[", 1), ":7:5:", "YAML syntax error"),
        (lambda t: t + "  - name: shape\n    values: [x]\n", ":8:11: groups[1].name:", "already defined at groups[0]"),
    ],
)
def test_taxonomy_mistakes_point_at_the_line(tmp_path: Path, edit: object, where: str, says: str) -> None:
    path = write_taxonomy(tmp_path, edit(TAXONOMY))  # type: ignore[operator]
    with pytest.raises(PolicyError) as caught:
        load_taxonomies([tmp_path])
    line = next((line for line in caught.value.message.splitlines() if where in line), "")
    assert str(path) in line and says in line, caught.value.message


def test_a_policy_version_covers_the_taxonomy_it_uses(tmp_path: Path) -> None:
    write_taxonomy(tmp_path, TAXONOMY)
    (tmp_path / "shapes.yaml").write_text(
        "name: shapes\ndescription: d\ncategories:\n  - name: c\n    description: d\n    checks:\n"
        "      - {kind: tags, taxonomy: mine}\n"
    )
    first = load_policies([tmp_path])["shapes"].version
    assert load_policy(tmp_path / "shapes.yaml").version == first  # taxonomies/ beside the file
    write_taxonomy(tmp_path, TAXONOMY.replace("[round, square]", "[round, square, oval]"))
    assert load_policies([tmp_path])["shapes"].version != first
    write_taxonomy(tmp_path, TAXONOMY.replace("name: mine", "name: product"), "clash.yaml")
    with pytest.raises(PolicyError) as caught:
        load_policies([tmp_path])
    assert caught.value.code == "policy_duplicate" and "taxonomy 'product' is already defined" in caught.value.message


def test_builtin_listing_and_tagging_policies() -> None:
    policies = load_policies()
    listing = policies["listing"]
    assert listing.context_fields() == (
        "title", "description", "attributes.color", "attributes.count", "attributes.material",
        "attributes.product_type",
    )  # fmt: skip
    assert builtin_taxonomies()["product"].size >= 500
    context = {"title": "Two red mugs", "attributes": {"color": "red", "count": "a pair"}}
    needs = listing.requirements(context)
    count = next(q for q in needs.answers if q.question.startswith("how many"))
    assert count.candidates[:3] == ("1", "2", "3")
    check = listing.category("count_mismatch").checks[0]
    assert isinstance(check, AttributeCheck) and check.claim(context) == "2"


# --- reasons and combination rules, computed by hand --------------------------------------------------------


def test_reasons_say_which_check_decided_and_why() -> None:
    checks = "- {kind: probe, question: 'a?', weight: 1}\n- {kind: probe, question: 'b?', weight: 3}\n"
    outputs = ModelOutputs(probes={"a?": 0.2, "b?": 0.8})
    cases = {
        # max: 0.8
        "max": ("probe 'b?' scored 0.8, the highest of 2 checks; 0.8 >= review 0.6, below block 0.9", 0.8),
        # mean: (0.2 + 0.8) / 2 = 0.5
        "mean": ("the mean of 2 checks is 0.5; the highest is probe 'b?' scored 0.8; 0.5 is below review 0.6", 0.5),
        # weighted: (1 * 0.2 + 3 * 0.8) / 4 = 0.65
        "weighted": (
            "the weighted mean of 2 checks is 0.65; the largest share is probe 'b?' scored 0.8 x 3; "
            "0.65 >= review 0.6, below block 0.9",
            0.65,
        ),
        # all: min = 0.2
        "all": ("all 2 checks must be high and the lowest is probe 'a?' scored 0.2; 0.2 is below review 0.6", 0.2),
    }
    for combine, (reason, score) in cases.items():
        written = checks if combine == "weighted" else checks.replace(", weight: 3", "").replace(", weight: 1", "")
        policy = one_check(written, review="0.6", block="0.9", combine=combine)
        decision = decide(policy, outputs)
        assert decision.categories["c"].score == score and decision.categories["c"].reason == reason, combine
    decision = decide(one_check(checks.replace(", weight: 3", "").replace(", weight: 1", ""), review="0.6",
                                block="0.75"), outputs)  # fmt: skip
    assert decision.reason == "block by 'c': probe 'b?' scored 0.8, the highest of 2 checks; 0.8 >= block 0.75"


# --- listing-level verdicts --------------------------------------------------------------------------------


def photo_decision(describe: float, colour: tuple[str, str, float] | None = None) -> dict[str, object]:
    """A stored listing decision (API shape): describe score (negated) and an optional colour contradiction."""
    described = {"score": describe, "action": "review" if describe >= 0.8 else "allow", "fired": describe >= 0.8}
    categories: dict[str, object] = {"description_mismatch": described}
    evidence = [{"category": "description_mismatch", "kind": "describe", "text": "describe title", "score": describe}]
    contradictions = []
    if colour:
        claimed, seen, score = colour
        categories["color_mismatch"] = {"score": score, "action": "review", "fired": True, "reason": "r"}
        evidence.append({"category": "color_mismatch", "kind": "attribute", "text": "q [attributes.color]"})
        contradictions.append(
            {
                "category": "color_mismatch",
                "field": "attributes.color",
                "claimed": claimed,
                "seen": seen,
                "score": score,
            }
        )
    return {"action": "review", "categories": categories, "evidence": evidence, "contradictions": contradictions,
            "tags": [{"tag": "mug", "group": "product_type", "score": 0.9}]}  # fmt: skip


def test_listing_verdict_reads_the_photos_together() -> None:
    images = [
        ListingImage(0, "done", photo_decision(0.3)),
        ListingImage(1, "done", photo_decision(0.95)),
        ListingImage(2, "done", photo_decision(0.9, ("red", "blue", 0.8))),
    ]
    verdict = listing_verdict(images)
    # one photo matches, so the description category is allow at the listing level
    assert verdict["matches_description"] is True and verdict["categories"]["description_mismatch"]["action"] == "allow"
    assert verdict["findings"] == ["photo 3 shows a different colour: blue, the listing says red"]
    assert verdict["action"] == "review" and verdict["categories"]["color_mismatch"]["photos"] == [3]
    assert verdict["tags"] == [{"tag": "mug", "group": "product_type", "score": 0.9, "photo": 1}]

    none_match = listing_verdict(
        [ListingImage(0, "done", photo_decision(0.9)), ListingImage(1, "done", photo_decision(0.85))]
    )
    assert none_match["findings"] == ["no photo matches the description (the closest is photo 2)"]
    assert none_match["matches_description"] is False and none_match["action"] == "review"
    single = listing_verdict([ListingImage(0, "done", photo_decision(0.99))])
    assert single["findings"] == ["the photo does not match the description"]

    pending = listing_verdict([ListingImage(0, "done", photo_decision(0.1)), ListingImage(1, "queued")])
    assert (pending["status"], pending["action"], pending["matches_description"]) == ("pending", None, None)
    failed = listing_verdict(
        [
            ListingImage(0, "done", photo_decision(0.1)),
            ListingImage(1, "failed", error={"code": "image_invalid", "message": "not an image"}),
        ]
    )
    assert failed["status"] == "done" and failed["photos"] == {"total": 2, "decided": 1, "failed": 1}
    assert failed["findings"] == ["photo 2 could not be checked: not an image (image_invalid)"]
    assert listing_verdict([ListingImage(0, "failed", error={})])["status"] == "failed"


# --- reload without restart ------------------------------------------------------------------------------


ACTIVE = """\
name: mine
description: d
categories:
  - {name: c, description: d, review: 0.5, checks: [{kind: probe, question: 'a?'}]}
"""


def test_registry_reloads_edits_and_keeps_the_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(ACTIVE)
    outcomes: list[str] = []
    registry = PolicyRegistry([tmp_path], interval_s=0.0, on_reload=outcomes.append)
    first = registry["mine"].version
    assert not registry.refresh()  # nothing changed
    path.write_text(ACTIVE.replace("review: 0.5", "review: 0.6"))
    second = registry["mine"].version  # an access notices the edit
    assert second != first and registry.generation == 2 and registry.error is None
    path.write_text(ACTIVE.replace("review: 0.5", "review: 1.5"))
    assert registry["mine"].version == second  # the broken edit is refused, the last good version stays
    assert (
        registry.error is not None
        and f"{path}:4:" in registry.error.message
        and "less than or equal" in registry.error.message
    )
    path.write_text(ACTIVE.replace("review: 0.5", "review: 0.7"))
    assert registry["mine"].version not in (first, second) and registry.error is None
    path.unlink()
    assert "mine" not in registry and set(registry) == {"listing", "moderation", "tagging"}
    assert outcomes == ["loaded", "failed", "loaded", "loaded"]


def test_registry_polls_at_most_every_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text(ACTIVE)
    now = [1000.0]
    registry = PolicyRegistry([tmp_path], interval_s=60, clock=lambda: now[0])
    looks: list[tuple[Path, ...]] = []  # every time the registry reads the watched files

    def counted(dirs: tuple[Path, ...]) -> str:
        looks.append(dirs)
        return fingerprint(dirs)

    monkeypatch.setattr(policies.registry, "_fingerprint", counted)
    (tmp_path / "mine.yaml").write_text(ACTIVE.replace("0.5", "0.6"))
    now[0] += 59.9
    for _ in range(1000):
        registry.get("mine")
    assert registry["mine"].categories[0].review == 0.5 and looks == []  # an access between polls reads no file
    now[0] += 0.1
    assert registry["mine"].categories[0].review == 0.6 and len(looks) == 1  # the interval passed: one look
    for _ in range(1000):
        registry.get("mine")
    assert len(looks) == 1  # the next look is a whole interval after that one
    (tmp_path / "mine.yaml").write_text(ACTIVE.replace("0.5", "0.7"))
    assert registry.refresh(force=True) and registry["mine"].categories[0].review == 0.7  # force skips the wait
    assert len(looks) == 2


# --- replay from stored evidence ---------------------------------------------------------------------------


def test_stored_evidence_rebuilds_the_outputs_of_every_kind() -> None:
    listing = load_policies()["listing"]
    context = {"title": "A red mug", "description": "Ceramic. Holds 300 ml.", "attributes": {"color": "red"}}
    needs = listing.requirements(context)
    tag_set = needs.tag_sets[0]
    outputs = ModelOutputs(
        matches=dict.fromkeys(needs.texts, 0.4),
        answers={q.key: {c: -1.0 - i * 0.1 for i, c in enumerate(q.candidates)} for q in needs.answers},
        tags={tag_set.key: {"a photo of a mug": 0.8, "a photo of a red item": 0.7}},
        text=(TextLine("wa.me/15550142", 0.9, (0, 0, 64, 48)),),
        measures={"white_background": 0.3, "sharpness": 0.7, "product_fill": 0.4, "width": 640.0, "height": 480.0},
    )
    decision = decide(listing, outputs, context)
    stored = json.loads(json.dumps([e.model_dump(mode="json") for e in decision.evidence]))
    lines = [line.public() for line in outputs.text or ()]  # stored beside the evidence, like the caption
    rebuilt = outputs_from_evidence(stored, None, lines)
    assert missing_requirements(needs, rebuilt).empty
    assert decide(listing, rebuilt, context) == decision
    assert evaluate([Evidence.model_validate(e) for e in stored], listing) == decision


def test_replay_needs_inference_only_for_what_is_new() -> None:
    old = one_check("- {kind: probe, question: 'a?'}\n- {kind: caption, words: [gun]}")
    decision = decide(old, ModelOutputs(caption="a gun", probes={"a?": 0.3}))
    stored = outputs_from_evidence([e.model_dump() for e in decision.evidence], "a gun")
    new = one_check(
        "- {kind: probe, question: 'a?', negate: true}\n- {kind: probe, question: 'b?'}\n"
        "- {kind: caption, words: [rifle]}\n- {kind: match, text: a gun}"
    )
    missing = missing_requirements(new.requirements(), stored)
    assert (missing.caption, missing.probes, missing.texts) == (False, ("b?",), ("a gun",))
    merged = stored.merged(ModelOutputs(probes={"b?": 0.9}, matches={"a gun": 0.1}))
    replayed = decide(new, merged)
    assert [e.score for e in replayed.evidence] == [0.7, 0.9, 0.0, 0.1]  # 1 - 0.3 from the stored P(yes)
