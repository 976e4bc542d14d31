"""The review queue, keys and the 0002 migration through core code, on SQLite and PostgreSQL.

Claim leases of a fraction of a second run out against the `now` a test passes, never by waiting for the
wall clock (the API takes its lease from MODTAG_REVIEW_CLAIM_LEASE_S); `modtag keys` runs in-process against the
same databases.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import col, select

from core import review
from core.auth import authenticate, create_key, hash_key
from core.db import alembic_config, get_engine, session_scope
from core.errors import AuthError, Conflict, NotFound
from core.jobs import claim_job, store_decision
from core.principals import Principal, cli_principal
from core.public import ReviewItemPublic
from core.settings import get_settings
from core.tables import ApiKey, AuditEntry, Decision, ReviewItem, Role, utcnow
from modtag.cli import main
from tests.support.jobs import decided_url_job

pytestmark = pytest.mark.timeout(60)

CATEGORIES = {
    "weapons": {"score": 0.66, "action": "review", "fired": True},
    "drugs": {"score": 0.71, "action": "review", "fired": True},
    "nudity": {"score": 0.95, "action": "allow", "fired": False},  # a high score whose action is allow
}


def reviewer(name: str, tenant: str = "default") -> Principal:
    return Principal(name=name, role=Role.REVIEW, tenant=tenant, key_id=f"{name:0<32}"[:32])


def decided(database_url: str, action: str = "review", tenant: str = "default") -> str:
    return decided_url_job(database_url, action, categories=CATEGORIES, tenant=tenant)


def test_a_review_decision_enters_the_queue_once(database_url: str) -> None:
    job_id = decided(database_url)
    allowed = decided(database_url, "allow")
    with session_scope(database_url) as session:
        item = session.get(ReviewItem, job_id)
        assert item is not None and item.state == "open" and item.tenant == "default"
        assert (item.category, item.score) == ("drugs", 0.71)  # the top flagged category, not the allowed one
        assert session.get(ReviewItem, allowed) is None
        # A redelivered task stores nothing twice: not the decision, not the queue item, not the audit entry.
        job = claim_job(session, job_id, "worker-2", 0)  # the job is done: nobody can claim it
        assert job is None
        from core.tables import Job

        done = session.get(Job, job_id)
        assert done is not None
        again = store_decision(session, done, Decision(job_id=job_id, action="block", policy="m", policy_version="v"))
        assert again.action == "review"
        entries = session.exec(select(AuditEntry).where(AuditEntry.target_id == job_id)).all()
        assert [entry.action for entry in entries] == ["review.enqueued"]


def test_claim_lease_expires_and_the_item_returns(database_url: str) -> None:
    job_id = decided(database_url)
    alice, bob = reviewer("alice"), reviewer("bob")
    claimed_at = utcnow()
    later = claimed_at + timedelta(seconds=0.7)  # past alice's lease, without waiting for it
    with session_scope(database_url) as session:
        review.claim(session, job_id, alice, lease_s=0.5, now=claimed_at)
        with pytest.raises(Conflict) as refused:
            review.claim(session, job_id, bob, lease_s=60)
        assert refused.value.code == "review_claimed" and "alice" in refused.value.message
        with pytest.raises(Conflict):
            review.resolve(session, job_id, bob, "allow", "mine now?")
        listed, _ = review.list_queue(session, tenant="default")
        shown = next(ReviewItemPublic.from_row(item) for item, _ in listed if item.job_id == job_id)
        assert shown.claim is not None and shown.claim.by.name == "alice"
    with session_scope(database_url) as session:
        listed, _ = review.list_queue(session, tenant="default")
        shown = next(ReviewItemPublic.from_row(item, now=later) for item, _ in listed if item.job_id == job_id)
        assert shown.claim is None  # an expired claim is shown as none: the item is back in the queue
        taken = review.claim(session, job_id, bob, lease_s=60, now=later)
        assert taken.claimed_by == bob.key_id
        with pytest.raises(Conflict):
            review.resolve(session, job_id, alice, "block", "too late", now=later)
        done = review.resolve(session, job_id, bob, "allow", "a toy", now=later)
        assert done.resolution == "allow" and done.resolved_by_name == "bob" and done.claimed_by is None


def test_a_claim_is_released_early_by_its_holder_or_an_admin(database_url: str) -> None:
    job_id = decided(database_url)
    alice, bob = reviewer("alice"), reviewer("bob")
    admin = Principal(name="root", role=Role.ADMIN, tenant="default", key_id=f"{'root':0<32}")
    with session_scope(database_url) as session:
        with pytest.raises(Conflict) as refused:
            review.release(session, job_id, alice)  # nothing claimed yet
        assert refused.value.code == "review_not_claimed" and "nothing to release" in refused.value.message
        review.claim(session, job_id, alice, lease_s=600)
        with pytest.raises(Conflict) as refused:
            review.release(session, job_id, bob)
        assert refused.value.code == "review_claimed"
        assert "alice" in refused.value.message and "only they or an admin" in refused.value.message
        released = review.release(session, job_id, alice)
        assert released.claimed_by is None and released.claim_expires_at is None and released.state == "open"
        with pytest.raises(Conflict) as refused:
            review.release(session, job_id, alice)  # released once: there is nothing left to release
        assert refused.value.code == "review_not_claimed"
        # Long before alice's lease would have run out, bob can take the item; an admin can free it again.
        assert review.claim(session, job_id, bob, lease_s=600).claimed_by == bob.key_id
        assert review.release(session, job_id, admin).claimed_by is None
        entries = session.exec(
            select(AuditEntry)
            .where(AuditEntry.target_id == job_id, AuditEntry.action == "review.released")
            .order_by(col(AuditEntry.id))
        ).all()
    assert [(entry.actor_name, entry.actor_role) for entry in entries] == [("alice", "review"), ("root", "admin")]
    assert entries[0].before is not None and entries[0].before["claim"]["by"]["name"] == "alice"
    assert entries[1].before is not None and entries[1].before["claim"]["by"]["name"] == "bob"
    assert all(entry.after is not None and entry.after["claim"] is None for entry in entries)


def test_release_refuses_expired_resolved_and_foreign_items(database_url: str) -> None:
    job_id = decided(database_url)
    alice = reviewer("alice")
    claimed_at = utcnow()
    with session_scope(database_url) as session:
        review.claim(session, job_id, alice, lease_s=0.2, now=claimed_at)
    with session_scope(database_url) as session:
        with pytest.raises(Conflict) as refused:
            # The lease ran out: the item is already back in the queue.
            review.release(session, job_id, alice, now=claimed_at + timedelta(seconds=0.4))
        assert refused.value.code == "review_not_claimed"
        with pytest.raises(NotFound):
            review.release(session, job_id, reviewer("alice", tenant="other"))
        with pytest.raises(NotFound):
            review.release(session, "' OR 1=1 --", alice)
        review.claim(session, job_id, alice, lease_s=600)
        review.resolve(session, job_id, alice, "block", "a rifle")
        with pytest.raises(Conflict) as refused:
            review.release(session, job_id, alice)
        assert refused.value.code == "review_resolved"
        actions = session.exec(select(AuditEntry.action).where(AuditEntry.target_id == job_id)).all()
    assert "review.released" not in actions  # a refused release leaves no trace


def test_unclaimed_items_can_be_resolved_directly_and_only_once(database_url: str) -> None:
    job_id = decided(database_url)
    with session_scope(database_url) as session:
        review.resolve(session, job_id, reviewer("carol"), "block", "obvious")
        with pytest.raises(Conflict) as refused:
            review.resolve(session, job_id, reviewer("dave"), "allow", "no")
        assert refused.value.code == "review_resolved"
        with pytest.raises(NotFound):
            review.claim(session, job_id, reviewer("carol", tenant="other"), 60)
        with pytest.raises(NotFound):
            review.claim(session, "' OR 1=1 --", reviewer("carol"), 60)


def test_queue_stats_count_open_items_and_their_age(database_url: str) -> None:
    first = decided(database_url)
    decided(database_url, tenant="other")
    with session_scope(database_url) as session:
        stats = review.queue_stats(session)
        assert stats.open == 2 and stats.oldest_queued_at is not None
        review.resolve(session, first, reviewer("erin"), "allow", "fine")
        assert review.queue_stats(session).open == 1


def test_migration_0002_queues_existing_review_decisions(database_url: str) -> None:
    """A database at 0001 with decisions in it: upgrading queues the `review` ones, downgrading drops the tables."""
    from alembic import command

    config = alembic_config(database_url)
    command.downgrade(config, "0001")
    with get_engine(database_url).begin() as connection:
        connection.execute(text("DELETE FROM decision_categories"))
        connection.execute(text("DELETE FROM decisions"))
        connection.execute(text("DELETE FROM jobs"))
        for job_id, action in (("j1", "review"), ("j2", "block"), ("j3", "review")):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, tenant, status, policy, source, attempts, created_at, updated_at) "
                    "VALUES (:id, 't1', 'done', 'moderation', 'url', 1, :now, :now)"
                ),
                {"id": job_id, "now": "2026-01-01 00:00:00"},
            )
            connection.execute(
                text(
                    "INSERT INTO decisions (id, job_id, tenant, action, policy, policy_version, categories, evidence, "
                    "tags, models, duration_ms, decided_at) VALUES (:id, :job, 't1', :action, 'moderation', 'v', "
                    ":categories, '[]', '[]', '{}', 1.0, :now)"
                ),
                {"id": "d" + job_id, "job": job_id, "action": action, "categories": json.dumps(CATEGORIES),
                 "now": "2026-01-01 00:00:00"},
            )  # fmt: skip
            for name, result in CATEGORIES.items():
                connection.execute(
                    text(
                        "INSERT INTO decision_categories (decision_id, category, score, action, fired) "
                        "VALUES (:decision, :category, :score, :action, :fired)"
                    ),
                    {"decision": "d" + job_id, "category": name, **result},
                )
    command.upgrade(config, "head")
    with session_scope(database_url) as session:
        items = {item.job_id: item for item in session.exec(select(ReviewItem)).all()}
        assert set(items) == {"j1", "j3"}
        assert items["j1"].tenant == "t1" and items["j1"].category == "drugs" and items["j1"].score == 0.71
        assert items["j1"].state == "open" and items["j1"].decision_id == "dj1"
    command.downgrade(config, "0001")
    with get_engine(database_url).connect() as connection:
        tables = set(get_engine(database_url).dialect.get_table_names(connection))
    assert "review_items" not in tables and "api_keys" not in tables and "jobs" in tables
    command.upgrade(config, "head")


# -- keys ------------------------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_authenticate(database_url: str) -> None:
    with session_scope(database_url) as session:
        row, secret = create_key(session, role="submit", tenant="acme", name="uploader", actor=cli_principal("acme"))
        assert secret.startswith("mtk_") and len(secret) > 50
        assert row.key_hash == hash_key(secret) and secret not in row.model_dump_json()
        assert row.prefix == secret[:16]
        assert authenticate(session, secret).id == row.id
        for bad in ("", secret + "x", secret[:-1], "k" * 257, "mtk_\x00", "ключ" * 10, " " + secret):
            with pytest.raises(AuthError) as refused:
                authenticate(session, bad)
            assert refused.value.code == "auth_invalid" and refused.value.http_status == 401
        with pytest.raises(Exception, match="role"):
            create_key(session, role="root", tenant="acme", name="x", actor=cli_principal("acme"))
        for tenant in ("Acme", "a b", "x'; DROP TABLE jobs;--", "", "a" * 65, "ü"):
            with pytest.raises(Exception, match="tenant"):
                create_key(session, role="admin", tenant=tenant, name="x", actor=cli_principal("acme"))


@pytest.fixture
def cli_database(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    monkeypatch.setenv("MODTAG_DATABASE_URL", database_url)
    monkeypatch.setenv("MODTAG_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    return database_url


def test_keys_cli_create_list_revoke(cli_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--role", "review", "--tenant", "acme", "--name", "Ana (reviewer)"]) == 0
    out = capsys.readouterr().out
    secret = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("key: "))
    assert "only time" in out
    with session_scope(cli_database) as session:
        row = authenticate(session, secret)
        assert (row.role, row.tenant, row.name) == ("review", "acme", "Ana (reviewer)")

    assert main(["keys", "list", "--json"]) == 0
    listing = capsys.readouterr().out
    assert secret not in listing and hash_key(secret) not in listing
    (shown,) = [key for key in json.loads(listing) if key["id"] == row.id]
    assert shown["prefix"] == row.prefix and shown["revoked_at"] is None
    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert row.prefix in table and "Ana (reviewer)" in table and secret not in table

    assert main(["keys", "revoke", row.id]) == 0
    assert "revoked review key" in capsys.readouterr().out
    with session_scope(cli_database) as session, pytest.raises(AuthError) as refused:
        authenticate(session, secret)
    assert refused.value.code == "auth_revoked"
    assert main(["keys", "revoke", row.id]) == 0  # idempotent
    capsys.readouterr()
    with session_scope(cli_database) as session:
        entries = session.exec(select(AuditEntry).where(AuditEntry.target_id == row.id)).all()
        assert [entry.action for entry in entries] == ["key.created", "key.revoked"]
        assert all(entry.actor_name.startswith("cli:") and entry.tenant == "acme" for entry in entries)


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "--role", "root", "--tenant", "acme"],
        ["keys", "create", "--role", "", "--tenant", "acme"],
        ["keys", "create", "--role", "admin; DROP TABLE api_keys", "--tenant", "acme"],
        ["keys", "create", "--tenant", "acme"],
        ["keys", "create", "--role", "admin"],
        ["keys", "revoke"],
        ["keys"],
    ],
)
def test_keys_cli_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: modtag" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "code"),
    [
        (["keys", "create", "--role", "admin", "--tenant", "Bad Tenant"], 2, "tenant_invalid"),
        (["keys", "create", "--role", "admin", "--tenant", "x'; DROP TABLE jobs;--"], 2, "tenant_invalid"),
        (["keys", "create", "--role", "admin", "--tenant", "acme", "--name", "a\x00b"], 2, "key_name_invalid"),
        (["keys", "create", "--role", "admin", "--tenant", "acme", "--name", "n" * 200], 2, "key_name_invalid"),
        (["keys", "list", "--tenant", "%"], 2, "tenant_invalid"),
        (["keys", "revoke", "0123456789abcdef0123456789abcdef"], 3, "key_not_found"),
        (["keys", "revoke", "' OR 1=1 --"], 3, "key_not_found"),
    ],
)
def test_keys_cli_refuses_bad_values(
    cli_database: str, capsys: pytest.CaptureFixture[str], argv: list[str], status: int, code: str
) -> None:
    assert main(argv) == status
    assert f"[{code}]" in capsys.readouterr().err
    with session_scope(cli_database) as session:
        assert session.exec(select(ApiKey)).all() == []
