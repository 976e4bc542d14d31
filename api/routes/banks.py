"""Hash banks: `/v1/banks`, `/v1/banks/{name}/items[/{id}]` and `/v1/banks/{name}/import|export`, the tenant's lists
of known images (core/banks.py), exchanged in HMA's format or as CSV (core/hashexchange.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api.auth import BankCreator, BankEditor
from api.bodies import (
    MULTIPART_SLACK_BYTES,
    BodyLimits,
    form_text,
    open_body,
    read_body,
    read_upload,
    refuse_unknown_fields,
    validate_body,
)
from api.deps import SessionDep, SettingsDep, new_session
from api.errors import error_responses
from api.schemas import BankImportRequest, BankItemRequest, BankRequest
from core import banks
from core.banks import NewBankItem
from core.errors import InvalidField, PayloadTooLarge
from core.hashes import image_hashes, parse_pdq, parse_sha256
from core.hashexchange import ExchangeFormat, HashList, SignalType, read_hash_list, write_csv, write_hma
from core.images import ImageLimits, decode_image
from core.principals import Principal
from core.public import BankImport, BankItemPublic, BankList, BankPublic
from core.settings import Settings

router = APIRouter(prefix="/v1/banks", tags=["banks"])

BankName = Annotated[str, Path(max_length=64, description="The bank's name.")]
ItemId = Annotated[str, Path(max_length=64)]
FormatParam = Annotated[
    ExchangeFormat, Query(description="`hma`: HMA's signal file, `<signal_type> <signal>` per line; `csv`: a CSV.")
]
SignalTypeParam = Annotated[SignalType | None, Query(description="The type of lines that give a hash alone.")]
_NOTE_CHARS = 2000
_EXPORT_CHUNK = 64 * 1024
_ITEM_BODY = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "The image to bank (both hashes)."},
                "note": {"type": "string"},
            },
        }
    },
    "application/json": {"schema": BankItemRequest.model_json_schema()},
}


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=BankPublic, responses=error_responses(401, 403, 409, 422)
)
def create_bank(body: BankRequest, session: SessionDep, principal: BankCreator) -> BankPublic:
    """Create an empty hash bank in the caller's tenant (role admin)."""
    return BankPublic.from_row(banks.create_bank(session, principal, body.name, body.description, body.kind), 0)


@router.get("", response_model=BankList, responses=error_responses(401, 403))
def read_banks(session: SessionDep, principal: BankEditor) -> BankList:
    """The tenant's banks with their item counts (roles admin, review)."""
    return BankList(
        data=[BankPublic.from_row(bank, count) for bank, count in banks.list_banks(session, principal.tenant)]
    )


async def read_bank_item(request: Request, settings: SettingsDep) -> NewBankItem:
    """The item off the wire: a multipart `image` (hashed here) or JSON `{"pdq"}` / `{"sha256"}`."""
    limits = BodyLimits(
        multipart_cap=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        multipart_too_large=("image_too_large", f"the image is over {settings.max_upload_bytes} bytes"),
        max_files=1,
        max_fields=4,
        json_cap=MULTIPART_SLACK_BYTES,
        json_too_large="the JSON body is too large for one item; use POST /v1/banks/{name}/import",
        expected='multipart/form-data with an `image` file, or application/json with "pdq" or "sha256"',
    )

    async def from_form(form: FormData) -> NewBankItem:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise InvalidField("the `image` file is missing: send it as multipart field `image`", code="image_missing")
        data = await read_upload(image, settings.max_upload_bytes, "the image")
        note = _note(form_text(form, "note"))
        return await run_in_threadpool(_hashed_item, data, settings, note)

    def from_json(document: dict[str, Any]) -> NewBankItem:
        return _item(validate_body(BankItemRequest, document))

    return await read_body(request, limits, from_form=from_form, from_json=from_json)


@router.post(
    "/{name}/items",
    status_code=status.HTTP_201_CREATED,
    response_model=BankItemPublic,
    openapi_extra={"requestBody": {"required": True, "content": _ITEM_BODY}},
    responses=error_responses(400, 401, 403, 404, 413, 415, 422),
)
def add_bank_item(
    name: BankName,
    principal: BankEditor,  # before the body: a caller who may not add is refused unread
    item: Annotated[NewBankItem, Depends(read_bank_item)],
    session: SessionDep,
) -> BankItemPublic:
    """Bank a known image: upload it, or give its PDQ hash or SHA-256 (roles admin, review)."""
    bank = banks.get_bank(session, principal.tenant, name)
    (row,) = banks.add_items(session, principal, bank, [item])
    return BankItemPublic.from_row(row, bank.name)


_IMPORT_BODY = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary", "description": "The hash list."}},
        }
    },
    "application/json": {"schema": BankImportRequest.model_json_schema()},
}


