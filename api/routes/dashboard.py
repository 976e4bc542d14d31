"""The dashboard: server-rendered pages (flagged content, review queue, job detail, summary, audit, webhook deliveries).

No JavaScript is needed: every button is a form POST carrying the session's CSRF token, answered with
a redirect back to the page (post/redirect/get). Pages are tenant-scoped like the API they mirror.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urljoin

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlmodel import Session, col, select

from api import sso
from api.auth import (
    SESSION_COOKIE,
    Auditor,
    ExampleEditor,
    Reader,
    Reopener,
    Reviewer,
    WebhookAdmin,
    check_csrf,
    cookie_is_secure,
    end_session,
    session_principal,
    start_session,
)
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.errors import error_response
from api.failures import client_address, refuse_repeated_failure
from api.labels import form_labels
from api.pages import GREYSCALE_COOKIE, render
from api.routes.examples import similar_jobs
from api.schemas import SLUG_PATTERN
from core import banks, examples, resolutions, review, webhooks
from core.audit import list_entries
from core.auth import authenticate
from core.errors import AuthError, ModtagError, TooManyFailures
from core.jobs import decode_cursor, get_decision, list_decisions, tenant_job
from core.metrics import AUTH_FAILURES
from core.principals import Permission, Principal
from core.public import AuditEntryPublic, DecisionPublic, ReviewItemPublic, ReviewQueueEntry, WebhookDeliveryPublic
from core.sso import PREFIX as SSO_PREFIX
from core.stats import category_counts, flag_rates, reused_count
from core.tables import ID_PATTERN, ApiKey, Decision, Job, ReviewState, as_utc, iso, utcnow
from core.videobanks import bank_frames

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)

LOGIN_CSRF_COOKIE = "modtag_login_csrf"
DEFAULT_PAGE = "/dashboard/flagged"
BLOCK_AND_BANK = "block_and_bank"  # the resolve form's third button
GREYSCALE_COOKIE_MAX_AGE_S = 365 * 24 * 3600
_NEXT = re.compile(r"^/dashboard(/[A-Za-z0-9_/-]*)?(\?[A-Za-z0-9_=&%.:+-]*)?$")
_SLUG = re.compile(SLUG_PATTERN)
DELIVERIES_PER_PAGE = 50
TEXT_FILTER_MAX = 200  # characters of the Flagged page's text search; a longer one is refused (422 invalid_field)
_RANGES = {"24h": (timedelta(hours=24), timedelta(hours=1)), "7d": (timedelta(days=7), timedelta(days=1)),
           "30d": (timedelta(days=30), timedelta(days=1))}  # fmt: skip
# Messages shown after a form POST. Only these codes are shown: the query string never carries text.
SIMILAR_STRIP = 12  # similar images on a job's page
NOTICES = {
    "claimed": "Claimed: the item is yours until the lease runs out.",
    "released": "Released: the item is back in the queue for anyone to claim.",
    "resolved": "Resolved: your decision is stored beside the machine's.",
    "reopened": "Reopened: the item is back in the queue.",
    "example_added": "Added to the example set: examples checks vote with it once its embedding is stored.",
    "example_exists": "This image is already in that example set; delete it there to relabel it.",
    "example_set_not_found": "That example set does not exist (any more); create it with POST /v1/example-sets.",
    "example_label_invalid": "Choose positive or negative.",
    "job_erased": "This job's image was erased: it cannot be an example.",
    "review_claimed": "Someone else has claimed this item; pick another one.",
    "review_resolved": "This item was already resolved.",
    "review_not_found": "That item is not in your review queue.",
    "review_not_resolved": "That item is not resolved, so it cannot be reopened.",
    "review_not_claimed": "That item is not claimed (or the claim ran out), so there is nothing to release.",
    "reason_missing": "Give a reason: it is kept with the resolution.",
    "reason_invalid": "The reason is too long (at most 2000 characters).",
    "resolution_invalid": "Choose allow or block.",
    "resolved_banked": "Blocked, and the image's hashes added to the bank: copies are blocked before the models run.",
    "bank_not_found": "That bank does not exist (any more); choose another.",
    "bank_is_allow_list": "That bank is an allow-list; choose a block bank.",
    "job_not_hashed": "This image has no hashes yet, so it cannot be banked; block it, and bank it once it has.",
    "video_not_judged": "This video's frames have not been judged yet, so they cannot be banked.",
    "unknown_category": "A ticked category is not one of this decision's policy; reload the page and try again.",
    "invalid_field": "The form could not be read (too many labels?); reload the page and try again.",
    "redelivered": "Queued for redelivery: the workers send it again within seconds, with the same webhook-id.",
    "delivery_erased": "That webhook's job or listing was erased: there is nothing left to send.",
    "delivery_not_found": "No such webhook delivery.",
    "banked": "Banked: copies of these frames are blocked before the models run.",
    "not_a_video": "This job is an image: bank it with Block and add to bank.",
}

Flagged = Literal["flagged", "review", "block", "allow", "all"]


@dataclass(frozen=True)
class ButtonForm:
    """What every review button posts besides its own fields: the session's CSRF token and the page to go back to."""

    csrf_token: str
    next: str


