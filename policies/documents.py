"""Reading YAML documents safely (size, bombs, tags, nesting, duplicate keys); problems located at file:line:col.

Shared by policy and taxonomy files: a validation error becomes one sentence per problem, each at the
line and column of the value (or key) it is about, with "did you mean" for unknown fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from core.errors import PolicyError
from policies.problems import Loc, PolicyProblems, TypeWords, did_you_mean, format_location, type_in_words

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a real policy is a few KiB
MAX_NODES = 50_000  # counted with aliases expanded, so an alias bomb stops here
MAX_DEPTH = 32  # a policy nests about 7 levels deep
MAX_REPORTED_ERRORS = 20
YAML_SUFFIXES = (".yaml", ".yml")
# The members of a tagged union by tag (the check kinds): pydantic puts the tag into error locations.
Tagged = Mapping[str, type[BaseModel]]
_UNTAGGED: Tagged = MappingProxyType({})
_YAML_WORDS: TypeWords = (
    (list, "a list"),
    (dict, "a mapping"),
    (str, "a string"),
    (bool, "a boolean"),
    ((int, float), "a number"),
    (type(None), "empty (null)"),
)


def unique_dirs(dirs: Sequence[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique: list[Path] = []
    for directory in dirs:
        key = directory.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(directory)
    return unique


def yaml_files(directory: Path) -> list[Path]:
    # Hidden files are skipped: editors and macOS leave `._name.yaml` companions that are not policies.
    return sorted(p for p in directory.iterdir() if p.suffix in YAML_SUFFIXES and not p.name.startswith("."))


def refuse_duplicate(what: str, name: str, origin: str, origins: Mapping[str, str], scope: str = "") -> None:
    """PolicyError `policy_duplicate` when `name` is already in `origins` (name -> where it was defined)."""
    if name in origins:
        raise PolicyError(
            f"{origin}: name: {what} '{name}' is already defined at {origins[name]}; "
            f"{what} names must be unique{scope}, so rename one of them",
            code="policy_duplicate",
        )


def read_document(path: Path, what: str) -> tuple[yaml.Node, Any]:
    """The YAML root node and data of a file that must hold a mapping."""
    source = str(path)
    root, data = read_yaml(read_text(path), source)
    if root is None:
        raise PolicyError(f"{source}:1:1: the file is empty; {what}", code="policy_invalid")
    if not isinstance(data, dict):
        raise PolicyError(
            f"{position(source, root)}: the top level must be a mapping, not {yaml_type(data)}; {what}",
            code="policy_invalid",
        )
    return root, data


def read_text(path: Path) -> str:
    source = str(path)
    try:
        if not path.exists():
            raise PolicyError(f"{source}: policy file not found", code="policy_not_found")
        if not path.is_file():
            raise PolicyError(f"{source}: not a regular file, so it cannot be a policy", code="policy_not_found")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PolicyError(_too_large(source, path.stat().st_size), code="policy_too_large")
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)  # the file may grow between stat and read
    except OSError as exc:
        raise PolicyError(
            f"{source}: cannot read the policy file: {exc.strerror or exc}", code="policy_not_found"
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(_too_large(source, len(raw)), code="policy_too_large")
    return _decode(raw, source)


def _too_large(source: str, size: int) -> str:
    return f"{source}: the file is {size} bytes; policy files are limited to 1 MiB ({MAX_FILE_BYTES} bytes)"


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError(
            f"{source}:{line}:{column}: the file is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
            "policy files are UTF-8 YAML",
            code="policy_yaml_syntax",
        ) from None


class _LimitExceeded(yaml.MarkedYAMLError):
    def __init__(self, problem: str, mark: Any, code: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.code = code


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting, alias bombs, recursive aliases and duplicate keys while composing.

    PyYAML composes an alias as a reference to the anchored node, so a "billion laughs" file is small in
    memory but expands to billions of values for anything that walks it (validation, hashing). Each node's
    expanded size is computed once, from its children's, so the check itself stays linear.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        node: Any
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _LimitExceeded(
                    f"alias *{event.anchor} refers to a node that contains it; recursive structures are not allowed",
                    event.start_mark,
                    "policy_yaml_syntax",
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitExceeded(
                    f"nested deeper than {MAX_DEPTH} levels; a policy needs about 7",
                    self.peek_event().start_mark,
                    "policy_too_large",
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
            _refuse_duplicate_keys(node)
        if size > MAX_NODES:
            raise _LimitExceeded(
                f"the document expands to more than {MAX_NODES} values (aliases counted as copies); "
                "a policy needs far fewer",
                node.start_mark,
                "policy_too_large",
            )
        self._sizes[id(node)] = size
        return node


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    first: dict[str, Any] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
            continue
        if key.value in first:
            raise _LimitExceeded(
                f"duplicate key '{key.value}' (first at line {first[key.value].line + 1}); "
                "YAML would silently keep only the last one",
                key.start_mark,
                "policy_yaml_syntax",
            )
        first[key.value] = key.start_mark


def read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    loader: _BoundedLoader | None = None
    try:
        # The reader checks every character up front, so even constructing the loader can fail.
        loader = _BoundedLoader(text)
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
        return root, data
    except _LimitExceeded as exc:
        raise PolicyError(f"{_mark(source, exc.problem_mark)}: {exc.problem}", code=exc.code) from None
    except yaml.constructor.ConstructorError as exc:
        problem = exc.problem or "cannot be constructed"
        if "could not determine a constructor" in problem:
            tag = problem.split("tag ", 1)[-1].replace("tag:yaml.org,2002:", "!!")
            problem = (
                f"the YAML tag {tag} is not allowed; policy files use plain YAML "
                "(mappings, lists, strings, numbers, booleans)"
            )
        raise PolicyError(f"{_mark(source, exc.problem_mark)}: {problem}", code="policy_yaml_syntax") from None
    except yaml.MarkedYAMLError as exc:
        context = f" ({exc.context} at line {exc.context_mark.line + 1})" if exc.context and exc.context_mark else ""
        raise PolicyError(
            f"{_mark(source, exc.problem_mark or exc.context_mark)}: YAML syntax error: {exc.problem}{context}",
            code="policy_yaml_syntax",
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise PolicyError(
            f"{source}:{line}:{column}: character 0x{exc.character:x} is not allowed in YAML; is this a binary file?",
            code="policy_yaml_syntax",
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}:1:1: YAML error: {exc}", code="policy_yaml_syntax") from None
    except RecursionError:
        raise PolicyError(f"{source}:1:1: the document is nested too deeply", code="policy_too_large") from None
    finally:
        if loader is not None:
            loader.dispose()


def validation_message(
    exc: ValidationError, root: yaml.Node, source: str, model: type[BaseModel], tagged: Tagged = _UNTAGGED
) -> str:
    """Every problem of `exc` as `file:line:col: path: sentence`, in file order (at most MAX_REPORTED_ERRORS)."""
    problems: list[tuple[int, int, str]] = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        found = error.get("ctx", {}).get("error")
        if isinstance(found, PolicyProblems):
            for sub_loc, message in found.problems:
                problems.append(_problem(root, source, (*loc, *sub_loc), message, "value_error", tagged))
        else:
            problems.append(_problem(root, source, loc, _sentence(error, loc, model, tagged), error["type"], tagged))
    problems.sort(key=lambda problem: (problem[0], problem[1]))
    lines = [text for _, _, text in problems[:MAX_REPORTED_ERRORS]]
    if len(problems) > MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(problems) - MAX_REPORTED_ERRORS} more problems")
    return "\n".join(lines)


def _problem(
    root: yaml.Node, source: str, loc: Loc, message: str, error_type: str, tagged: Tagged
) -> tuple[int, int, str]:
    key_node, value_node = locate(root, loc, tagged)
    # An unknown field is best shown at its key; anything else at the value (or the mapping missing a field).
    node = key_node if error_type == "extra_forbidden" else value_node
    path = format_location(tuple(part for part in _user_path(root, loc, tagged)))
    return node.start_mark.line, node.start_mark.column, f"{position(source, node)}: {path}: {message}"


def locate(root: yaml.Node, loc: Loc, tagged: Tagged = _UNTAGGED) -> tuple[yaml.Node, yaml.Node]:
    """The (key node, value node) at a pydantic location; the nearest existing ancestor when it is missing."""
    key_node: yaml.Node = root
    node: yaml.Node = root
    skipped: yaml.Node | None = None  # pydantic inserts the tag once: `checks[0].tags.tags[3]` is the field `tags`
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            if node is not skipped and _is_union_tag(node, part, tagged):
                skipped = node
                continue
            pair = next((pair for pair in node.value if _scalar(pair[0]) == str(part)), None)
            if pair is None:
                return node, node
            key_node, node = pair
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            key_node = node
        else:
            return node, node
    return key_node, node


def _user_path(root: yaml.Node, loc: Loc, tagged: Tagged) -> Loc:
    """The location without the discriminator tags pydantic inserts (`checks[0].probe.question`)."""
    path: list[str | int] = []
    node: yaml.Node | None = root
    skipped: yaml.Node | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and node is not skipped and _is_union_tag(node, part, tagged):
            skipped = node
            continue
        path.append(part)
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if _scalar(key) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            node = None
    return tuple(path)


def _is_union_tag(node: yaml.MappingNode, part: str | int, tagged: Tagged) -> bool:
    kind = next((_scalar(value) for key, value in node.value if _scalar(key) == "kind"), None)
    return isinstance(part, str) and part in tagged and kind == part


def _sentence(error: Any, loc: Loc, root_model: type[BaseModel], tagged: Tagged) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    got = _shown(error.get("input"))
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        field = str(loc[-1])
        if loc == ("version",):
            return "unknown field 'version': the version is computed from the content, so remove it"
        model = _model_at(loc[:-1], root_model, tagged)
        allowed = sorted(info.alias or name for name, info in model.model_fields.items()) if model is not None else []
        close = did_you_mean(field, allowed)
        hint = f"did you mean '{close}'? " if close else ""
        return f"unknown field '{field}'; {hint}allowed fields: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        return f"unknown check kind '{ctx.get('tag')}'; known kinds: {', '.join(sorted(tagged))}"
    if kind == "union_tag_not_found":
        return f"the check has no 'kind'; known kinds: {', '.join(sorted(tagged))}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping, not {yaml_type(error.get('input'))}"
    if kind == "list_type":
        return f"expected a list, not {yaml_type(error.get('input'))}"
    if kind == "string_pattern_mismatch":
        return f"must be a lowercase name of letters a-z, digits, '_' and '-' (got {got})"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    message = error["msg"]
    message = message[0].lower() + message[1:]
    return f"{message} (got {got})" if got else message


def _model_at(loc: Loc, root_model: type[BaseModel], tagged: Tagged) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, to list its fields in a hint."""
    model: type[BaseModel] | None = root_model
    for part in loc:
        if isinstance(part, int):
            continue
        if part in tagged:
            model = tagged[part]
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        return ""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def yaml_type(value: Any) -> str:
    return type_in_words(value, _YAML_WORDS, f"a {type(value).__name__}")


def _scalar(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def position(source: str, node: yaml.Node) -> str:
    return _mark(source, node.start_mark)


def _mark(source: str, mark: Any) -> str:
    if mark is None:
        return f"{source}:1:1"
    return f"{source}:{mark.line + 1}:{mark.column + 1}"
