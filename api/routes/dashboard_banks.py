"""The dashboard's Banks pages: the tenant's hash banks, a bank's items with a Remove button, and a hash list
import (a CSV or HMA's signal file, read by core/hashexchange.py exactly as `POST /v1/banks/{name}/import` reads it).

Roles as the API's: review and admin see banks and remove items; importing a list is for admins. Every button
is a form POST with the session's CSRF token (the import's is in its multipart body, checked before a line of
the file is read), answered with a redirect back and a notice; an import that is refused (malformed lines,
too large) shows its message on the page instead, so the line numbers are not lost.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api.auth import BankCreator, BankEditor, check_csrf
from api.bodies import MULTIPART_SLACK_BYTES, BodyLimits, form_text, open_body, refuse_unknown_fields
from api.deps import SessionDep, SettingsDep, new_session
from api.pages import render
from core import banks
from core.errors import InvalidField, ModtagError, PayloadTooLarge
from core.hashexchange import ExchangeFormat, HashList, read_hash_list
from core.principals import Permission, Principal
from core.public import BankItemPublic, BankPublic
from core.settings import Settings

router = APIRouter(prefix="/dashboard/banks", tags=["dashboard"], include_in_schema=False)

PAGE_ITEMS = 100
NOTICES = {
    "item_removed": "Removed: images like it stop matching at once.",
    "imported": "Imported.",
    "bank_item_not_found": "That item is not in this bank (removed already?).",
}


@router.get("", response_class=HTMLResponse)
def banks_page(request: Request, session: SessionDep, principal: BankEditor) -> Response:
    """The tenant's banks: kind, description and how many items each holds."""
    rows = [_page(BankPublic.from_row(bank, count)) for bank, count in banks.list_banks(session, principal.tenant)]
    return render(request, "banks.html", principal, banks=rows)


@router.get("/{name}", response_class=HTMLResponse)
def bank_page(
    request: Request,
    name: str,
    session: SessionDep,
    principal: BankEditor,
    before: Annotated[str | None, Query(max_length=64)] = None,
    notice: Annotated[str | None, Query(max_length=64)] = None,
    added: Annotated[int | None, Query(ge=0, le=banks.MAX_IMPORT_ITEMS)] = None,
    skipped: Annotated[int | None, Query(ge=0, le=banks.MAX_IMPORT_ITEMS)] = None,
) -> Response:
    """One bank: its items newest first, each with a Remove button, and the import form (admins)."""
    return _bank_page(request, session, principal, name, before, _notice(notice, added, skipped))


@router.post("/{name}/items/{item_id}/delete", response_class=RedirectResponse)
def remove_item(
    name: str,
    item_id: str,
    session: SessionDep,
    principal: BankEditor,
    csrf_token: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    """The Remove button of an item (audited as `bank.item_delete`)."""
    check_csrf(principal, csrf_token)
    bank = banks.get_bank(session, principal.tenant, name)
    try:
        banks.delete_item(session, principal, bank, item_id)
        code = "item_removed"
    except ModtagError as exc:
        code = exc.code
    return RedirectResponse(f"/dashboard/banks/{bank.name}?notice={code}", status_code=303)


@router.post("/{name}/import", response_class=HTMLResponse)
async def import_list(
    request: Request, name: str, settings: SettingsDep, principal: BankCreator
) -> Response:  # fmt: skip
    """The import form: a hash list file (CSV or HMA's signal file); hashes the bank holds are skipped."""
    cap = settings.bank_import_max_bytes
    too_large = f"the hash list is over {cap} bytes (MODTAG_BANK_IMPORT_MAX_BYTES): split it and import the parts"
    limits = BodyLimits(
        multipart_cap=cap + MULTIPART_SLACK_BYTES,
        multipart_too_large=("bank_import_too_large", too_large),
        max_files=1,
        max_fields=3,
        json_cap=0,
        json_too_large=too_large,
        expected="the page's import form (multipart/form-data)",
    )

    async def from_form(form: FormData) -> tuple[HashList, ExchangeFormat]:
        refuse_unknown_fields(form, frozenset({"file", "format", "csrf_token"}))
        check_csrf(principal, form_text(form, "csrf_token"))
        chosen = form_text(form, "format") or ExchangeFormat.CSV.value
        if chosen not in {item.value for item in ExchangeFormat}:
            raise InvalidField("choose the file's format: csv or hma", code="invalid_field")
        upload = form.get("file")
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise InvalidField("choose a file to import", code="file_missing")
        if (upload.size or 0) > cap:
            raise PayloadTooLarge(too_large, code="bank_import_too_large")
        await upload.seek(0)
        return await run_in_threadpool(read_hash_list, upload.file, ExchangeFormat(chosen)), ExchangeFormat(chosen)

    try:
        async with open_body(request, limits, from_form=from_form, from_json=_no_json) as (found, fmt):
            added, skipped = await run_in_threadpool(_import, settings, principal, name, found, fmt)
    except ModtagError as exc:
        if exc.code in ("csrf_invalid", "bank_not_found", "busy"):
            raise
        return await run_in_threadpool(_refused_import, request, settings, principal, name, exc)
    return RedirectResponse(f"/dashboard/banks/{name}?notice=imported&added={added}&skipped={skipped}", status_code=303)


# --- helpers ---------------------------------------------------------------------------------------


def _bank_page(
    request: Request,
    session: Any,
    principal: Principal,
    name: str,
    before: str | None,
    notice: str | None,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    bank = banks.get_bank(session, principal.tenant, name)
    items, next_cursor = banks.list_items(session, bank, limit=PAGE_ITEMS, before=before)
    counts = dict((row.name, count) for row, count in banks.list_banks(session, principal.tenant))
    return render(
        request,
        "bank.html",
        principal,
        bank=_page(BankPublic.from_row(bank, counts.get(bank.name, 0))),
        items=[_page(BankItemPublic.from_row(item, bank.name)) for item in items],
        next_cursor=next_cursor,
        notice=notice,
        error=error,
        can_import=principal.can(Permission.BANKS_CREATE),
        max_import_bytes=request.app.state.settings.bank_import_max_bytes,
        status_code=status,
    )


def _import(
    settings: Settings, principal: Principal, name: str, found: HashList, fmt: ExchangeFormat
) -> tuple[int, int]:
    with new_session(settings) as session:
        bank = banks.get_bank(session, principal.tenant, name)
        source = {"format": fmt.value, "unsupported": dict(found.unsupported), "via": "dashboard"}
        rows, skipped = banks.import_items(session, principal, bank, found.items, source=source)
    return len(rows), skipped


def _refused_import(
    request: Request, settings: Settings, principal: Principal, name: str, exc: ModtagError
) -> Response:
    with new_session(settings) as session:
        message = exc.message[:1].upper() + exc.message[1:]
        return _bank_page(request, session, principal, name, None, None, error=message, status=exc.http_status)


def _no_json(_: dict[str, Any]) -> tuple[HashList, ExchangeFormat]:
    raise InvalidField("import through the page's form (a file)", code="invalid_field")


def _notice(code: str | None, added: int | None, skipped: int | None) -> str | None:
    if code == "imported" and added is not None:
        return f"Imported: {added} hash{'es' if added != 1 else ''} added, {skipped or 0} the bank already held."
    return NOTICES.get(code or "")


def _page(shape: Any) -> dict[str, Any]:
    return dict(shape.model_dump(mode="json"))