def button_form(
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=1024)] = "/dashboard/review",
) -> ButtonForm:
    return ButtonForm(csrf_token=csrf_token, next=next)


ButtonDep = Annotated[ButtonForm, Depends(button_form)]


@router.get("", response_class=RedirectResponse)
def dashboard_home() -> RedirectResponse:
    """The flagged-content page."""
    return RedirectResponse(DEFAULT_PAGE, status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, next: str = DEFAULT_PAGE) -> Response:
    """The sign-in form (paste an API key)."""
    return login_page(request, settings, next_path=safe_next(next))


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    services: ServicesDep,
    key: Annotated[str, Form(max_length=4096)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=1024)] = DEFAULT_PAGE,
) -> Response:
    """Check the key, start a session (HttpOnly, SameSite=Strict cookie) and go to `next`."""
    next_path = safe_next(next)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf_token.encode()):
        return login_page(request, settings, next_path, "The form expired; sign in again.", status=403)
    try:
        row = authenticate(session, key.strip())
    except AuthError as exc:
        AUTH_FAILURES.labels(code=exc.code).inc()
        try:
            refuse_repeated_failure(services.redis, client_address(request), key.strip(), settings)
        except TooManyFailures as refused:
            page = login_page(request, settings, next_path, refused.message, status=429)
            page.headers["Retry-After"] = str(refused.retry_after_s)
            return page
        return login_page(request, settings, next_path, exc.message, status=401)
    token, _ = start_session(session, row, settings)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.session_ttl_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=cookie_is_secure(request, settings),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/dashboard/login")
    return response


@router.post("/logout", response_class=RedirectResponse)
def logout(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: Annotated[str, Form(max_length=256)] = "",
) -> Response:
    """End the session and forget the cookie; a single sign-on session goes on to the provider to end its own."""
    token = request.cookies.get(SESSION_COOKIE)
    signed_out = "/dashboard/login"
    provider_url: str | None = None
    if token:
        # An expired or revoked sign-in needs no CSRF check: forgetting the cookie is all that is left to do.
        with contextlib.suppress(AuthError):
            principal = session_principal(session, token)
            check_csrf(principal, csrf_token)
            key = session.get(ApiKey, principal.key_id) if principal.key_id else None
            if key is not None and key.prefix.startswith(SSO_PREFIX) and settings.oidc_issuer:
                # Otherwise the provider's own session signs the person straight back in at the next button press.
                after = urljoin(settings.oidc_redirect_url or str(request.url_for("login_form")), "/dashboard/login")
                provider_url = sso.end_session_url(settings, after)
        end_session(session, token)
    # To the provider by a page that moves on by itself, not a redirect: the dashboard's CSP (`form-action 'self'`)
    # stops a browser from following a form's redirect to another origin.
    response: Response = (
        render(request, "signed_out.html", None, provider_url=provider_url)
        if provider_url
        else RedirectResponse(signed_out, status_code=303)
    )
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/preferences", response_class=RedirectResponse)
def preferences(
    request: Request,
    settings: SettingsDep,
    principal: Reader,
    form: ButtonDep,
    greyscale: Annotated[Literal["on", "off"], Form()] = "on",
) -> Response:
    """The greyscale switch: remembered in a cookie for this browser (a year), shown on every page."""
    check_csrf(principal, form.csrf_token)
    response = RedirectResponse(safe_next(form.next), status_code=303)
    if greyscale == "on":
        response.set_cookie(
            GREYSCALE_COOKIE,
            "1",
            max_age=GREYSCALE_COOKIE_MAX_AGE_S,
            path="/dashboard",
            httponly=True,
            samesite="strict",
            secure=cookie_is_secure(request, settings),
        )
    else:
        response.delete_cookie(GREYSCALE_COOKIE, path="/dashboard")
    return response


