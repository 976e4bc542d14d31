"""`modtag policy calibrate P`: each category's curve from the tenant's review labels (GET /v1/calibration), printed
as a table, drawn as PNG precision-recall curves, and written as a new version of the policy with the suggested
thresholds: a shadow of P, ready to run beside it and to replay (`modtag policy replay NEW.yaml`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.calibration import point_at
from core.errors import ModtagError, NotFound, PolicyError
from core.public import CurvePoint
from modtag.client import ApiClient, Reply
from policies import Policy, load_policy_text
from policies.checks import KINDS


def calibrations(
    client: ApiClient, policy: Mapping[str, Any], *, since: str, block_precision: float, review_recall: float
) -> list[dict[str, Any]]:
    """GET /v1/calibration for every category of `policy` (its JSON as GET /v1/policies/{name} gives it) that acts."""
    found = []
    for category in policy["categories"]:
        if category.get("review") is None and category.get("block") is None:
            continue  # a category of tags never acts: nothing to calibrate
        reply = client.calibration(
            policy["name"],
            category["name"],
            since=since,
            block_precision=block_precision,
            review_recall=review_recall,
        )
        found.append(_body(reply))
    return found


def read_policy(client: ApiClient, name: str) -> dict[str, Any]:
    """The loaded policy `name` as the API holds it; NotFound (with the API's sentence) when it has none."""
    return _body(client.policy(name))


def print_calibrations(found: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    """One row per category: labels, today's thresholds and the suggested ones, each with its precision and recall;
    then the audit-measured precision of automatic decisions."""
    if not found:
        out.write("no category of this policy acts on a threshold: nothing to calibrate\n")
        return
    first = found[0]
    target = first["target"]
    out.write(
        f"policy {first['policy']}: labels since {first['since']}; targets: block precision "
        f"{target['block_precision']:g}, review recall {target['review_recall']:g}\n\n"
    )
    rows = [("CATEGORY", "LABELLED", "POSITIVES", "REVIEW NOW -> SUGGESTED", "BLOCK NOW -> SUGGESTED")]
    for calibration in found:
        points = calibration["points"]
        rows.append(
            (
                calibration["category"],
                str(calibration["labelled"]),
                str(calibration["positives"]),
                _change(points, calibration["current"]["review"], calibration["suggested"]["review"]),
                _change(points, calibration["current"]["block"], calibration["suggested"]["block"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
    out.write("\n")
    for action, measured in sorted(first["audit"].items()):
        if measured["sampled"]:
            out.write(
                f"audit sample: automatic {action}s agreed {measured['agreed']}/{measured['sampled']} = "
                f"{measured['precision']:.3f} (95% interval {measured['low']:.3f}-{measured['high']:.3f})\n"
            )
        else:
            out.write(f"audit sample: no automatic {action} resolved yet (set audit_rate in the policy)\n")


def calibrations_json(found: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"categories": list(found)}, indent=2)


def calibrated_policy(policy: Mapping[str, Any], found: Sequence[Mapping[str, Any]], name: str) -> tuple[str, Policy]:
    """The YAML of a new version of `policy` with the suggested thresholds (a threshold with no suggestion, or one
    the policy leaves unset, stays as it is), named `name` and shadowing `policy`; validated before it is returned."""
    suggested = {calibration["category"]: calibration["suggested"] for calibration in found}
    document: dict[str, Any] = {
        "name": name,
        "description": f"{policy['description']} (thresholds calibrated on review labels)"[:2000],
        "shadows": policy["shadows"] or policy["name"],
    }
    if policy.get("audit_rate"):
        document["audit_rate"] = policy["audit_rate"]
    categories = []
    for category in policy["categories"]:
        written = {key: value for key, value in category.items() if key != "checks"}
        new = suggested.get(category["name"], {})
        for threshold in ("block", "review"):
            if written.get(threshold) is not None and new.get(threshold) is not None:
                written[threshold] = new[threshold]
        if written.get("review") is not None and written.get("block") is not None:
            written["review"] = min(written["review"], written["block"])
        written["checks"] = [_without_defaults(check) for check in category["checks"]]
        categories.append(written)
    document["categories"] = categories
    text = _yaml(document, policy)
    try:
        return text, load_policy_text(text, f"{name}.yaml")
    except PolicyError as exc:
        raise PolicyError(f"the calibrated policy does not validate: {exc.message}", code=exc.code) from None


def write_plots(found: Sequence[Mapping[str, Any]], directory: Path) -> list[Path]:
    """One PNG per category: precision against recall, today's and the suggested thresholds marked on the curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for calibration in found:
        figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
        points = calibration["points"]
        axes.plot([p["recall"] for p in points], [p["precision"] for p in points], color="#2456c9", label="curve")
        for which, style in (("current", "o"), ("suggested", "s")):
            for action, colour in (("review", "#e8590c"), ("block", "#c92a2a")):
                point = _point_at(points, calibration[which][action])
                if point is not None:
                    axes.plot(
                        point["recall"],
                        point["precision"],
                        style,
                        color=colour,
                        fillstyle="full" if which == "suggested" else "none",
                        markersize=9,
                        label=f"{which} {action} {calibration[which][action]:g}",
                    )
        axes.set_xlim(0, 1.02)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_title(
            f"{calibration['policy']} / {calibration['category']}: "
            f"{calibration['labelled']} labelled, {calibration['positives']} positive"
        )
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left", fontsize=8)
        path = directory / f"{_file_part(calibration['policy'])}-{_file_part(calibration['category'])}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


# --- helpers ---------------------------------------------------------------------------------------


def _body(reply: Reply) -> dict[str, Any]:
    if reply.status == 200:
        return reply.body
    message = f"{reply.body.get('detail', 'refused')} ({reply.body.get('code', reply.status)})"
    if reply.status == 404:
        raise NotFound(message, code=str(reply.body.get("code", "not_found")))
    raise ModtagError(message, code=str(reply.body.get("code", "api_error")), http_status=reply.status)


def _point_at(points: Sequence[Mapping[str, Any]], threshold: float | None) -> Mapping[str, Any] | None:
    """The curve's point where `score >= threshold` acts (core.calibration.point_at), as the API's JSON."""
    point = point_at([CurvePoint.model_validate(p) for p in points], threshold)
    return None if point is None else point.model_dump()


def _change(points: Sequence[Mapping[str, Any]], now: float | None, suggested: float | None) -> str:
    def at(threshold: float | None) -> str:
        if threshold is None:
            return "-"
        point = _point_at(points, threshold)
        where = f" (P {point['precision']:.2f} R {point['recall']:.2f})" if point else ""
        return f"{threshold:g}{where}"

    return f"{at(now)} -> {at(suggested) if suggested is not None else 'none meets the target'}"


def _without_defaults(check: Mapping[str, Any]) -> dict[str, Any]:
    """A check as its author would write it: the fields at their kind's defaults left out (some kinds refuse a field
    that another one implies, such as a tags check's prompt beside its taxonomy)."""
    kind = KINDS.get(str(check.get("kind")))
    if kind is None:
        return dict(check)
    kept: dict[str, Any] = {}
    for key, value in check.items():
        field = kind.model_fields.get(key)
        if key != "kind" and field is not None and _at_default(field, value):
            continue
        kept[key] = value
    return kept


def _at_default(field: FieldInfo, value: Any) -> bool:
    if field.is_required() or field.default is PydanticUndefined:
        return False
    return bool(_as_json(field.get_default(call_default_factory=True)) == value)


def _as_json(value: Any) -> Any:
    return json.loads(
        json.dumps(
            value, default=lambda item: item.model_dump(mode="json") if hasattr(item, "model_dump") else list(item)
        )
    )


def _yaml(document: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    import yaml

    header = (
        f"# {document['name']}: policy {source['name']} (version {source.get('version', '?')}) with thresholds\n"
        "# calibrated on review labels by `modtag policy calibrate`. Run it as a shadow (copy it into the policies\n"
        f"# directory) or replay it: modtag policy replay {document['name']}.yaml --since 30d\n"
    )
    return header + yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True, width=110)


def _file_part(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", name.lower())[:64]
