"""Image hashes and PDQ matching: near copies of real photos within the distance, distinct photos far apart, the
index agreeing with a brute-force scan, and hash banks on a real database (SQLite) through core.banks."""

from __future__ import annotations

import hashlib
import io
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session

from core.banks import BankMatcher, NewBankItem, add_items, create_bank, delete_item
from core.db import get_engine, migrate
from core.errors import Conflict, InvalidField
from core.hashes import DEFAULT_MAX_DISTANCE, PDQ_MIN_QUALITY, image_hashes, parse_pdq, pdq_distance, pdq_hash
from core.pdqindex import PdqIndex
from core.principals import Principal
from core.tables import Role
from tests.support.photos import NAMES, photo_bytes, photo_image


def near_copy(image: Image.Image) -> Image.Image:
    """Resized to 90 % and re-encoded as JPEG at quality 70, as a re-upload would be."""
    buffer = io.BytesIO()
    image.resize((int(image.width * 0.9), int(image.height * 0.9))).save(buffer, format="JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def pdqs() -> dict[str, tuple[str, int]]:
    return {name: pdq_hash(photo_image(name)) for name in NAMES}


def test_near_copies_match_and_distinct_photos_do_not(pdqs: dict[str, tuple[str, int]]) -> None:
    for name, (pdq, quality) in pdqs.items():
        assert quality >= PDQ_MIN_QUALITY, name
        copy, _ = pdq_hash(near_copy(photo_image(name)))
        assert pdq_distance(pdq, copy) <= DEFAULT_MAX_DISTANCE, name
    for (a, (pdq_a, _)), (b, (pdq_b, _)) in combinations(pdqs.items(), 2):
        assert pdq_distance(pdq_a, pdq_b) > DEFAULT_MAX_DISTANCE * 2, (a, b)


def test_hashes_of_an_upload() -> None:
    data = photo_bytes("coffee")
    hashes = image_hashes(data, photo_image("coffee"))
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert len(hashes.pdq) == 64 and hashes.pdq_matchable
    flat = image_hashes(b"x", Image.new("RGB", (200, 200), (128, 128, 128)))
    assert not flat.pdq_matchable  # a flat image's hash says nothing: it never matches by PDQ


def test_parse_pdq_refuses_what_is_not_256_bits() -> None:
    assert parse_pdq(" " + "AB" * 32 + "\n") == "ab" * 32
    with pytest.raises(InvalidField) as refused:
        parse_pdq("ab" * 31)
    assert refused.value.code == "pdq_invalid"


@pytest.mark.parametrize("size", [100, 6000])  # a full scan below 4096 hashes, multi-index hashing above
def test_index_finds_what_a_full_scan_finds(size: int) -> None:
    rng = np.random.default_rng(size)
    raw = rng.integers(0, 256, size=(size, 32), dtype=np.uint8)
    index = PdqIndex([row.tobytes().hex() for row in raw])
    bits = np.unpackbits(raw, axis=1)
    for flips in (0, 1, 15, 16, 17, 24, 31, 32, 40, 128):
        target = int(rng.integers(0, size))
        query_bits = bits[target].copy()
        query_bits[rng.choice(256, size=flips, replace=False)] ^= 1
        query = np.packbits(query_bits).tobytes().hex()
        distances = (bits != query_bits).sum(axis=1)
        best = int(distances.min())
        found = index.nearest(query, DEFAULT_MAX_DISTANCE)
        if best <= DEFAULT_MAX_DISTANCE:
            assert found is not None and found.distance == best and distances[found.position] == best, flips
        else:
            assert found is None, flips
    assert PdqIndex([]).nearest("00" * 32, 31) is None


def test_banks_match_per_tenant_and_follow_changes(tmp_path: Path, pdqs: dict[str, tuple[str, int]]) -> None:
    url = f"sqlite:///{tmp_path / 'banks.db'}"
    migrate(url)
    acme = Principal(name="acme admin", role=Role.ADMIN, tenant="acme", key_id="k1")
    matcher = BankMatcher()
    copy = image_hashes(b"copy bytes", near_copy(photo_image("rocket")))
    with Session(get_engine(url), expire_on_commit=False) as session:
        bank = create_bank(session, acme, "known_bad", None)
        with pytest.raises(Conflict):
            create_bank(session, acme, "known_bad", None)
        [item] = add_items(session, acme, bank, [NewBankItem(pdq=pdqs["rocket"][0], pdq_quality=pdqs["rocket"][1])])
        match = matcher.lookup(session, "acme", [("known_bad", 31)], copy)["known_bad"]
        assert match.item == item.id and match.by == "pdq" and 0 < (match.distance or 0) <= 31
        assert matcher.lookup(session, "globex", [("known_bad", 31)], copy)["known_bad"].item is None
        assert matcher.lookup(session, "acme", [("known_bad", 0)], copy)["known_bad"].item is None
        session.refresh(bank)
        delete_item(session, acme, bank, item.id)
        session.refresh(bank)
        assert matcher.lookup(session, "acme", [("known_bad", 31)], copy)["known_bad"].item is None  # rebuilt
        [exact] = add_items(session, acme, bank, [NewBankItem(sha256=copy.sha256)])
        match = matcher.lookup(session, "acme", [("known_bad", 31)], copy)["known_bad"]
        assert (match.item, match.distance, match.by) == (exact.id, 0, "sha256")


def test_banks_bench_reports_what_it_measured() -> None:
    from modtag.bench.banks import format_banks_report, run_banks_bench

    report = run_banks_bench(5000, queries=20, repeat=1)
    assert report["bank_size"] == 5000 and report["correct"] == report["queries"] == 20
    assert report["index_bytes"] > 5000 * 32 and report["lookup_ms_per_image"] > 0
    assert "PDQ bank of 5,000 hashes" in format_banks_report(report)
