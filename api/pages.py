"""Rendering the dashboard's Jinja2 templates (autoescaped: captions and context come from outside)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from core.principals import Permission, Principal

TEMPLATES = Path(__file__).parent / "templates"
# The viewer's greyscale choice: a cookie, so it is this browser's (one moderator's) and needs no table.
GREYSCALE_COOKIE = "modtag_greyscale"

_environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: Request, template: str, principal: Principal | None, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """A page, with the signed-in principal, its CSRF token and what its role may see in the navigation."""
    values: dict[str, Any] = {
        "request_path": request.url.path,
        "principal": principal,
        "csrf_token": (principal.csrf_token or "") if principal else "",
        "can": lambda name: principal is not None and principal.can(Permission(name)),
        "greyscale": request.cookies.get(GREYSCALE_COOKIE) == "1",
    }
    page = _environment.get_template(template).render({**values, **context})
    return HTMLResponse(page, status_code=status_code)


def _when(value: str | datetime | None) -> str:
    if value is None:
        return "-"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


_environment.filters["when"] = _when
_environment.filters["percent"] = _percent
_environment.filters["pretty"] = _pretty
