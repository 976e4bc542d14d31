"""`modtag quotas list|show|set|delete`: tenants' submission quotas through the API (`/v1/quotas`, admin keys).

`set` changes only the limits it names: it reads the tenant's override, replaces those fields and writes the
whole override back (the API's PUT replaces it), so `--rate 5` keeps a daily cap set earlier. A value is a number,
`unlimited` (no limit, whatever the settings say) or `default` (the field leaves the override: the setting applies).
The API checks the numbers' ranges; this module only reads what was typed.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:
    from modtag.client import ApiClient, Reply

FIELDS: Final = ("rate", "burst", "bulk_rate", "bulk_burst", "daily_cap")
UNLIMITED: Final = "unlimited"
DEFAULT: Final = "default"


class QuotaRefused(RuntimeError):
    """The API refused a quota call: its sentence and code."""


def limit_value(text: str) -> float | int | str:
    """An argparse type: a finite number that is not negative (an int when whole), `unlimited` or `default`."""
    word = text.strip().lower()
    if word in (UNLIMITED, DEFAULT):
        return word
    try:
        number = float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number, {UNLIMITED!r} or {DEFAULT!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: a limit is a finite number, 0 or more")
    return int(number) if number.is_integer() else number


def changed_override(current: dict[str, Any] | None, changes: dict[str, float | int | str]) -> dict[str, Any]:
    """The override to PUT: `current` with each named field set (`unlimited`: null) or removed (`default`)."""
    override = dict(current or {})
    for name, value in changes.items():
        if value == DEFAULT:
            override.pop(name, None)
        else:
            override[name] = None if value == UNLIMITED else value
    return override


def read_quota(client: ApiClient, tenant: str) -> dict[str, Any]:
    return _body(client.quota(tenant))


def list_quotas(client: ApiClient) -> dict[str, Any]:
    return _body(client.quotas())


def set_quota(client: ApiClient, tenant: str, changes: dict[str, float | int | str]) -> dict[str, Any]:
    """Read the override, change the named fields, write it back; the tenant's quota as the API answers it."""
    current = read_quota(client, tenant)["override"]
    return _body(client.put_quota(tenant, changed_override(current, changes)))


def delete_quota(client: ApiClient, tenant: str) -> dict[str, Any]:
    return _body(client.delete_quota(tenant))


def write_quota(quota: dict[str, Any], out: TextIO) -> None:
    """One tenant: each limit in force, and whether its override or the setting sets it."""
    override = quota.get("override") or {}
    print(
        f"tenant {quota['tenant']}" + (f" (set by {quota['updated_by']})" if quota.get("updated_by") else ""), file=out
    )
    for name in FIELDS:
        source = "override" if name in override else "setting"
        print(f"  {name:<11} {_shown(quota['limits'][name]):>12}  ({source})", file=out)


def write_page(page: dict[str, Any], out: TextIO) -> None:
    """The settings' defaults, then each override."""
    print("defaults (MODTAG_TENANT_*): " + _fields(page["defaults"]), file=out)
    for quota in page["data"]:
        print(f"{quota['tenant']}: " + _fields(quota["override"] or {}), file=out)
    if not page["data"]:
        print("no tenant has an override", file=out)


def _fields(limits: dict[str, Any]) -> str:
    return ", ".join(f"{name} {_shown(limits[name])}" for name in FIELDS if name in limits) or "-"


def _shown(value: Any) -> str:
    return UNLIMITED if value is None else str(value)


def _body(reply: Reply) -> dict[str, Any]:
    if reply.status != 200:
        raise QuotaRefused(f"{reply.body.get('detail', 'refused')} ({reply.body.get('code', reply.status)})")
    return reply.body
