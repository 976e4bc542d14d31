"""deploy/RUNBOOK.md's PostgreSQL backup and restore, run: pg_dump of a migrated database with jobs and decisions
made by core code, pg_restore into a new database, every row identical and the restored database usable.

pg_dump and pg_restore are pgserver's own (PostgreSQL 16, beside its postgres binary): a client older than the
server refuses to dump it, and the system's may be older.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlmodel import SQLModel

from core.auth import create_key
from core.db import get_engine, migrate, schema_revision, session_scope
from core.jobs import NewJob, create_job, fail_job, get_decision, get_job, store_decision
from core.principals import cli_principal
from core.tables import Decision, Role
from tests.support.jobs import claimed_url_job

pytestmark = pytest.mark.timeout(60)

# Tables whose rows the test makes (each must come back non-empty), besides every other table compared.
FILLED = ("jobs", "decisions", "decision_categories", "review_items", "audit_log", "api_keys", "alembic_version")


def test_pg_dump_and_pg_restore_bring_back_every_job_and_decision(
    postgres_url: str, tmp_path: Path, fresh_database: Any
) -> None:
    source = fresh_database("backup_source")
    migrate(source)
    made = fill(source)

    dump = tmp_path / "modtag.dump"
    run(
        "pg_dump",
        "--format=custom",
        "--no-owner",
        "--no-privileges",
        f"--file={dump}",
        f"--dbname={libpq(source)}",
    )
    restored = fresh_database("backup_restored")
    run(
        "pg_restore",
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--single-transaction",
        f"--dbname={libpq(restored)}",
        str(dump),
    )

    before, after = all_rows(source), all_rows(restored)
    assert set(before) == set(after)
    for table in FILLED:
        assert before[table], f"the test made no {table} rows"
    for table, rows in before.items():
        assert after[table] == rows, f"{table} differs after the restore"
    with session_scope(restored) as session:  # read back through core, as the API would
        for job_id, decision_id in made.items():
            job, decision = get_job(session, job_id), get_decision(session, job_id)
            assert job is not None
            assert (decision.id if decision else None) == decision_id, job_id

    # The restored database is modtag's at the same revision, and takes new rows where the old one left off
    # (the audit log's id is a sequence: its position comes with the dump).
    assert schema_revision(restored) == schema_revision(source)
    migrate(restored)  # nothing to do
    last_audit = max(row[0] for row in after["audit_log"])
    decide(restored, "review", image_url="https://x.test/after-restore")
    with session_scope(restored) as session:
        newest = session.exec(text("SELECT max(id) FROM audit_log")).scalar_one()  # type: ignore[call-overload]
        assert newest > last_audit


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[Any]:
    """Makes empty databases on the suite's PostgreSQL server (not the shared modtag_test); drops them after."""
    admin = create_engine(
        libpq(postgres_url).replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return with_database(postgres_url, name)

    yield make
    for name in made:
        get_engine(with_database(postgres_url, name)).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fill(url: str) -> dict[str, str | None]:
    """Jobs in each final and waiting state, made as the API and the worker make them: job id -> decision id."""
    made: dict[str, str | None] = {}
    for action in ("review", "allow", "block"):
        job_id, decision_id = decide(url, action, image_url=f"https://x.test/{action}.jpg")
        made[job_id] = decision_id
    with session_scope(url) as session:
        failed, _ = create_job(
            session,
            NewJob(
                tenant="default", policy="moderation", policy_version="v1", source="url", image_url="https://x.test/f"
            ),
        )
        fail_job(session, failed.id, "image_undecodable", "the image could not be decoded: truncated JPEG")
        waiting, _ = create_job(
            session,
            NewJob(
                tenant="shop-ü",
                policy="listing",
                policy_version="v2",
                source="upload",
                blob_key="ab" * 32,
                image_sha256="ab" * 32,
                context={"title": "Café table — 2 chairs", "attributes": {"color": "red"}},
                idempotency_key="order-42",
            ),
        )
        made[failed.id] = made[waiting.id] = None
        create_key(session, role=Role.REVIEW, tenant="default", name="reviewer", actor=cli_principal("default"))
    return made


def decide(url: str, action: str, *, image_url: str) -> tuple[str, str]:
    with session_scope(url) as session:
        job = claimed_url_job(
            session, tenant="default", policy="moderation", policy_version="v1", image_url=image_url, worker="w1"
        )
        decision = Decision(
            job_id=job.id,
            action=action,
            policy="moderation",
            policy_version="v1",
            caption="a man holding a sign that says “call 555-0100”",
            text=[{"text": "call 555-0100", "score": 0.93, "box": [12, 40, 180, 64]}],
            categories={
                "weapons": {"score": 0.66, "action": action, "fired": action != "allow", "decided_by": "probe"},
                "scam_text": {"score": 0.12, "action": "allow", "fired": False},
            },
            evidence=[{"category": "weapons", "kind": "probe", "text": "is there a gun?", "score": 0.66}],
            tags=[{"tag": "sign", "score": 0.8}],
            models={"vqa": {"weights": "tiny-random", "dtype": "float32", "random": True}},
            duration_ms=123.5,
        )
        stored = store_decision(session, job, decision)
        return job.id, stored.id


def all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every modtag table and alembic_version, in primary-key order."""
    tables = {
        table.name: [column.name for column in table.primary_key.columns] for table in SQLModel.metadata.sorted_tables
    }
    tables["alembic_version"] = ["version_num"]
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with get_engine(url).connect() as connection:
        present = set(connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
        assert set(tables) <= present, set(tables) - present
        for table, key in tables.items():
            order = ", ".join(f'"{column}"' for column in key)
            rows[table] = [tuple(row) for row in connection.execute(text(f'SELECT * FROM "{table}" ORDER BY {order}'))]
    return rows


def run(tool: str, *args: str) -> None:
    result = subprocess.run([str(pg_bin(tool)), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{tool} failed:\n{result.stdout}\n{result.stderr}"


def pg_bin(tool: str) -> Path:
    import pgserver  # type: ignore[import-untyped]

    path = Path(pgserver.__file__).parent / "pginstall" / "bin" / tool
    assert path.is_file(), f"pgserver ships no {tool} at {path}"
    return path


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def libpq(url: str) -> str:
    """The URL as libpq's tools take it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
