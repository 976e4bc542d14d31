"""Shadow decisions, `modtag policy replay` and `modtag policy test` on the worker's code path, in-process: real tiny
random models, a real database (SQLite and PostgreSQL), stored images."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from core.blobs import LocalBlobStore
from core.db import session_scope
from core.jobs import NewJob, create_job
from core.settings import Settings, get_settings
from core.tables import Decision, ShadowDecision
from modtag.cli import main
from policies import builtin_dir, load_policy
from policies.capabilities import Capability
from tests.support.photos import photo_bytes, product_photo
from tests.support.policies import gun_shadow
from worker.families import FAMILIES, Family, LoadedFamily
from worker.families.blip import roles_for
from worker.replay import replay_policy, run_cases
from worker.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(300)

SHADOW = gun_shadow("A candidate that flags anything a little gun-like.")
PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_models_dir: Path) -> Settings:
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / "next.yaml").write_text(SHADOW)
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        models="tiny-random",
        models_cache_dir=tiny_models_dir.parent,
        policies_dir=policies_dir,
        batch_wait_ms=1,
    )


@pytest.fixture
def decided(settings: Settings) -> list[str]:
    """Three moderation jobs decided by the worker runtime, with the shadow beside them."""
    blobs = LocalBlobStore(settings.resolved_blob_dir)
    runtime = WorkerRuntime.from_settings(settings)
    ids = []
    for name in PHOTOS:
        data = photo_bytes(name, size=(96, 64))
        key = blobs.put(data)
        with session_scope(settings.resolved_database_url) as session:
            job, _ = create_job(
                session,
                NewJob(tenant="default", policy="moderation", policy_version=None, source="upload", blob_key=key),
            )
        assert runtime.process(job.id).outcome == "done"
        ids.append(job.id)
    return ids


def moderation_variant(tmp_path: Path, old: str, new: str, name: str = "new.yaml") -> Path:
    text = (builtin_dir() / "moderation.yaml").read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


class CountingEngines:
    """The real model families (loaded through the worker's loaders), recording which BLIP models each replay loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roles: list[set[str]] = []
        self.loaded: list[str] = []  # the families loaded, by name, in order
        self.families = [dataclasses.replace(family, load=self._load(family)) for family in FAMILIES]

    def _load(self, family: Family) -> Callable[[Settings, frozenset[Capability]], LoadedFamily]:
        def load(settings: Settings, capabilities: frozenset[Capability]) -> LoadedFamily:
            self.loaded.append(family.name)
            if family.name == "blip":
                self.roles.append(roles_for(capabilities))
            return family.load(settings, capabilities)

        return load


def test_shadows_are_recorded_beside_the_decision_and_never_acted_on(settings: Settings, decided: list[str]) -> None:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.exec(select(ShadowDecision)).all()
        decisions = {d.job_id: d for d in session.exec(select(Decision)).all()}
    assert sorted(row.job_id for row in rows) == sorted(decided)
    for row in rows:
        assert (row.policy, row.active_policy, row.action) == ("moderation-next", "moderation", "review")
        assert row.active_action == decisions[row.job_id].action and row.evidence[0]["kind"] == "probe"
        assert row.policy_version == load_policy(settings.policies_dir / "next.yaml").version  # type: ignore[operator]
    assert all(d.reason and d.policy == "moderation" for d in decisions.values())


def test_replay_of_unchanged_checks_needs_no_models_and_reproduces_decisions(
    settings: Settings, decided: list[str], tmp_path: Path
) -> None:
    since = datetime.now(UTC) - timedelta(hours=1)
    engines = CountingEngines(settings)
    same = replay_policy(
        load_policy(builtin_dir() / "moderation.yaml"), settings, since=since, families=engines.families
    )
    assert len(same.jobs) == 3 and same.changed == [] and engines.roles == []
    assert all(job.new_action == job.old_action and not job.inferred for job in same.jobs)

    # Every category reviews at 0: stored evidence alone re-decides every job.
    strict = tmp_path / "strict.yaml"
    strict.write_text(re.sub(r"review: [0-9.]+", "review: 0.0", (builtin_dir() / "moderation.yaml").read_text()))
    report = replay_policy(load_policy(strict), settings, since=since, families=engines.families)
    assert engines.roles == [] and {job.new_action for job in report.jobs} <= {"review", "block"}
    assert all(job.changed for job in report.jobs)  # categories that allowed now review
    assert report.confusion()["allow"]["allow"] == 0


def test_replay_runs_inference_only_for_new_checks(settings: Settings, decided: list[str], tmp_path: Path) -> None:
    new = moderation_variant(
        tmp_path,
        "      - kind: probe\n        question: is there a gun in the picture?",
        "      - kind: probe\n        question: is there a gun in the picture?\n"
        "      - kind: probe\n        question: is there a cannon in the picture?",
    )
    engines = CountingEngines(settings)
    report = replay_policy(
        load_policy(new), settings, since=datetime.now(UTC) - timedelta(hours=1), families=engines.families
    )
    assert engines.roles == [{"vqa"}]  # one model, for the one new question
    assert all(job.inferred and job.new_action is not None for job in report.jobs)
    # Jobs of another policy, or older than --since, are not touched.
    later = replay_policy(load_policy(new), settings, since=datetime.now(UTC) + timedelta(minutes=1))
    assert later.jobs == []


def test_replay_of_text_and_photo_checks_reads_the_stored_lines_and_measures_only_what_is_new(
    settings: Settings, decided: list[str], tmp_path: Path
) -> None:
    """A changed term list re-decides from the lines read and stored with each decision (no model loads); a new
    photo check loads the pixel measurements alone, not BLIP or OCR."""
    since = datetime.now(UTC) - timedelta(hours=1)
    terms = moderation_variant(tmp_path, "telegram, whatsapp, wickr]", "telegram, whatsapp, wickr, signal]")
    engines = CountingEngines(settings)
    report = replay_policy(load_policy(terms), settings, since=since, families=engines.families)
    assert engines.loaded == [] and len(report.jobs) == 3
    assert all(job.new_action is not None and not job.inferred for job in report.jobs)

    sharp = moderation_variant(
        tmp_path,
        "        weight: 2\n",
        "        weight: 2\n      - kind: photo\n        measure: sharpness\n        min: 0.2\n",
        name="sharp.yaml",
    )
    engines = CountingEngines(settings)
    report = replay_policy(load_policy(sharp), settings, since=since, families=engines.families)
    assert engines.loaded == ["pixels"]
    assert all(job.inferred and job.new_action is not None for job in report.jobs)


CONTACT_AND_BACKGROUND = """\
name: contact_and_background
description: Contact details on a photo, and photos not on white.
categories:
  - name: contact
    description: A phone number, e-mail address or link written on the photo.
    review: 0.5
    checks:
      - {kind: text, detect: [phone, email, url], min_score: 0.5}
  - name: background
    description: Not on a white background.
    review: 1.0
    checks:
      - {kind: photo, measure: white_background, min: 0.6}
"""


def test_policy_test_decides_text_and_photo_checks_on_the_case_images(settings: Settings, tmp_path: Path) -> None:
    """`modtag policy test` with the new kinds: the real OCR models read the cases, and neither needs BLIP."""
    cases = tmp_path / "cases"
    for folder, photos in {
        "review": {"phone": product_photo(text="CALL 0176 5550 1423"), "blue": product_photo(background=(40, 90, 200))},
        "allow": {"plain": product_photo()},
    }.items():
        (cases / folder).mkdir(parents=True)
        for name, data in photos.items():
            (cases / folder / f"{name}.jpg").write_bytes(data)
    policy_file = tmp_path / "contact.yaml"
    policy_file.write_text(CONTACT_AND_BACKGROUND)
    engines = CountingEngines(settings)
    results = run_cases(load_policy(policy_file), cases, settings, families=engines.families)
    assert [(r.path.name, r.actual, r.passed) for r in results] == [
        ("plain.jpg", "allow", True),
        ("blue.jpg", "review", True),
        ("phone.jpg", "review", True),
    ], [r.reason or r.error for r in results]
    assert sorted(engines.loaded) == ["ocr", "pixels"]


def test_replay_skips_jobs_whose_image_is_gone(settings: Settings, decided: list[str], tmp_path: Path) -> None:
    shutil.rmtree(settings.resolved_blob_dir)
    new = moderation_variant(tmp_path, "question: is anyone holding a weapon?", "question: is anyone holding a sword?")
    report = replay_policy(load_policy(new), settings, since=datetime.now(UTC) - timedelta(hours=1))
    assert all(job.new_action is None and "cannot be read again" in (job.skipped or "") for job in report.jobs)


def test_policy_commands_print_what_would_change(
    settings: Settings,
    decided: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {
        "MODTAG_DATABASE_URL": settings.resolved_database_url,
        "MODTAG_DATA_DIR": str(settings.data_dir),
        "MODTAG_MODELS": settings.models,
        "MODTAG_MODELS_CACHE_DIR": str(settings.models_cache_dir),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    shadow = settings.policies_dir / "next.yaml"  # type: ignore[operator]
    assert main(["policy", "replay", str(shadow), "--since", "1h"]) == 0
    out = capsys.readouterr().out
    # The shadow replays over the active policy's jobs: it reviews everything.
    assert "replayed over 3 stored 'moderation' jobs" in out and "STORED \\ REPLAYED" in out
    assert main(["policy", "replay", str(shadow), "--since", "yesterday"]) == 2
    assert "not a date" in capsys.readouterr().err
    get_settings.cache_clear()


def test_policy_test_compares_decisions_with_the_case_folders(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases"
    for folder, names in {"review": ("astronaut", "coffee"), "allow": ("rocket",)}.items():
        (cases / folder).mkdir(parents=True)
        for name in names:
            (cases / folder / f"{name}.jpg").write_bytes(photo_bytes(name, size=(80, 60)))
    shadow = load_policy(settings.policies_dir / "next.yaml")  # type: ignore[operator]
    results = run_cases(shadow, cases, settings)  # review at 0: every image is reviewed
    assert [(r.path.name, r.expected, r.actual, r.passed) for r in results] == [
        ("rocket.jpg", "allow", "review", False),
        ("astronaut.jpg", "review", "review", True),
        ("coffee.jpg", "review", "review", True),
    ]
    (cases / "review" / "notes.txt").write_text("ignored")
    (cases / "review" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken = run_cases(shadow, cases, settings)
    assert [r.error is not None for r in broken].count(True) == 1 and len(broken) == 4
    (cases / "blocked").mkdir()
    from core.errors import InvalidField

    with pytest.raises(InvalidField, match="unexpected folder"):
        run_cases(shadow, cases, settings)


def test_listing_cases_read_a_sidecar_context(settings: Settings, tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    (cases / "review").mkdir(parents=True)
    (cases / "review" / "mug.jpg").write_bytes(photo_bytes("coffee", size=(80, 60)))
    policy = load_policy(moderation_variant(tmp_path, "name: moderation", "name: ctx"))
    assert run_cases(policy, cases, settings)[0].actual in ("allow", "review", "block")
    (cases / "review" / "mug.json").write_text("[not an object]")
    [result] = run_cases(policy, cases, settings)
    assert result.error is not None and "context" in result.error


def test_listing_decisions_replay_from_stored_answers_and_tags(settings: Settings, tmp_path: Path) -> None:
    blobs = LocalBlobStore(settings.resolved_blob_dir)
    runtime = WorkerRuntime.from_settings(settings)
    context = {"title": "Red ceramic mug", "attributes": {"color": "crimson", "material": "ceramic"}}
    for name in ("coffee", "chelsea"):
        key = blobs.put(photo_bytes(name, size=(96, 64)))
        with session_scope(settings.resolved_database_url) as session:
            job, _ = create_job(
                session,
                NewJob(
                    tenant="default",
                    policy="listing",
                    policy_version=None,
                    source="upload",
                    blob_key=key,
                    context=context,
                ),
            )
        assert runtime.process(job.id).outcome == "done"
    since = datetime.now(UTC) - timedelta(hours=1)
    listing = (builtin_dir() / "listing.yaml").read_text()
    engines = CountingEngines(settings)
    same = replay_policy(load_policy(builtin_dir() / "listing.yaml"), settings, since=since, families=engines.families)
    assert len(same.jobs) == 2 and same.changed == [] and engines.roles == []
    (tmp_path / "thresholds.yaml").write_text(listing.replace("review: 0.7", "review: 0.0"))
    report = replay_policy(load_policy(tmp_path / "thresholds.yaml"), settings, since=since, families=engines.families)
    assert engines.roles == [] and all(job.new_action == "review" for job in report.jobs)
    (tmp_path / "more_tags.yaml").write_text(listing.replace("top_k: 3", "top_k: 4"))
    replay_policy(load_policy(tmp_path / "more_tags.yaml"), settings, since=since, families=engines.families)
    assert engines.roles == [{"itm"}]  # only the tag set changed