@router.post(
    "/{name}/import",
    status_code=status.HTTP_201_CREATED,
    response_model=BankImport,
    openapi_extra={"requestBody": {"required": True, "content": _IMPORT_BODY}},
    responses=error_responses(400, 401, 403, 404, 413, 415, 422),
)
async def import_bank_items(
    request: Request,
    name: BankName,
    principal: BankCreator,  # before the body: a caller who may not import is refused unread
    settings: SettingsDep,
    format: FormatParam = ExchangeFormat.HMA,
    signal_type: SignalTypeParam = None,
) -> BankImport:
    """Add a hash list (a multipart `file` in HMA's format or CSV, or JSON `items`); hashes the bank already holds
    are skipped and counted (role admin)."""
    cap = settings.bank_import_max_bytes
    limits = BodyLimits(
        multipart_cap=cap + MULTIPART_SLACK_BYTES,
        multipart_too_large=(
            "bank_import_too_large",
            f"the hash list is over {cap} bytes (MODTAG_BANK_IMPORT_MAX_BYTES)",
        ),
        max_files=1,
        max_fields=1,
        json_cap=cap,
        json_too_large=f"the JSON body is over {cap} bytes (MODTAG_BANK_IMPORT_MAX_BYTES)",
        expected="multipart/form-data with a `file` (the hash list), or application/json with `items`",
    )

    async def from_form(form: FormData) -> HashList:
        refuse_unknown_fields(form, frozenset({"file"}))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidField(
                "the `file` is missing: send the hash list as multipart field `file`", code="file_missing"
            )
        if (upload.size or 0) > cap:
            raise PayloadTooLarge(
                f"the hash list is over {cap} bytes (MODTAG_BANK_IMPORT_MAX_BYTES)", code="bank_import_too_large"
            )
        await upload.seek(0)
        return await run_in_threadpool(read_hash_list, upload.file, format, signal_type)

    def from_json(document: dict[str, Any]) -> HashList:
        return HashList(items=[_item(entry) for entry in validate_body(BankImportRequest, document).items])

    await run_in_threadpool(_existing_bank, settings, principal, name)  # 404 before a byte of the list is read
    async with open_body(request, limits, from_form=from_form, from_json=from_json) as found:
        return await run_in_threadpool(_import, settings, principal, name, found, format)


@router.get(
    "/{name}/export",
    response_class=StreamingResponse,
    responses={
        **error_responses(401, 403, 404, 422),
        200: {"content": {"text/plain": {}, "text/csv": {}}, "description": "The bank's hashes."},
    },
)
def export_bank_items(
    name: BankName,
    session: SessionDep,
    settings: SettingsDep,
    principal: BankCreator,
    format: FormatParam = ExchangeFormat.HMA,
) -> StreamingResponse:
    """The bank's hashes as a file another system imports: HMA's signal file by default, or CSV (role admin)."""
    bank = banks.get_bank(session, principal.tenant, name)
    rows = banks.export_items(settings.resolved_database_url, bank)
    lines: Iterator[str]
    if format is ExchangeFormat.CSV:
        lines, media_type, suffix = write_csv(rows), "text/csv; charset=utf-8", "csv"
    else:
        lines = write_hma((sha256, pdq, quality) for _, sha256, pdq, quality, _, _ in rows)
        media_type, suffix = "text/plain; charset=utf-8", "txt"
    return StreamingResponse(
        _chunks(lines),
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{bank.name}.{suffix}"'},
    )


@router.get("/{name}/items/{item_id}", response_model=BankItemPublic, responses=error_responses(401, 403, 404, 422))
def read_bank_item_route(name: BankName, item_id: ItemId, session: SessionDep, principal: BankEditor) -> BankItemPublic:
    """One item of a bank (roles admin, review)."""
    bank = banks.get_bank(session, principal.tenant, name)
    return BankItemPublic.from_row(banks.get_item(session, bank, item_id), bank.name)


@router.delete(
    "/{name}/items/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404, 422),
)
def delete_bank_item(name: BankName, item_id: ItemId, session: SessionDep, principal: BankEditor) -> Response:
    """Remove an item: images like it stop matching at once (roles admin, review)."""
    bank = banks.get_bank(session, principal.tenant, name)
    banks.delete_item(session, principal, bank, item_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _existing_bank(settings: Settings, principal: Principal, name: str) -> None:
    with new_session(settings) as session:
        banks.get_bank(session, principal.tenant, name)


def _chunks(lines: Iterator[str]) -> Iterator[bytes]:
    """The lines in pieces of about _EXPORT_CHUNK bytes: one write (and one thread hop) per piece, not per line."""
    piece: list[str] = []
    size = 0
    for line in lines:
        piece.append(line)
        size += len(line)
        if size >= _EXPORT_CHUNK:
            yield "".join(piece).encode()
            piece, size = [], 0
    if piece:
        yield "".join(piece).encode()


def _import(settings: Settings, principal: Principal, name: str, found: HashList, fmt: ExchangeFormat) -> BankImport:
    with new_session(settings) as session:
        bank = banks.get_bank(session, principal.tenant, name)
        source = {"format": fmt.value, "unsupported": dict(found.unsupported)}
        rows, skipped = banks.import_items(session, principal, bank, found.items, source=source)
    return BankImport(bank=bank.name, added=len(rows), skipped=skipped, unsupported=dict(found.unsupported))


def _item(body: BankItemRequest) -> NewBankItem:
    if body.pdq is None and body.sha256 is None:
        raise InvalidField('an item needs "pdq" or "sha256" (64 hex digits)', code="bank_item_empty")
    return NewBankItem(
        sha256=parse_sha256(body.sha256) if body.sha256 is not None else None,
        pdq=parse_pdq(body.pdq) if body.pdq is not None else None,
        note=body.note,
    )


def _hashed_item(data: bytes, settings: Settings, note: str | None) -> NewBankItem:
    hashes = image_hashes(data, decode_image(data, ImageLimits.from_settings(settings)))
    return NewBankItem(sha256=hashes.sha256, pdq=hashes.pdq, pdq_quality=hashes.pdq_quality, note=note)


def _note(note: str | None) -> str | None:
    if note is not None and len(note) > _NOTE_CHARS:
        raise InvalidField(f"`note` is at most {_NOTE_CHARS} characters", code="invalid_field")
    return note
