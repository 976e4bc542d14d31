"""`modtag listing check`: submit a listing's photos with its text to an API, wait for the verdict, print it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from core.errors import InvalidField, ModtagError
from modtag.client import ApiClient


def parse_attributes(pairs: Sequence[str]) -> dict[str, str]:
    """`color=red` pairs as a mapping; InvalidField for a pair without `=` or with an empty name."""
    attributes: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise InvalidField(f"--attr {pair!r}: write NAME=VALUE, for example --attr color=red", code="invalid_field")
        attributes[name] = value.strip()
    return attributes


def check_listing(
    client: ApiClient,
    files: Sequence[Path],
    *,
    title: str,
    description: str | None,
    attributes: dict[str, str],
    policy: str = "listing",
    timeout_s: float = 600,
) -> dict[str, Any]:
    """POST the listing, then poll it until its verdict is final (or the timeout passes: `verdict.status` pending)."""
    reply = client.submit_listing(files, title=title, description=description, attributes=attributes, policy=policy)
    if not reply.accepted:
        hint = " Pass a key with --api-key or MODTAG_API_KEY." if reply.auth_refused else ""
        raise ModtagError(
            f"the API refused the listing ({reply.status}): {reply.body.get('detail')}{hint}",
            code=str(reply.body.get("code") or "listing_refused"),
        )
    if reply.body.get("verdict", {}).get("status") != "pending":
        return reply.body
    return client.wait_listing(str(reply.body["id"]), timeout_s=timeout_s)


def print_listing(listing: dict[str, Any], files: Sequence[Path], out: TextIO) -> None:
    """The verdict and its findings, then one line per photo."""
    verdict = listing.get("verdict", {})
    status = verdict.get("status")
    headline = (verdict.get("action") or status or "?").upper() if status != "pending" else "PENDING (timed out)"
    out.write(
        f"listing {listing.get('id')}: {headline}  (policy {listing.get('policy')} {listing.get('policy_version')})\n"
    )
    for finding in verdict.get("findings", []):
        out.write(f"  - {finding}\n")
    if verdict.get("matches_description") is True:
        out.write("  - some photo matches the description\n")
    out.write("\n")
    rows = [("PHOTO", "IMAGE", "RESULT", "FIRED", "CAPTION / ERROR")]
    for photo in listing.get("photos", []):
        index = int(photo.get("index", 0))
        name = files[index - 1].name if 0 < index <= len(files) else "?"
        decision = photo.get("decision") or {}
        fired = ", ".join(n for n, r in (decision.get("categories") or {}).items() if r.get("fired")) or "-"
        error = photo.get("error") or {}
        detail = f"{error.get('message')} ({error.get('code')})" if error else str(decision.get("caption") or "")
        rows.append((str(index), name, str(decision.get("action") or photo.get("status")), fired, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.write("  ".join([*(row[i].ljust(widths[i]) for i in range(4)), row[4]]).rstrip() + "\n")
    tags = verdict.get("tags") or []
    if tags:
        shown = ", ".join(f"{t['tag']} ({t['group']}, {t['score']:.2f})" for t in tags[:12])
        out.write(f"\ntags: {shown}\n")


def listing_failed(listing: dict[str, Any]) -> bool:
    """True when a photo could not be checked or the verdict did not arrive in time."""
    verdict = listing.get("verdict", {})
    return verdict.get("status") != "done" or bool(verdict.get("photos", {}).get("failed"))
