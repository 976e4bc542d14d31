"""The backfill's rate limit on an injected clock, and its rows' Idempotency-Keys."""

from __future__ import annotations

from pathlib import Path

from modtag.backfill import MAX_KEY_ID_CHARS, RateLimit, Row, read_rows


class FakeClock:
    """Time that moves only when the limiter sleeps: what the limiter asks for is all that is measured."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_the_rate_limit_allows_a_second_of_burst_then_spaces_calls() -> None:
    clock = FakeClock()
    limit = RateLimit(5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        limit.take()
    assert clock.slept == 0  # a second's worth at once
    for _ in range(10):
        limit.take()
    assert abs(clock.slept - 2.0) < 1e-9  # then one per 0.2 s
    clock.now += 60  # idle a minute: the burst is one second's worth again, not a minute's
    before = clock.slept
    for _ in range(6):
        limit.take()
    assert abs(clock.slept - before - 0.2) < 1e-9


def test_keys_come_from_the_id_or_the_content_and_fit_the_header() -> None:
    by_id = Row(1, id="sku-1", url="https://a/1.jpg")
    assert by_id.key("moderation") == "backfill:moderation:id:sku-1"
    assert by_id.key("listing") != by_id.key("moderation")  # another policy is another job
    moved = Row(9, id="sku-1", url="https://a/elsewhere.jpg")
    assert moved.key("moderation") == by_id.key("moderation")  # the id is the row's identity
    long_id = Row(1, id="x" * (MAX_KEY_ID_CHARS + 1), url="https://a/1.jpg")
    hostile = Row(1, id="a b\r\nInjected: 1", url="https://a/1.jpg")
    for row in (long_id, hostile):
        key = row.key("moderation")
        assert len(key) <= 255 and all(" " <= char <= "~" for char in key) and "sha256" in key
    same = Row(1, url="https://a/1.jpg", context={"a": 1, "b": 2})
    reordered = Row(7, url="https://a/1.jpg", context={"b": 2, "a": 1})
    assert same.key("moderation") == reordered.key("moderation")
    assert Row(1, url="https://a/2.jpg").key("moderation") != Row(1, url="https://a/1.jpg").key("moderation")


def test_json_lines_and_csv_are_told_apart(tmp_path: Path) -> None:
    lines = tmp_path / "rows.txt"
    lines.write_text('\ufeff{"url": "https://a/1.jpg", "id": 7}\n')
    (row,) = read_rows(lines)
    assert (row.id, row.url, row.problem) == ("7", "https://a/1.jpg", None)
    table = tmp_path / "rows.txt.csv"
    table.write_text("URL,Id\nhttps://a/1.jpg,7\n")
    (row,) = read_rows(table)
    assert (row.id, row.url, row.problem) == ("7", "https://a/1.jpg", None)
