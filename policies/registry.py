"""The loaded policies of a process, reloaded without a restart when their files change.

`PolicyRegistry` is a read-only mapping (name -> Policy). At most every `interval_s` seconds, an access
hashes the policy and taxonomy files; when the hash changed, the whole set is loaded again. A set
that fails to load (a YAML typo, a bad threshold, a duplicate name) never replaces the last good
one: the process keeps deciding with the previous versions, logs the error once, and reports it
in `error` until a good edit arrives. Reloading is all-or-nothing, so a policy never runs against a
taxonomy or a shadow target from a different generation of the files.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.errors import PolicyError
from policies.loader import load_policies, policy_files
from policies.schema import Policy

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class ReloadError:
    """The last failed reload: what was wrong (file:line: sentence) and when it was seen."""

    code: str
    message: str
    at: datetime


class PolicyRegistry(Mapping[str, Policy]):
    """Policies by name, kept in step with their files; the first load raises, later bad edits don't."""

    def __init__(
        self,
        dirs: Sequence[Path] = (),
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        on_reload: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dirs = tuple(dirs)
        self.interval_s = interval_s
        self._on_reload = on_reload  # told "loaded" or "failed" (a metric, in the API and workers)
        self._clock = clock  # seconds, monotonic; tests pass their own to step past the interval
        self._lock = threading.Lock()
        self._fingerprint = _fingerprint(self.dirs)
        self._policies: dict[str, Policy] = load_policies(self.dirs)
        self._checked_at = clock()
        self._failed_fingerprint: str | None = None
        self.error: ReloadError | None = None
        self.generation = 1  # bumped on every successful reload

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the files changed (and the interval passed, unless `force`); True when a new set loaded."""
        now = self._clock()
        if not force and now - self._checked_at < self.interval_s:
            return False
        with self._lock:
            if not force and now - self._checked_at < self.interval_s:
                return False  # another thread checked while this one waited
            self._checked_at = now
            fingerprint = _fingerprint(self.dirs)
            if fingerprint == self._fingerprint or fingerprint == self._failed_fingerprint:
                return False
            try:
                policies = load_policies(self.dirs)
            except PolicyError as exc:
                self._failed_fingerprint = fingerprint
                self.error = ReloadError(exc.code, exc.message, datetime.now(UTC))
                log.error(
                    "policy files changed but cannot be loaded; still using the previous versions: %s", exc.message
                )
                self._notify("failed")
                return False
            changes = _changes(self._policies, policies)
            self._policies = policies
            self._fingerprint = fingerprint
            self._failed_fingerprint = None
            self.error = None
            self.generation += 1
            log.info("policies reloaded: %s", "; ".join(changes) or "no policy changed")
            self._notify("loaded")
            return True

    def shadows_of(self, name: str) -> list[Policy]:
        """The policies that run in shadow beside `name`, by name."""
        return [policy for _, policy in sorted(self._current().items()) if policy.shadows == name]

    def __getitem__(self, name: str) -> Policy:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def _notify(self, outcome: str) -> None:
        if self._on_reload is not None:
            self._on_reload(outcome)

    def _current(self) -> dict[str, Policy]:
        self.refresh()
        return self._policies


def _fingerprint(dirs: Sequence[Path]) -> str:
    """A hash of every watched file's path and content (a missing or unreadable file counts as such)."""
    digest = hashlib.sha256()
    for directory in dirs:
        digest.update(f"dir:{directory}:{directory.is_dir()}\n".encode())
    for path in policy_files(dirs) if all(d.is_dir() for d in dirs) else []:
        digest.update(f"{path}\n".encode())
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
    return digest.hexdigest()


def _changes(before: Mapping[str, Policy], after: Mapping[str, Policy]) -> list[str]:
    changes = [f"{name} added ({after[name].version})" for name in sorted(set(after) - set(before))]
    changes += [f"{name} removed" for name in sorted(set(before) - set(after))]
    changes += [
        f"{name} {before[name].version} -> {after[name].version}"
        for name in sorted(set(before) & set(after))
        if before[name].version != after[name].version
    ]
    return changes
