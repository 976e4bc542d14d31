"""`Prefer` headers as RFC 7240 writes them, and as clients and attackers actually send them."""

from __future__ import annotations

import pytest

from api.moderate_now import MAX_PREFERENCES, Preferences, parse_prefer


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["wait=5"], Preferences(wait_s=5)),
        (["WAIT=5"], Preferences(wait_s=5)),
        (['wait="7"'], Preferences(wait_s=7)),
        (["  wait = 5 "], Preferences(wait_s=5)),
        (["respond-async, wait=10"], Preferences(wait_s=10, respond_async=True)),
        (["respond-async", "wait=3"], Preferences(wait_s=3, respond_async=True)),  # several headers
        (["handling=lenient; foo=bar, wait=4;param=1"], Preferences(wait_s=4)),
        (["wait=2, wait=9"], Preferences(wait_s=2)),  # the first instance counts
        (["wait=2", "wait=9"], Preferences(wait_s=2)),
        (["wait=0"], Preferences(wait_s=0)),
        (["return=minimal"], Preferences()),
        (["respond-async"], Preferences(respond_async=True)),
        (['foo="a, wait=3", wait=6'], Preferences(wait_s=6)),  # a comma inside quotes separates nothing
    ],
)
def test_preferences_are_read(values: list[str], expected: Preferences) -> None:
    assert parse_prefer(values) == expected


@pytest.mark.parametrize(
    "value",
    ["wait=-1", "wait=1.5", "wait=abc", "wait=", "wait", "wait=5s", "wait=\u0665", "wait=1e3", ",,,;;;===", '"', ""],
)
def test_an_unreadable_wait_is_ignored(value: str) -> None:
    """A wait that is not delta-seconds (digits) is ignored, as a preference the server does not understand."""
    assert parse_prefer([value]).wait_s is None


def test_the_first_unreadable_wait_still_hides_later_ones() -> None:
    assert parse_prefer(["wait=x, wait=5"]).wait_s is None


def test_a_huge_wait_is_capped_not_refused() -> None:
    parsed = parse_prefer(["wait=" + "9" * 5000])
    assert parsed.wait_s is not None and parsed.wait_within(30) == 30
    assert Preferences(wait_s=12).wait_within(30) == 12
    assert Preferences(wait_s=12).wait_within(2.5) == 2
    assert Preferences(wait_s=12).wait_within(0) is None  # turned off
    assert Preferences().wait_within(30) is None


def test_a_header_of_thousands_of_preferences_reads_only_the_first_ones() -> None:
    assert parse_prefer([", " * 10_000 + "wait=5"]).wait_s is None
    assert parse_prefer(["x, " * (MAX_PREFERENCES - 1) + "wait=5"]).wait_s == 5
    assert parse_prefer(["x, " * MAX_PREFERENCES + "wait=5"]).wait_s is None
