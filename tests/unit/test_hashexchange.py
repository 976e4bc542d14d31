"""Reading and writing hash lists (core/hashexchange.py): HMA's signal file, CSV with or without a header, and the
ways a file goes wrong (reported by line number, nothing kept)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest

from core.errors import InvalidField
from core.hashexchange import ExchangeFormat, MalformedHashList, read_hash_list, write_csv, write_hma

PDQ = "a5" * 32
SHA = "3c" * 32
HMA = ExchangeFormat.HMA
CSV = ExchangeFormat.CSV


def read(text: str | bytes, fmt: ExchangeFormat = HMA, signal_type: str | None = None, **kwargs: int) -> list[tuple]:
    raw = text.encode() if isinstance(text, str) else text
    found = read_hash_list(io.BytesIO(raw), fmt, signal_type, **kwargs)
    return [(item.sha256, item.pdq, item.note) for item in found.items]


def test_hma_lines_name_their_signal_type() -> None:
    assert read(f"pdq {PDQ}\nsha256 {SHA.upper()}\nvideo_sha256 {SHA}\n") == [
        (None, PDQ, None),
        (SHA, None, None),
        (SHA, None, None),
    ]
    found = read_hash_list(io.BytesIO(f"video_md5 {'0' * 32}\nurl https://x.test\npdq {PDQ}\n".encode()), HMA)
    assert dict(found.unsupported) == {"video_md5": 1, "url": 1} and len(found.items) == 1


def test_csv_headers_in_the_shapes_people_and_threatexchange_write() -> None:
    assert read(f'signal_type,signal,note\npdq,{PDQ},"a note, with a comma"\n', CSV) == [
        (None, PDQ, "a note, with a comma")
    ]
    assert read(f"collab,signal_type,signal_str,category,tags\nS,sha256,{SHA},POSITIVE_CLASS,\n", CSV) == [
        (SHA, None, None)
    ]
    assert read(f"pdq,note\n{PDQ},partner\n", CSV) == [(None, PDQ, "partner")]
    assert read(f"{PDQ},no header\n", CSV, "pdq") == [(None, PDQ, "no header")]
    assert read(f"pdq,{PDQ}\nSHA256,{SHA},a note\n", CSV) == [(None, PDQ, None), (SHA, None, "a note")]


@pytest.mark.parametrize(
    ("text", "fmt", "problem"),
    [
        (f"pdq {PDQ}\npdq {PDQ[:-1]}\n", HMA, "line 2: "),
        (f"{PDQ}\n", HMA, "has no signal type"),
        (b"\xff\xfe\x00garbage\n", HMA, "line 1: not UTF-8 text"),
        ("pdq " + "a" * 5000 + "\n", HMA, "longer than 4096"),
        (f"{PDQ}\n", CSV, "needs signal_type"),
        (f"signal_type,signal\npdq,\nsha256,{PDQ}z\n", CSV, "line 3: "),
    ],
)
def test_malformed_lines_are_named(text: str | bytes, fmt: ExchangeFormat, problem: str) -> None:
    with pytest.raises(MalformedHashList) as caught:
        read(text, fmt)
    assert problem in caught.value.message and caught.value.code == "bank_import_malformed"


def test_prose_is_not_a_list_of_unknown_signal_types() -> None:
    with pytest.raises(MalformedHashList) as caught:
        read("".join(f"word{index} and more words\n" for index in range(40)))
    assert (
        caught.value.message.startswith("24 malformed lines") and "line 17: not a signal type" in caught.value.message
    )


def test_many_bad_lines_are_summed_up_and_too_many_hashes_refused() -> None:
    with pytest.raises(MalformedHashList) as caught:
        read("pdq x\n" * 1000)
    assert caught.value.message.startswith("1000 malformed lines") and "(and 980 more)" in caught.value.message
    with pytest.raises(InvalidField) as too_many:
        read(f"pdq {PDQ}\n" * 11, max_items=10)
    assert too_many.value.code == "bank_import_too_large"


def test_writing_round_trips_and_keeps_formulas_out_of_spreadsheets() -> None:
    rows = [("i1", SHA, PDQ, 90, '=HYPERLINK("x")\nsecond line', datetime(2026, 1, 2, tzinfo=UTC))]
    rows.append(("i2", None, "11" * 32, 10, None, datetime(2026, 1, 2, tzinfo=UTC)))  # low quality: left out
    hma = "".join(write_hma((sha, pdq, quality) for _, sha, pdq, quality, _, _ in rows))
    assert hma == f"sha256 {SHA}\npdq {PDQ}\n"
    assert read(hma) == [(SHA, None, None), (None, PDQ, None)]
    table = "".join(write_csv(rows))
    assert table.splitlines()[1] == f'sha256,{SHA},"\'=HYPERLINK(""x"") second line",i1,2026-01-02T00:00:00Z'
    assert [item[:2] for item in read(table, CSV)] == [(SHA, None), (None, PDQ)]
