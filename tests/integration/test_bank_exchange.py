"""Hash exchange with HMA over real HTTP (SQLite and PostgreSQL): a bank exported in HMA's format imports into a
fresh bank with the same hashes; imports skip what is held, refuse malformed, hostile and huge files whole; the
HMA-shaped lookup; allow-list banks; `modtag banks export|import` through the CLI."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.hashes import pdq_hash
from modtag.cli import main
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.photos import photo_bytes, photo_image

pytestmark = pytest.mark.timeout(120)
IMPORT_CAP = 64 * 1024
PDQ_A = "f" * 16 + "0" * 48
PDQ_B = "0f" * 32


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"bank_import_max_bytes": IMPORT_CAP}


def client_as(api: Api, role: str, tenant: str = "default") -> ApiClient:
    return ApiClient(api.base_url, key=admin_key(api.db_url, role=role, tenant=tenant, name=f"{tenant} {role}"))


def upload(client: ApiClient, bank: str, content: bytes, **params: str) -> httpx.Response:
    return client.post(f"/v1/banks/{bank}/import", params=params, files={"file": ("list.txt", content, "text/plain")})


def exported(client: ApiClient, bank: str, fmt: str = "hma") -> str:
    response = client.get(f"/v1/banks/{bank}/export", params={"format": fmt})
    assert response.status_code == 200, response.text
    return response.text


def test_an_hma_export_imports_into_a_fresh_bank_with_the_same_hashes(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("partner-list").status == 201
    sha = hashlib.sha256(b"a file we removed").hexdigest()
    for body in ({"pdq": PDQ_A, "note": "from a partner"}, {"sha256": sha}):
        assert admin.post("/v1/banks/partner-list/items", json=body).status_code == 201
    photo = admin.post("/v1/banks/partner-list/items", files={"image": ("c.jpg", photo_bytes("coffee"))}).json()

    text = exported(admin, "partner-list")
    lines = sorted(text.splitlines())
    assert lines == sorted([f"pdq {PDQ_A}", f"sha256 {sha}", f"pdq {photo['pdq']}", f"sha256 {photo['sha256']}"]), text
    response = admin.get("/v1/banks/partner-list/export")
    assert response.headers["content-type"].startswith("text/plain")
    assert 'filename="partner-list.txt"' in response.headers["content-disposition"]

    assert admin.create_bank("copy").status == 201
    answer = upload(admin, "copy", text.encode())
    assert answer.status_code == 201, answer.text
    assert answer.json() == {"bank": "copy", "added": 4, "skipped": 0, "unsupported": {}}
    assert sorted(exported(admin, "copy").splitlines()) == lines
    # Again: everything is already there.
    assert upload(admin, "copy", text.encode()).json() == {"bank": "copy", "added": 0, "skipped": 4, "unsupported": {}}

    # The CSV for people carries the notes and the item ids, and imports the same way.
    table = exported(admin, "partner-list", "csv")
    assert table.splitlines()[0] == "signal_type,signal,note,id,added_at"
    assert f"pdq,{PDQ_A},from a partner," in table
    assert admin.create_bank("from-csv").status == 201
    assert upload(admin, "from-csv", table.encode(), format="csv").json()["added"] == 4
    assert sorted(exported(admin, "from-csv").splitlines()) == lines

    audit = admin.get("/v1/audit", params={"action": "bank.import"}).json()["data"]
    assert [(e["after"]["bank"], e["after"]["format"], e["after"]["added"]) for e in audit] == [
        ("from-csv", "csv", 4),
        ("copy", "hma", 0),
        ("copy", "hma", 4),
    ]


def test_hma_dumps_with_other_signal_types_bare_hashes_and_comments(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("dump").status == 201
    dump = (
        "\ufeff# exported from HMA\r\n"
        f"PDQ {PDQ_B.upper()}\r\n"
        "video_md5 d41d8cd98f00b204e9800998ecf8427e\r\n"
        "\r\n"
        f"video_sha256 {'ab' * 32}\r\n"
    ).encode()
    answer = upload(admin, "dump", dump)
    assert answer.status_code == 201, answer.text
    assert answer.json() == {"bank": "dump", "added": 2, "skipped": 0, "unsupported": {"video_md5": 1}}
    assert sorted(exported(admin, "dump").splitlines()) == [f"pdq {PDQ_B}", f"sha256 {'ab' * 32}"]
    # A bare hash takes `signal_type`, as HMA's file exchange takes its default type.
    bare = f"{1:064x}\n{2:064x}\n".encode()
    assert_error(upload(admin, "dump", bare), 422, "bank_import_malformed")
    assert upload(admin, "dump", bare, signal_type="pdq").json()["added"] == 2
    assert_error(upload(admin, "dump", bare, signal_type="md5"), 422, "invalid_field")
    # threatexchange's `dataset -P --csv` columns.
    table = f"collab,signal_type,signal_str,category,tags\nSample,pdq,{3:064x},POSITIVE_CLASS,a b\n".encode()
    assert upload(admin, "dump", table, format="csv").json()["added"] == 1


def test_malformed_hostile_and_huge_lists_are_refused_whole(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("strict").status == 201
    broken = f"pdq {PDQ_A}\npdq not-a-hash\nsha256 {'a' * 63}\npdq\n".encode()
    error = assert_error(upload(admin, "strict", broken), 422, "bank_import_malformed")
    assert "line 2: 'not-a-hash' is not a pdq hash" in error["detail"]
    assert "line 3:" in error["detail"] and "line 4:" in error["detail"]
    assert "nothing was added" in error["detail"]
    # Binary garbage, a NUL-laden line, a line far too long, a hostile signal type name.
    for hostile in (os.urandom(4096), b"pdq \x00" * 10 + b"\n", b"pdq " + b"a" * 10_000 + b"\n", b"<script> x\n"):
        assert_error(upload(admin, "strict", hostile), 422, "bank_import_malformed")
    assert upload(admin, "strict", broken, format="xml").status_code == 422
    # Over the cap: refused while it arrives, whatever Content-Length said.
    huge = b"".join(f"pdq {index:064x}\n".encode() for index in range(IMPORT_CAP // 68 + 10))
    assert_error(upload(admin, "strict", huge), 413, "bank_import_too_large")
    assert_error(admin.post("/v1/banks/strict/import", files={"other": ("x", b"x")}), 422, "unknown_field")
    assert_error(
        admin.post("/v1/banks/strict/import", content=b"pdq x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    [strict] = [bank for bank in admin.get("/v1/banks").json()["data"] if bank["name"] == "strict"]
    assert strict["items"] == 0


def test_who_may_exchange_and_look_up(api: Api) -> None:
    admin = api.client
    assert admin.create_bank("shared", kind="block").status == 201
    assert admin.create_bank("ours", kind="allow").status == 201
    assert_error(admin.post("/v1/banks", json={"name": "odd", "kind": "maybe"}), 422, "invalid_field")
    kinds = {bank["name"]: bank["kind"] for bank in admin.get("/v1/banks").json()["data"]}
    assert (kinds["shared"], kinds["ours"]) == ("block", "allow")
    pdq, _ = pdq_hash(photo_image("rocket"))
    near = f"{int(pdq, 16) ^ 0b1011:064x}"  # three bits away
    assert upload(admin, "shared", f"pdq {pdq}\n".encode()).status_code == 201

    with client_as(api, "review") as reviewer, client_as(api, "submit") as submitter:
        assert_error(upload(reviewer, "shared", b""), 403, "forbidden")
        assert_error(reviewer.get("/v1/banks/shared/export"), 403, "forbidden")
        found = submitter.get("/v1/lookup", params={"signal_type": "pdq", "signal": near})
        assert found.status_code == 200, found.text
        [match] = found.json()["matches"]
        assert (match["bank"], match["kind"], match["signal_type"], match["distance"]) == ("shared", "block", "pdq", 3)
        assert match["allowed_by"] is None
        assert submitter.get("/v1/lookup", params={"signal_type": "pdq", "signal": near, "max_distance": 2}).json() == {
            "matches": []
        }
    with client_as(api, "admin", "globex") as other:
        assert other.get("/v1/lookup", params={"signal_type": "pdq", "signal": near}).json() == {"matches": []}
        assert_error(other.get("/v1/banks/shared/export"), 404, "bank_not_found")
        assert_error(upload(other, "shared", f"pdq {pdq}\n".encode()), 404, "bank_not_found")

    # On the allow-list too: the block bank's match is reported, suppressed.
    assert upload(admin, "ours", f"pdq {pdq}\n".encode()).status_code == 201
    matches = admin.get("/v1/lookup", params={"signal_type": "pdq", "signal": near}).json()["matches"]
    assert [(m["bank"], m["kind"]) for m in matches] == [("ours", "allow"), ("shared", "block")]
    assert matches[1]["allowed_by"] == f"ours/{matches[0]['content_id']}"
    sha = hashlib.sha256(b"x").hexdigest()
    assert upload(admin, "shared", f"sha256 {sha}\n".encode()).status_code == 201
    [exact] = admin.get("/v1/lookup", params={"signal_type": "video_sha256", "signal": sha.upper()}).json()["matches"]
    assert (exact["bank"], exact["distance"], exact["signal_type"]) == ("shared", 0, "sha256")
    assert_error(admin.get("/v1/lookup", params={"signal_type": "md5", "signal": sha}), 422, "invalid_field")
    assert_error(admin.get("/v1/lookup", params={"signal_type": "pdq", "signal": "zz"}), 422, "invalid_field")
    assert admin.get("/v1/lookup", params={"signal_type": "pdq"}).status_code == 422


def test_cli_exports_and_imports_a_bank(api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert api.client.create_bank("source").status == 201
    hashes = [f"{index:064x}" for index in range(500, 530)]
    assert upload(api.client, "source", "".join(f"pdq {h}\n" for h in hashes).encode()).status_code == 201
    stack = ["--api", api.base_url, "--api-key", api.key]
    out = tmp_path / "source.txt"
    assert main(["banks", "export", "source", "--out", str(out), *stack]) == 0
    assert sorted(out.read_text().split()) == sorted(["pdq"] * 30 + hashes)
    assert not (tmp_path / "source.txt.partial").exists()
    args = ["banks", "import", "safe", str(out), "--create", "--bank-kind", "allow", "--no-progress", *stack]
    assert main(args) == 0
    assert "bank safe: 30 hashes added, 0 skipped" in capsys.readouterr().out
    [safe] = [bank for bank in api.client.get("/v1/banks").json()["data"] if bank["name"] == "safe"]
    assert (safe["kind"], safe["items"]) == ("allow", 30)
    assert main(["banks", "export", "missing", "--out", str(tmp_path / "x.txt"), *stack]) == 3
    assert "bank_not_found" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "x.txt.partial").exists()
