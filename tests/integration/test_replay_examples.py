"""`modtag policy replay` of a policy that adds an `examples` check (SQLite and PostgreSQL): the set the stored
evidence lacks is looked up as it is now with each job's stored image embedding, no model run; a job without an
embedding is skipped saying why. Decisions are stored from given probe scores (tests/support/labels.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from core import embeddings, examples
from core.db import session_scope
from core.principals import system_principal
from core.settings import Settings
from core.tables import Job, utcnow
from tests.support.jobs import new_job
from tests.support.labels import decided_job, load_probe_policy, probe_policy
from worker.replay import replay_policy

MODEL = "/models/tiny-random/itm"
FAKES = """\
- name: fakes
  description: Looks like the tenant's known fakes.
  block: 0.5
  checks:
    - kind: examples
      set: fakes
      k: 5
"""


def test_a_replay_looks_the_new_example_set_up_with_the_stored_embeddings(database_url: str, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, policies_dir=None)
    old, new = load_probe_policy(probe_policy()), load_probe_policy(probe_policy() + FAKES)
    admin = system_principal("default")
    basis = np.eye(8, dtype=np.float32)
    quiet = {"weapons": 0.1, "drugs": 0.1}  # both allow under the old policy
    near_fake, near_genuine, unembedded = (decided_job(database_url, old, quiet)[0] for _ in range(3))
    positive, negative = new_job(database_url), new_job(database_url)
    with session_scope(database_url) as session:
        fakes = examples.create_set(session, admin, "fakes", None)
        for job_id, vector in (
            (positive, basis[0]),
            (negative, basis[1]),
            (near_fake, basis[0] + 0.1 * basis[2]),
            (near_genuine, basis[1] + 0.1 * basis[2]),
        ):
            embeddings.save(session, job_id, "default", MODEL, vector)
        for job_id, label in ((positive, examples.Label.POSITIVE), (negative, examples.Label.NEGATIVE)):
            job = session.get(Job, job_id)
            assert job is not None
            examples.add_item(session, admin, fakes, job, label)
        session.commit()

    since = utcnow() - timedelta(hours=1)
    report = replay_policy(new, settings, since=since)
    entries = {entry.job_id: entry for entry in report.jobs}
    assert set(entries) == {near_fake, near_genuine, unembedded}  # the examples are jobs of another policy
    assert (entries[near_fake].new_action, entries[near_fake].inferred) == ("block", False)
    assert entries[near_genuine].new_action == "allow"  # its only change: the new category, allowing
    assert entries[unembedded].new_action is None
    assert "(embedding_missing)" in (entries[unembedded].skipped or "") and "fakes" in (
        entries[unembedded].skipped or ""
    )
    assert [entry.job_id for entry in report.changed if entry.new_action != entry.old_action] == [near_fake]
    assert report.roles_loaded == []  # no model was loaded

    # As the set is now: without its positive example, nothing looks like a fake any more.
    with session_scope(database_url) as session:
        examples.delete_item(session, admin, examples.get_set(session, "default", "fakes"), positive)
    again = {entry.job_id: entry for entry in replay_policy(new, settings, since=since).jobs}
    assert again[near_fake].new_action == "allow"