@router.get("/flagged", response_class=HTMLResponse)
def flagged_page(
    request: Request,
    session: SessionDep,
    principal: Reader,
    action: Flagged = "flagged",
    policy: Annotated[str | None, Query(max_length=64)] = None,
    category: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    text: Annotated[str | None, Query(max_length=TEXT_FILTER_MAX)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """Flagged content: thumbnails, captions and scores; filter by policy, category, action, time and text read."""
    clean_policy, clean_category = _slug_or_none(policy), _slug_or_none(category)
    clean_text = (text or "").strip() or None
    since_at, until_at = _parse_time(since), _parse_time(until)
    decisions, next_cursor = list_decisions(
        session,
        tenant=principal.tenant,
        action=action if action in ("review", "block", "allow") else None,
        flagged=action == "flagged",
        policy=clean_policy,
        category=clean_category,
        since=since_at,
        until=until_at,
        text=clean_text,
        limit=30,
        cursor=_decision_cursor(cursor),
    )
    job_ids = [decision.job_id for decision in decisions]
    items = review.items_for(session, job_ids)
    sources = _sources(session, job_ids)
    rows = [
        {
            **_page(DecisionPublic.from_row(decision)),
            "review": _page(ReviewItemPublic.from_row(items[decision.job_id])) if decision.job_id in items else None,
            **sources.get(decision.job_id, {"source": None, "erased": False}),
        }
        for decision in decisions
    ]
    return render(
        request,
        "flagged.html",
        principal,
        rows=rows,
        filters={
            "action": action,
            "policy": clean_policy or "",
            "category": clean_category or "",
            "since": since if since_at else "",
            "until": until if until_at else "",
            "text": clean_text or "",
        },
        text_max=TEXT_FILTER_MAX,
        next_cursor=next_cursor,
    )


@router.get("/review", response_class=HTMLResponse)
def review_page(
    request: Request,
    session: SessionDep,
    principal: Reviewer,
    state: Literal["open", "resolved"] = "open",
    order: review.Order = "oldest",
    policy: Annotated[str | None, Query(max_length=64)] = None,
    category: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    notice: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The review queue, with claim / release / allow / block buttons (and reopen for admins)."""
    try:
        items, next_cursor = review.list_queue(
            session,
            tenant=principal.tenant,
            state=ReviewState(state),
            order=order,
            policy=_slug_or_none(policy),
            category=_slug_or_none(category),
            limit=30,
            cursor=cursor,
        )
    except ModtagError:  # a stale cursor from another ordering: start from the top
        items, next_cursor = review.list_queue(session, tenant=principal.tenant, state=ReviewState(state), order=order)
    now = utcnow()
    me = review.claimant_id(principal)
    sources = _sources(session, [item.job_id for item, _ in items])
    rows = [
        {
            **_page(ReviewQueueEntry.from_rows(item, decision, now=now)),
            "mine": item.claimed_by == me,
            **sources.get(item.job_id, {"source": None, "erased": False}),
        }
        for item, decision in items
    ]
    return render(
        request,
        "review.html",
        principal,
        rows=rows,
        filters={"state": state, "order": order, "policy": policy or "", "category": category or ""},
        next_cursor=next_cursor,
        notice=NOTICES.get(notice or ""),
        can_reopen=principal.can(Permission.REOPEN),
        bank_choices=_block_banks(session, principal),
        here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


@router.post("/review/{job_id}/claim", response_class=RedirectResponse)
def claim_button(
    job_id: str, session: SessionDep, settings: SettingsDep, principal: Reviewer, form: ButtonDep
) -> Response:
    """The Claim button."""
    return _press(
        principal, form, lambda: review.claim(session, job_id, principal, settings.review_claim_lease_s), "claimed"
    )


@router.post("/review/{job_id}/release", response_class=RedirectResponse)
def release_button(job_id: str, session: SessionDep, principal: Reviewer, form: ButtonDep) -> Response:
    """The Release button (the holder's; admins see it on anyone's claim)."""
    return _press(principal, form, lambda: review.release(session, job_id, principal), "released")


@router.post("/review/{job_id}/resolve", response_class=RedirectResponse)
def resolve_button(
    job_id: str,
    session: SessionDep,
    principal: Reviewer,
    form: ButtonDep,
    action: Annotated[str, Form(max_length=16)] = "",
    reason: Annotated[str, Form(max_length=4000)] = "",
    label: Annotated[list[str] | None, Form()] = None,
    shown: Annotated[list[str] | None, Form()] = None,
    bank: Annotated[str | None, Form(max_length=64)] = None,
) -> Response:
    """The Allow and Block buttons, with the ticked categories as labels (none ticked: the action's labels), and
    "Block and add to bank": a block that banks the image's hashes in the chosen bank too (core/resolutions.py)."""
    banked = action == BLOCK_AND_BANK

    def resolve() -> object:
        labels = form_labels(session, job_id, principal.tenant, label or [], shown or [])
        return resolutions.resolve(
            session, job_id, principal, "block" if banked else action, reason, labels=labels,
            add_to_bank=(bank or "") if banked else None,
        )  # fmt: skip

    return _press(principal, form, resolve, "resolved_banked" if banked else "resolved")


@router.post("/review/{job_id}/bank-frames", response_class=RedirectResponse)
def bank_frames_button(
    job_id: str,
    session: SessionDep,
    principal: Reviewer,
    form: ButtonDep,
    bank: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """The "Bank these frames" button of a video: its fired frames' PDQ hashes into one of the tenant's banks."""
    return _press(principal, form, lambda: bank_frames(session, principal, job_id, bank.strip(), None, None), "banked")


@router.post("/review/{job_id}/reopen", response_class=RedirectResponse)
def reopen_button(
    job_id: str,
    session: SessionDep,
    principal: Reopener,
    form: ButtonDep,
    reason: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """The Reopen button (admins)."""
    return _press(principal, form, lambda: review.reopen(session, job_id, principal, reason), "reopened")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    request: Request,
    job_id: str,
    session: SessionDep,
    principal: Reader,
    notice: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """One job: the image, the decision with the evidence of every check, and the human review."""
    job = tenant_job(session, job_id, principal.tenant)
    decision = get_decision(session, job.id)
    item = review.get_item(session, job.id, principal.tenant)
    history: list[dict[str, Any]] = []
    if principal.can(Permission.AUDIT):
        entries, _ = list_entries(session, tenant=principal.tenant, target_id=job.id, limit=100)
        history = [_page(AuditEntryPublic.from_row(entry)) for entry in entries]
    return render(
        request,
        "job.html",
        principal,
        job=job,
        created_at=iso(job.created_at),
        decision=_page(DecisionPublic.from_row(decision)) if decision else None,
        evidence=_evidence_by_category(decision) if decision else {},
        item=_page(ReviewItemPublic.from_row(item)) if item else None,
        mine=item is not None and item.claimed_by == review.claimant_id(principal),
        history=history,
        notice=NOTICES.get(notice or ""),
        can_review=principal.can(Permission.REVIEW),
        can_reopen=principal.can(Permission.REOPEN),
        bank_choices=_block_banks(session, principal),
        here=f"/dashboard/jobs/{job.id}",
        can_examples=principal.can(Permission.EXAMPLES),
        example_sets=[s.name for s, _ in examples.list_sets(session, principal.tenant)]
        if principal.can(Permission.EXAMPLES)
        else [],
        similar=[_page(row) for row in similar_jobs(session, job, SIMILAR_STRIP) or []],
    )


@router.post("/jobs/{job_id}/example", response_class=RedirectResponse)
def add_example_button(
    job_id: str,
    session: SessionDep,
    principal: ExampleEditor,
    form: ButtonDep,
    example_set: Annotated[str, Form(alias="set", max_length=64)] = "",
    label: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    """The job page's "Add as example" button: this job's image into one of the tenant's example sets."""

    def add() -> object:
        job = tenant_job(session, job_id, principal.tenant)
        chosen = examples.get_set(session, principal.tenant, example_set.strip())
        return examples.add_item(session, principal, chosen, job, examples.parse_label(label))

    return _press(principal, form, add, "example_added")


@router.get("/summary", response_class=HTMLResponse)
def summary_page(
    request: Request,
    session: SessionDep,
    principal: Reader,
    range: Literal["24h", "7d", "30d"] = "7d",
    policy: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Flag rates over time (review + block share per hour or day), by category, and the review backlog."""
    span, width = _RANGES[range]
    now = utcnow()
    until = _ceil(now, width)
    since = until - span
    policy = _slug_or_none(policy)
    buckets = flag_rates(session, tenant=principal.tenant, since=since, until=until, width=width, policy=policy)
    categories = category_counts(session, tenant=principal.tenant, since=since, until=until, policy=policy)
    total = sum(bucket.total for bucket in buckets)
    flagged = sum(bucket.flagged for bucket in buckets)
    return render(
        request,
        "summary.html",
        principal,
        buckets=buckets,
        width_label="hour" if width < timedelta(days=1) else "day",
        categories=categories,
        total=total,
        flagged=flagged,
        review_counts=review.count_by_resolution(session, principal.tenant),
        reused=reused_count(session, tenant=principal.tenant, since=since, until=until, policy=policy),
        filters={"range": range, "policy": policy or ""},
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    session: SessionDep,
    principal: Auditor,
    action: Annotated[str | None, Query(max_length=64)] = None,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """The audit log: who did what, when, with before and after."""
    clean_action = action if action and re.fullmatch(r"[a-z_]+\.([a-z_]+)?", action) else None
    clean_job = job_id if job_id and ID_PATTERN.match(job_id) else None
    try:
        entries, next_cursor = list_entries(
            session, tenant=principal.tenant, action=clean_action, target_id=clean_job, limit=50, cursor=cursor
        )
    except ModtagError:
        entries, next_cursor = list_entries(session, tenant=principal.tenant, action=clean_action, target_id=clean_job)
    return render(
        request,
        "audit.html",
        principal,
        entries=[_page(AuditEntryPublic.from_row(entry)) for entry in entries],
        filters={"action": action or "", "job_id": job_id or ""},
        next_cursor=next_cursor,
    )


@router.get("/deliveries", response_class=HTMLResponse)
def deliveries_page(
    request: Request,
    session: SessionDep,
    principal: WebhookAdmin,
    status: Literal["", "pending", "delivered", "failed", "dropped"] = "",
    before: Annotated[str | None, Query(max_length=64)] = None,
    notice: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The webhook delivery log: status, attempts, last error, and a Redeliver button (admins)."""
    rows = webhooks.list_deliveries(
        session, principal.tenant, status=status or None, before=_parse_time(before), limit=DELIVERIES_PER_PAGE
    )
    return render(
        request,
        "deliveries.html",
        principal,
        deliveries=[_page(WebhookDeliveryPublic.from_row(row)) for row in rows],
        filters={"status": status},
        next_before=iso(rows[-1].created_at) if len(rows) == DELIVERIES_PER_PAGE else None,
        notice=NOTICES.get(notice or ""),
        here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


@router.post("/deliveries/{delivery_id}/redeliver", response_class=RedirectResponse)
def redeliver_button(delivery_id: str, session: SessionDep, principal: WebhookAdmin, form: ButtonDep) -> Response:
    """The Redeliver button: the same message again, as POST /v1/webhooks/deliveries/{id}/redeliver."""
    return _press(principal, form, lambda: webhooks.redeliver(session, delivery_id, principal), "redelivered")


# --- helpers ---------------------------------------------------------------------------------------


def login_page(
    request: Request, settings: Any, next_path: str, message: str | None = None, *, status: int = 200
) -> Response:
    """The sign-in form with a fresh login CSRF token (double-submit: a cookie and the same value in the form)."""
    token = secrets.token_urlsafe(32)
    sso_name = settings.oidc_display_name if settings.oidc_issuer else None
    response = render(
        request, "login.html", None, next_path=next_path, message=message, csrf_token=token, status_code=status,
        sso_name=sso_name,
    )  # fmt: skip
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=3600,
        path="/dashboard/login",
        httponly=True,
        samesite="strict",
        secure=cookie_is_secure(request, settings),
    )
    return response


def safe_next(value: str) -> str:
    """Only a path inside the dashboard: never another site (`//evil`, `https://...`)."""
    return value if len(value) <= 512 and _NEXT.match(value) else DEFAULT_PAGE


def _press(principal: Principal, form: ButtonForm, change: Callable[[], object], done: str) -> Response:
    """A button's POST: check the CSRF token, make the change, go back to the page with a notice saying how it went."""
    check_csrf(principal, form.csrf_token)
    target = safe_next(form.next)
    try:
        change()
        code = done
    except ModtagError as exc:
        code = exc.code
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}notice={code}", status_code=303)


def refusal(request: Request, exc: ModtagError) -> Response:
    """401/403 as the sign-in form or a 'not allowed' page for a browser on the dashboard, JSON for anyone else."""
    wants_html = request.url.path.startswith("/dashboard") and "text/html" in request.headers.get("accept", "")
    if wants_html and exc.http_status == 401:
        settings = request.app.state.settings
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return login_page(request, settings, safe_next(target), exc.message, status=401)
    if wants_html:
        return render(request, "forbidden.html", None, message=exc.message, status_code=exc.http_status)
    headers = {"WWW-Authenticate": 'Bearer realm="modtag"'} if exc.http_status == 401 else None
    return error_response(exc.http_status, exc.message, exc.code, headers=headers)


def _block_banks(session: Session, principal: Principal) -> list[str]:
    """The banks "Block and add to bank" offers: the tenant's block banks, for a role that may add to banks."""
    if not principal.can(Permission.BANKS):
        return []
    return [bank.name for bank, _ in banks.list_banks(session, principal.tenant) if bank.kind != "allow"]


def _sources(session: Session, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """What a job card's thumbnail needs of each job: its `source` and whether it was `erased`."""
    if not job_ids:
        return {}
    rows = session.exec(select(Job.id, Job.source, Job.erased_at).where(col(Job.id).in_(job_ids))).all()
    return {str(job_id): {"source": str(source), "erased": erased_at is not None} for job_id, source, erased_at in rows}


def _slug_or_none(value: str | None) -> str | None:
    return value if value and _SLUG.match(value) else None


def _parse_time(value: str | None) -> datetime | None:
    """A `datetime-local` input (naive: UTC) or ISO-8601; anything else is ignored."""
    if not value:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def _decision_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        decode_cursor(cursor)
    except ModtagError:
        return None
    return cursor


def _ceil(moment: datetime, width: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    steps = -(-(moment - epoch) // width)
    return epoch + steps * width


def _page(shape: BaseModel) -> dict[str, Any]:
    """A public shape as the templates read it: the JSON the API would send."""
    return shape.model_dump(mode="json")


def _evidence_by_category(decision: Decision) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {name: [] for name in decision.categories}
    for item in decision.evidence:
        grouped.setdefault(str(item.get("category")), []).append(item)
    return grouped
