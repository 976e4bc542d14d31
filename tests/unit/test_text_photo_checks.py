"""The `text` and `photo` check kinds: loading and its located errors, detectors, terms, RE2 patterns, pixel limits,
the main-photo rule, text area, evidence, reasons and replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modtag.cli import main
from policies import ModelOutputs, Policy, decide
from policies.checks.photo import PhotoCheck, covered_share
from policies.checks.text import DETECTORS, TextCheck
from policies.outputs import TextLine
from policies.replay import missing_requirements, outputs_from_evidence
from tests.support.policies import failure, policy_with


def line(text: str, score: float = 0.9, box: tuple[int, int, int, int] = (0, 0, 100, 20)) -> TextLine:
    return TextLine(text, score, box)


def text_check(**fields: object) -> TextCheck:
    [check] = policy_with(json.dumps([{"kind": "text", **fields}])).category("c").checks
    assert isinstance(check, TextCheck)
    return check


def score_of(policy: Policy, outputs: ModelOutputs) -> float:
    return decide(policy, outputs).categories["c"].score


# --- detectors ---------------------------------------------------------------------------------------------------

FOUND = {
    "phone": [
        ("CALL 555 0142", "555 0142"),
        ("Tel: +44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
        ("(555) 014-2368", "(555) 014-2368"),
        ("06 12 34 56 78", "06 12 34 56 78"),
        ("CALL 0176 5550 1423", "0176 5550 1423"),
        ("1-800-555-0199 today", "1-800-555-0199"),
        ("+33612345678", "+33612345678"),
        ("0612345678", "0612345678"),
        ("call me 555-O142 now", "555-O142"),  # OCR read a zero as the letter O
        ("O7700 900l23", "O7700 900l23"),
        ("555.014.2368", "555.014.2368"),
        # PP-OCR drops the spaces of printed lines: after a word announcing a number, any block counts.
        ("CALL017655501423", "017655501423"),
        ("Tel:5550142", "5550142"),
        ("WhatsApp+4915112345678", "+4915112345678"),
    ],
    "email": [
        ("mail bob@example.com now", "bob@example.com"),
        ("write bob at example dot com", "bob at example dot com"),
        ("bob [at] example [dot] com", "bob [at] example [dot] com"),
        ("bob(at)gmail(dot)com", "bob(at)gmail(dot)com"),
    ],
    "url": [
        ("https://example.org/item?id=3", "https://example.org/item?id=3"),
        ("visit www.myshop.example", "www.myshop.example"),
        ("shop.example.com", "shop.example.com"),
        ("t.me/seller", "t.me/seller"),
        ("wa.me/15550142.", "wa.me/15550142"),
    ],
    "handle": [
        ("follow @seller_99", "@seller_99"),
        ("IG: cheap.deals", "IG: cheap.deals"),
        ("snap - name", "snap - name"),
    ],
}
NOT_FOUND = {
    "phone": [
        "2024", "$19.99", "100%", "2019 2020 2021 2022", "2024-05-12", "12.05.2024", "12/05/2024", "1 250 000",
        "36 38 40 42", "SKU1234567", "#1234567890", "3.14159265", "4006381333931", "0 12345 67890 5",
        "ISBN 0-306-40615-2", "€ 1 299 999", "Hello world lol", "Size 38",
        "recall1234567", "TEL 2024", "phone 123",  # a cue inside a word; too few digits after one
    ],
    "email": ["see you at 5.30", "meet me at the park", "me at home dot soon", "user@localhost"],
    "url": ["image.png", "example.comfort", "e.g. this", "version 1.2.3", "bob@example.com", "Contact.Us"],
    "handle": ["bob@example.com", "@ 5pm", "@12", "cup of-tea", "a@b"],
}  # fmt: skip


@pytest.mark.parametrize(("name", "text", "found"), [(n, t, f) for n, cases in FOUND.items() for t, f in cases])
def test_detectors_find_contact_details(name: str, text: str, found: str) -> None:
    assert DETECTORS[name](text) == found


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, texts in NOT_FOUND.items() for t in texts])
def test_detectors_leave_dates_prices_and_words_alone(name: str, text: str) -> None:
    assert DETECTORS[name](text) is None


def test_a_100_kb_line_is_searched_without_trouble() -> None:
    policy = policy_with("- {kind: text, detect: [phone, email, url, handle], terms: [whatsapp], patterns: ['x{2,}y']}")
    for hostile in ("1 " * 50_000, "a@" * 50_000, "a." * 50_000, "é" * 100_000, "w" * 100_000):
        assert score_of(policy, ModelOutputs(text=(line(hostile),))) == 0.0
    long_tail = "a" * 99_000 + " CALL 555 0142"
    assert score_of(policy, ModelOutputs(text=(line(long_tail),))) == 0.0  # detectors read the first 1000 characters


# --- terms ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seen"),
    [
        ("wh4tsapp me", "wh4tsapp"),
        ("TELEGRAM", "TELEGRAM"),
        ("Message on Télégram!", "Télégram"),
        ("pay by ca$happ", "ca$happ"),
        ("cash app", "cash app"),
        ("w.h.a.t.s.a.p.p", "w.h.a.t.s.a.p.p"),
        ("Western  Union", "Western  Union"),
        ("gift-card only", "gift-card"),
        ("venmo:@x", "venmo"),
        ("code 1488", "1488"),
    ],
)
def test_terms_ignore_case_accents_l33t_and_separators(text: str, seen: str) -> None:
    check = text_check(terms=["whatsapp", "telegram", "cashapp", "western union", "gift card", "venmo", "1488"])
    hit = check.find(text)
    assert hit is not None and hit[1] == seen


@pytest.mark.parametrize("text", ["mozzarelle", "telegrams", "myvenmo", "534", "14889", "a whats app"])
def test_terms_do_not_fire_inside_longer_words_or_on_numbers(text: str) -> None:
    check = text_check(terms=["zelle", "telegram", "venmo", "sea", "1488", "whatsapp x"])
    assert check.find(text) is None


# --- RE2 patterns --------------------------------------------------------------------------------------------------


def test_patterns_run_in_linear_time_even_when_written_to_backtrack() -> None:
    policy = policy_with("- {kind: text, patterns: ['(a+)+$']}")
    assert score_of(policy, ModelOutputs(text=(line("a" * 50_000 + "!"),))) == 0.0  # Python's re takes ages here
    assert score_of(policy, ModelOutputs(text=(line("a" * 50_000, 0.8),))) == 0.8
    assert text_check(patterns=["(?i)dm\\s+me"]).find("pls DM  me") == ("pattern /(?i)dm\\s+me/", "DM  me")
    assert text_check(patterns=["dm me"]).find("DM ME") is None  # case-sensitive unless (?i)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("(a)\\1", "invalid escape sequence"),
        ("dm(?= me)", "invalid perl operator"),
        ("(unclosed", "missing )"),
        ("x*", "matches an empty line"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_at_their_line(pattern: str, says: str) -> None:
    error = failure(f"""\
        name: t
        description: d
        categories:
          - name: c
            description: d
            review: 0.5
            checks:
              - kind: text
                patterns:
                  - ok
                  - {json.dumps(pattern)}
        """)
    assert error.code == "policy_invalid"
    assert error.message.startswith("p.yaml:11:") and "categories[0].checks[0].patterns[1]:" in error.message
    assert says in error.message


def test_a_text_check_needs_a_rule_and_known_detectors() -> None:
    empty = failure("name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
                    "    checks:\n      - kind: text\n        min_score: 0.3\n")  # fmt: skip
    assert empty.message.startswith("p.yaml:8:9: categories[0].checks[0]: a text check needs at least one")
    typo = failure("name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
                   "    checks:\n      - {kind: text, detect: [phone, emial]}\n")  # fmt: skip
    assert "p.yaml:8:38: categories[0].checks[0].detect[1]: unknown detector 'emial'; did you mean 'email'?" in (
        typo.message
    )
    assert "known detectors: email, handle, phone, url" in typo.message
    terms = json.dumps([f"w{i}" for i in range(201)])
    too_many = failure("name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
                       f"    checks:\n      - {{kind: text, terms: {terms}}}\n")  # fmt: skip
    assert "categories[0].checks[0].terms: list should have at most 200 items" in too_many.message


# --- scoring, evidence, reasons ------------------------------------------------------------------------------------


def test_the_score_is_the_confidence_of_the_best_matching_line_above_min_score() -> None:
    policy = policy_with("- {kind: text, detect: [phone], terms: [whatsapp], min_score: 0.5}")
    lines = (
        line("WhatsApp only", 0.7),
        line("CALL 555 0142", 0.95),
        line("+44 20 7946 0958", 0.4),  # below min_score: ignored
        line("a mug", 0.99),
    )
    decision = decide(policy, ModelOutputs(text=lines))
    [entry] = decision.evidence
    assert (entry.score, entry.matched, entry.field, entry.seen) == (0.95, "CALL 555 0142", "phone", "555 0142")
    assert "(line 'CALL 555 0142': phone)" in decision.reason
    assert score_of(policy, ModelOutputs(text=(line("+44 20 7946 0958", 0.4),))) == 0.0
    assert score_of(policy, ModelOutputs(text=())) == 0.0  # an image without text
    terms = decide(policy, ModelOutputs(text=(line("WhatsApp only", 0.7),)))
    assert terms.evidence[0].field == "term 'whatsapp'" and "': term 'whatsapp')" in terms.reason
    long = decide(policy, ModelOutputs(text=(line("x" * 200 + " whatsapp", 0.7),)))
    assert long.evidence[0].matched is not None and len(long.evidence[0].matched) == 60  # shortened


def test_text_checks_ask_for_text_lines_and_fail_without_them() -> None:
    policy = policy_with("- {kind: text, detect: [url]}")
    assert policy.requirements().read_text and not policy.requirements().measures
    with pytest.raises(Exception, match="the lines of text read in the image"):
        decide(policy, ModelOutputs())


# --- photo -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "says"),
    [
        ("{kind: photo, measure: white_backgrond, min: 0.5}", "unknown measure 'white_backgrond'; did you mean "
         "'white_background'? known measures: min_side, product_fill, sharpness, white_background, text_area"),
        ("{kind: photo, measure: sharpness}", "a photo check needs 'min', 'max' or both"),
        ("{kind: photo, measure: min_side, min: 0.5}", ".min: min_side is in pixels: a whole number from 1"),
        ("{kind: photo, measure: sharpness, max: 2}", ".max: sharpness is a share of the image: a number in [0, 1]"),
        ("{kind: photo, measure: sharpness, min: 0.5, max: 0.2}", ".max: max 0.2 is below min 0.5"),
        ("{kind: photo, measure: sharpness, min: 0.5, photos: first}", ".photos: input should be 'all' or 'main'"),
    ],
)  # fmt: skip
def test_photo_check_mistakes_point_at_the_line(check: str, says: str) -> None:
    error = failure(
        f"name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
        f"    checks:\n      - {check}\n"
    )
    assert error.message.startswith("p.yaml:8:") and says in error.message


@pytest.mark.parametrize(
    ("limits", "value", "score", "explained"),
    [
        ("min: 0.85", 0.42, 1.0, " (white_background 0.42 < min 0.85)"),
        ("min: 0.85", 0.9, 0.0, " (white_background 0.9)"),
        ("max: 0.3", 0.42, 1.0, " (white_background 0.42 > max 0.3)"),
        ("{min: 0.2, max: 0.4}", 0.42, 1.0, " (white_background 0.42 > max 0.4)"),
        ("{min: 0.5, max: 0.9}", 0.42, 1.0, " (white_background 0.42 < min 0.5)"),
    ],
)
def test_a_photo_check_fires_outside_its_limits(limits: str, value: float, score: float, explained: str) -> None:
    fields = limits.strip("{}")
    policy = policy_with(f"- {{kind: photo, measure: white_background, {fields}}}")
    decision = decide(policy, ModelOutputs(measures={"white_background": value, "width": 64.0, "height": 48.0}))
    [entry] = decision.evidence
    assert entry.score == score and entry.scores == {"white_background": value}
    assert PhotoCheck.explain(entry) == explained
    if score:
        assert explained + ";" in decision.reason


def test_min_side_limits_are_pixels() -> None:
    policy = policy_with("- {kind: photo, measure: min_side, min: 600}")
    assert policy.requirements().measures == ("min_side",)
    assert score_of(policy, ModelOutputs(measures={"min_side": 480.0})) == 1.0
    assert score_of(policy, ModelOutputs(measures={"min_side": 600.0})) == 0.0


@pytest.mark.parametrize(("position", "score", "field"), [(None, 1.0, None), (0, 1.0, "photo 1"), (1, 0.0, "photo 2")])
def test_photos_main_judges_only_the_first_photo_of_a_listing(position: int | None, score: float, field: str) -> None:
    policy = policy_with("- {kind: photo, measure: white_background, min: 0.6, photos: main}")
    outputs = ModelOutputs(measures={"white_background": 0.1}, position=position)
    decision = decide(policy, outputs)
    [entry] = decision.evidence
    assert (entry.score, entry.field) == (score, field)
    if position == 1:
        assert PhotoCheck.explain(entry) == " (not the main photo)"
        assert decide(policy, ModelOutputs(position=1)).evidence[0].score == 0.0  # nothing to measure: not missing
    every = policy_with("- {kind: photo, measure: white_background, min: 0.6}")
    assert score_of(every, outputs) == 1.0  # photos: all (the default)


def test_text_area_is_the_union_of_the_boxes() -> None:
    overlapping = [line("a", box=(0, 0, 50, 10)), line("b", box=(25, 0, 75, 10)), line("c", box=(0, 0, 50, 10))]
    assert covered_share(overlapping, 100, 100) == 0.075  # 75 x 10, not 50 x 10 x 3
    crossing = [line("a", box=(0, 40, 100, 60)), line("b", box=(40, 0, 60, 100))]
    assert covered_share(crossing, 100, 100) == 0.36  # 2000 + 2000 - 400 overlap
    assert covered_share([line("a", box=(-50, -50, 500, 500))], 100, 100) == 1.0  # clipped to the image
    assert covered_share([], 100, 100) == 0.0 and covered_share(overlapping, 0, 0) == 0.0

    policy = policy_with("- {kind: photo, measure: text_area, max: 0.1, photos: main}")
    needs = policy.requirements()
    assert needs.read_text and needs.measures == ("width", "height")
    decision = decide(policy, ModelOutputs(text=tuple(crossing), measures={"width": 100.0, "height": 100.0}))
    assert decision.evidence[0].score == 1.0 and decision.evidence[0].scores == {
        "text_area": 0.36,
        "width": 100.0,
        "height": 100.0,
    }
    assert "(text_area 0.36 > max 0.1)" in decision.reason


# --- replay ------------------------------------------------------------------------------------------------------

BOTH = """\
- {kind: text, detect: [phone, url], terms: [whatsapp]}
- {kind: photo, measure: white_background, min: 0.6, photos: main}
- {kind: photo, measure: text_area, max: 0.05, photos: main}
- {kind: photo, measure: sharpness, min: 0.2}
"""


@pytest.mark.parametrize("position", [None, 0, 1])
def test_stored_evidence_and_lines_re_decide_identically(position: int | None) -> None:
    policy = policy_with(BOTH, combine="weighted", review="0.2")
    needs = policy.requirements()
    lines = (line("CALL 555 0142", 0.93, (10, 10, 90, 30)), line("a mug", 0.99, (0, 50, 40, 60)))
    measures = {"white_background": 0.31, "sharpness": 0.7, "width": 100.0, "height": 80.0}
    outputs = ModelOutputs(text=lines, measures=measures, position=position)
    decision = decide(policy, outputs)
    stored = json.loads(json.dumps([entry.model_dump(mode="json") for entry in decision.evidence]))
    replayed = outputs_from_evidence(stored, None, [text_line.public() for text_line in lines])
    assert replayed.position == position
    assert missing_requirements(needs, replayed).empty  # nothing to compute again
    assert decide(policy, replayed) == decision


# --- the CLI ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "says"),
    [
        ("{kind: text, detect: [phnoe]}", "bad.yaml:8:31: categories[0].checks[0].detect[0]: unknown detector 'phnoe'; "
         "did you mean 'phone'?"),
        ("{kind: text, min_score: 0.5}", "bad.yaml:8:9: categories[0].checks[0]: a text check needs at least one"),
        ("{kind: text, patterns: ['(\\w)\\1']}", "bad.yaml:8:33: categories[0].checks[0].patterns[0]: RE2 cannot "
         "compile this pattern"),
    ],
)  # fmt: skip
def test_policy_validate_reports_text_check_mistakes(
    check: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: t\ndescription: d\ncategories:\n  - name: c\n    description: d\n    review: 0.5\n"
        f"    checks:\n      - {check}\n"
    )
    assert main(["policy", "validate", str(bad)]) != 0
    assert f"{tmp_path}/{says}" in capsys.readouterr().err
