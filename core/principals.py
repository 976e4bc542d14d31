"""Who is acting and what they may do: a principal (a key, the CLI or the machine), its role and its permissions.

A leaf module: core.auth makes principals from keys, core.audit records what they did, core.review checks what
they may do; none of them needs the others for this.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.tables import Role

MAX_NAME_CHARS = 128


class Permission(StrEnum):
    """What a route needs. Roles are sets of these (ROLE_PERMISSIONS)."""

    SUBMIT = "jobs:submit"  # POST /v1/jobs
    READ = "jobs:read"  # jobs, decisions, policies, thumbnails and the dashboard views of them
    REVIEW = "review:work"  # the review queue: list, claim, resolve
    REOPEN = "review:reopen"  # appeals: reopen a resolved item
    AUDIT = "audit:read"
    BANKS = "banks:edit"  # hash banks: list them, add, read and delete items
    BANKS_CREATE = "banks:create"  # create a bank; import and export hash lists (admin)
    EXAMPLES = "examples:edit"  # example sets: list them, add, read and delete items
    EXAMPLES_CREATE = "examples:create"  # create and delete an example set (admin)
    ERASE = "jobs:erase"  # DELETE /v1/jobs/{id}: submit keys only their own jobs (core/erasure.py checks)
    WEBHOOKS = "webhooks:manage"  # the webhook signing secret and the delivery log
    QUOTAS = "quotas:manage"  # tenant quotas: read one's own; set anyone's from the quota admin tenant (api/quotas.py)
    LABELS = "labels:export"  # the tenant's labelled jobs and their images, for training elsewhere (admin)


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.SUBMIT: frozenset({Permission.SUBMIT, Permission.READ, Permission.ERASE}),
    Role.REVIEW: frozenset({Permission.READ, Permission.REVIEW, Permission.BANKS, Permission.EXAMPLES}),
    Role.ADMIN: frozenset(Permission),
}


@dataclass(frozen=True)
class Principal:
    """Who is acting: a key (or the CLI, or the machine), its role and its tenant."""

    name: str
    role: Role
    tenant: str
    key_id: str | None = None
    via: str = "header"  # "header", "session" (dashboard cookie), "cli", "system", "auth-off"
    csrf_token: str | None = None  # the dashboard session's, when via == "session"

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]


def system_principal(tenant: str) -> Principal:
    """The machine itself (the worker putting a decision in the review queue)."""
    return Principal(name="modtag (machine decision)", role=Role.ADMIN, tenant=tenant, via="system")


def cli_principal(tenant: str) -> Principal:
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return Principal(name=f"cli:{user}"[:MAX_NAME_CHARS], role=Role.ADMIN, tenant=tenant, via="cli")
