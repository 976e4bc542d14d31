"""A bounded schemathesis run against the served OpenAPI document of a real API (uvicorn, Redis, SQLite): every
operation, every check (no server error, responses that match the schema, refusals of invalid data...).

About two minutes on the shared machine: `FUZZ_EXAMPLES` cases per operation (MODTAG_FUZZ_EXAMPLES), derandomized so
that a run is repeatable; raise it locally to search further.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.api import Api

FUZZ_EXAMPLES = int(os.environ.get("MODTAG_FUZZ_EXAMPLES", "100"))

pytestmark = pytest.mark.timeout(900)

# Every check, as configured by default, but one: a submission whose fields match the schema can still be refused
# for its content, which no schema can say (the bytes are not an image, 1x1 pixels, a policy that needs a context
# field, a URL that cannot be fetched), and a page's `cursor` is opaque (only one the API returned is valid): for
# the submissions and the paged lists those refusals count as accepted answers.
_CONTENT_REFUSALS = '["2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "422", "429"]'
_CURSOR_REFUSALS = '["2xx", "3xx", "400", "401", "403", "404", "409", "429"]'
_OPERATIONS = [
    ("POST", "/v1/jobs", _CONTENT_REFUSALS),
    ("POST", "/v1/listings", _CONTENT_REFUSALS),
    # An example: an upload whose bytes are not an image (415), a job id that names no job (404), a set that has it.
    ("POST", "/v1/example-sets/{name}/items", _CONTENT_REFUSALS),
    ("GET", "/v1/decisions", _CURSOR_REFUSALS),
    ("GET", "/v1/audit", _CURSOR_REFUSALS),
    ("GET", "/v1/review/queue", _CURSOR_REFUSALS),
    ("GET", "/v1/labels", _CURSOR_REFUSALS),
    # A hash list that fits the schema (a file) may still hold lines that are not hashes (422), or name no bank (404).
    ("POST", "/v1/banks/{name}/import", _CONTENT_REFUSALS),
    # A policy or category name that fits the pattern may still name none that is loaded (404, 422).
    ("GET", "/v1/calibration", _CONTENT_REFUSALS),
]
CONFIG = schemathesis.config.SchemathesisConfig.from_str(
    "\n".join(
        f"""
[[operations]]
include-method = "{method}"
include-path = "{path}"
checks.positive_data_acceptance.expected-statuses = {statuses}
"""
        for method, path, statuses in _OPERATIONS
    )
)


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLite only: the run is bounded by time, and the backends are compared by the rest of the suite."""
    path: Path = tmp_path_factory.mktemp("fuzz-db") / "modtag.db"
    yield f"sqlite:///{path}"


def test_the_api_honours_its_openapi_document(api: Api) -> None:
    # Driven from Hypothesis directly: schemathesis's pytest plugin does not run under this pytest.
    schema = schemathesis.openapi.from_url(f"{api.base_url}/openapi.json", config=CONFIG)
    headers = {"Authorization": f"Bearer {api.key}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers)

        try:
            run()
        except BaseException as exc:  # schemathesis raises a group; every operation runs, each failure is listed
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
