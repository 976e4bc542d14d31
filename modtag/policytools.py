"""`modtag policy replay` and `modtag policy test` (at one dtype or two side by side): parsing and their tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from worker.replay import CaseResult, ReplayReport


def print_replay(report: ReplayReport, out: TextIO, *, all_jobs: bool = False) -> None:
    """The jobs whose decision would change (or every job), then the totals and the confusion table."""
    rows = [("JOB", "DECIDED", "STORED", "REPLAYED", "CHANGES")]
    shown = report.jobs if all_jobs else report.changed
    for job in shown:
        rows.append(
            (
                job.job_id,
                job.decided_at.strftime("%Y-%m-%d %H:%M"),
                job.old_action,
                job.new_action or "skipped",
                job.skipped or "; ".join(job.changed) or "-",
            )
        )
    skipped = [job for job in report.jobs if job.new_action is None]
    if not all_jobs:
        for job in skipped:
            rows.append(
                (job.job_id, job.decided_at.strftime("%Y-%m-%d %H:%M"), job.old_action, "skipped", job.skipped or "")
            )
    if len(rows) > 1:
        _table(rows, out)
        out.write("\n")
    decided = [job for job in report.jobs if job.new_action is not None]
    inferred = sum(1 for job in decided if job.inferred)
    out.write(
        f"policy {report.policy} {report.version} replayed over {len(report.jobs)} stored '{report.target}' jobs: "
        f"{len(decided)} re-decided ({len(decided) - inferred} from stored evidence alone, {inferred} with inference "
        f"for new checks{' on ' + ', '.join(report.roles_loaded) if report.roles_loaded else ''}), "
        f"{len(skipped)} skipped\n"
    )
    changed_action = sum(1 for job in decided if job.new_action != job.old_action)
    out.write(f"{changed_action} would change action, {len(report.changed)} would change some category\n\n")
    confusion = report.confusion()
    _table(
        [("STORED \\ REPLAYED", "allow", "review", "block")]
        + [(old, *(str(confusion[old][new]) for new in ("allow", "review", "block"))) for old in confusion],
        out,
    )


def replay_json(report: ReplayReport) -> str:
    return json.dumps(
        {
            "policy": report.policy,
            "version": report.version,
            "target": report.target,
            "roles_loaded": report.roles_loaded,
            "confusion": report.confusion(),
            "jobs": [
                {
                    "job_id": job.job_id,
                    "decided_at": job.decided_at.isoformat(),
                    "stored": job.old_action,
                    "replayed": job.new_action,
                    "changes": job.changed,
                    "inferred": job.inferred,
                    "skipped": job.skipped,
                }
                for job in report.jobs
            ],
        },
        indent=2,
    )


def print_cases(results: Sequence[CaseResult], out: TextIO) -> None:
    """One line per example image, mismatches marked, then the totals."""
    rows = [("", "IMAGE", "EXPECTED", "DECIDED", "WHY")]
    for result in results:
        mark = "ok" if result.passed else "FAIL"
        rows.append((mark, str(result.path), result.expected, result.actual or "error", result.error or result.reason))
    _table(rows, out)
    failed = sum(1 for result in results if not result.passed)
    out.write(f"\n{len(results)} cases: {len(results) - failed} passed, {failed} failed\n")


def cases_json(results: Sequence[CaseResult]) -> str:
    data: list[dict[str, Any]] = [
        {
            "path": str(r.path),
            "expected": r.expected,
            "decided": r.actual,
            "passed": r.passed,
            "reason": r.reason,
            "error": r.error,
        }
        for r in results
    ]
    return json.dumps(data, indent=2)


def _table(rows: Sequence[Sequence[str]], out: TextIO, width: int = 60) -> None:
    columns = len(rows[0])
    widths = [min(max(len(row[i]) for row in rows), width) for i in range(columns - 1)]
    for row in rows:
        cells = [row[i][:width].ljust(widths[i]) for i in range(columns - 1)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def print_compared_cases(
    results: Sequence[CaseResult], compared: Sequence[CaseResult], dtypes: tuple[str, str], out: TextIO
) -> None:
    """The same cases decided at two dtypes, side by side: a user checks int8 on their own images before switching."""
    first, second = dtypes
    rows = [("", "IMAGE", "EXPECTED", first.upper(), second.upper())]
    for a, b in zip(results, compared, strict=True):
        mark = "same" if (a.actual, a.error) == (b.actual, b.error) else "DIFF"
        rows.append((mark, str(a.path), a.expected, a.actual or "error", b.actual or "error"))
    _table(rows, out)
    same = sum(1 for row in rows[1:] if row[0] == "same")
    passed = [sum(1 for r in side if r.passed) for side in (results, compared)]
    out.write(
        f"\n{len(results)} cases: {same} decided the same at {first} and {second}; "
        f"passed {passed[0]} at {first}, {passed[1]} at {second}\n"
    )


def compared_cases_json(results: Sequence[CaseResult], compared: Sequence[CaseResult], dtypes: tuple[str, str]) -> str:
    first, second = dtypes
    data = [
        {
            "path": str(a.path),
            "expected": a.expected,
            "decided": {first: a.actual, second: b.actual},
            "passed": {first: a.passed, second: b.passed},
            "same": (a.actual, a.error) == (b.actual, b.error),
            "error": {first: a.error, second: b.error},
        }
        for a, b in zip(results, compared, strict=True)
    ]
    return json.dumps(data, indent=2)
