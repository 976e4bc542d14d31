"""Loading policy files (built-ins, an operator's directory, text) into validated policies; errors at file:line:col."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from core.errors import PolicyError
from policies.checks import KINDS
from policies.documents import (
    MAX_FILE_BYTES,
    locate,
    position,
    read_text,
    read_yaml,
    refuse_duplicate,
    unique_dirs,
    validation_message,
    yaml_files,
    yaml_type,
)
from policies.schema import Policy
from policies.taxonomy import TAXONOMY_DIR, Taxonomy, builtin_taxonomies, builtin_taxonomy_dir, load_taxonomies


def builtin_dir() -> Path:
    """The directory of the policies that ship with modtag."""
    return Path(__file__).resolve().parent / "builtin"


def load_policy(path: Path, taxonomies: Mapping[str, Taxonomy] | None = None) -> Policy:
    """Read and validate one policy file; PolicyError (with file:line:col) when it cannot be used.

    Taxonomies default to the built-ins plus a `taxonomies/` directory beside the file.
    """
    if taxonomies is None:
        taxonomies = load_taxonomies([path.parent]) if (path.parent / TAXONOMY_DIR).is_dir() else builtin_taxonomies()
    return _load_file(path, taxonomies).policy


def load_policy_text(text: str, source: str = "<text>", taxonomies: Mapping[str, Taxonomy] | None = None) -> Policy:
    """Validate a policy given as text; `source` names it in error messages."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise PolicyError(f"{source}: the policy is larger than 1 MiB; split it or trim it", code="policy_too_large")
    return _parse(text, source, taxonomies if taxonomies is not None else builtin_taxonomies()).policy


def load_policies(dirs: Sequence[Path] = ()) -> dict[str, Policy]:
    """The built-in policies, then every *.yaml / *.yml file in `dirs`, by name; a name defined twice is an error.

    Taxonomies come from `taxonomies/` beside the built-ins and inside each directory. A policy that
    `shadows` another must name a loaded policy that is not itself a shadow.
    """
    for directory in dirs:
        if not directory.is_dir():
            raise PolicyError(
                f"{directory}: the policies directory does not exist or is not a directory", code="policy_not_found"
            )
    taxonomies = load_taxonomies(dirs)
    loaded: dict[str, _Loaded] = {}
    for directory in unique_dirs([builtin_dir(), *dirs]):
        for path in yaml_files(directory):
            found = _load_file(path, taxonomies)
            policy = found.policy
            origins = {name: other.origin for name, other in loaded.items()}
            refuse_duplicate("policy", policy.name, found.origin, origins, " across all policy files")
            loaded[policy.name] = found
    for found in loaded.values():
        _check_shadow(found, loaded)
    return {name: found.policy for name, found in loaded.items()}


def policy_files(dirs: Sequence[Path] = ()) -> list[Path]:
    """Every file `load_policies(dirs)` reads (policies and taxonomies), built-ins first: what a reload watches."""
    files: list[Path] = []
    for directory in unique_dirs([builtin_dir(), *dirs]):
        if directory.is_dir():
            files.extend(yaml_files(directory))
    for directory in unique_dirs([builtin_taxonomy_dir(), *(d / TAXONOMY_DIR for d in dirs)]):
        if directory.is_dir():
            files.extend(yaml_files(directory))
    return files


@dataclass(frozen=True)
class _Loaded:
    policy: Policy
    origin: str  # file:line:col of its name
    shadows_at: str | None  # file:line:col of its `shadows` value


def _check_shadow(found: _Loaded, loaded: Mapping[str, _Loaded]) -> None:
    target = found.policy.shadows
    if target is None:
        return
    if target not in loaded:
        known = ", ".join(sorted(name for name, other in loaded.items() if other.policy.shadows is None))
        raise PolicyError(
            f"{found.shadows_at}: shadows: no policy named '{target}' to shadow; active policies: {known}",
            code="policy_invalid",
        )
    if loaded[target].policy.shadows is not None:
        raise PolicyError(
            f"{found.shadows_at}: shadows: '{target}' is itself a shadow of '{loaded[target].policy.shadows}'; "
            "a shadow runs beside an active policy, so name that one",
            code="policy_invalid",
        )


def _load_file(path: Path, taxonomies: Mapping[str, Taxonomy]) -> _Loaded:
    return _parse(read_text(path), str(path), taxonomies)


def _parse(text: str, source: str, taxonomies: Mapping[str, Taxonomy]) -> _Loaded:
    """The validated policy and where its name and `shadows` are."""
    root, data = read_yaml(text, source)
    if root is None:
        raise PolicyError(
            f"{source}:1:1: the file is empty; a policy is a mapping with name, description and categories",
            code="policy_invalid",
        )
    if not isinstance(data, dict):
        raise PolicyError(
            f"{position(source, root)}: the top level must be a mapping with name, description and categories, "
            f"not {yaml_type(data)}",
            code="policy_invalid",
        )
    try:
        policy = Policy.model_validate(data, context={"taxonomies": taxonomies})
    except ValidationError as exc:
        raise PolicyError(validation_message(exc, root, source, Policy, KINDS), code="policy_invalid") from None
    _, name_node = locate(root, ("name",))
    shadows_at = position(source, locate(root, ("shadows",))[1]) if policy.shadows else None
    return _Loaded(policy, position(source, name_node), shadows_at)
