"""The policy domain: schema, safe loading of policy files, and pure evaluation of evidence into decisions."""

from policies.evaluate import (
    Action,
    CategoryResult,
    Evidence,
    ModelOutputs,
    PolicyDecision,
    collect_evidence,
    evaluate,
)
from policies.loader import MAX_FILE_BYTES, builtin_dir, load_policies, load_policy, load_policy_text
from policies.schema import (
    CHECK_KINDS,
    CaptionCheck,
    Category,
    Check,
    Combine,
    Defaults,
    MatchCheck,
    Policy,
    ProbeCheck,
    Requirements,
)

__all__ = [
    "CHECK_KINDS",
    "MAX_FILE_BYTES",
    "Action",
    "CaptionCheck",
    "Category",
    "CategoryResult",
    "Check",
    "Combine",
    "Defaults",
    "Evidence",
    "MatchCheck",
    "ModelOutputs",
    "Policy",
    "PolicyDecision",
    "ProbeCheck",
    "Requirements",
    "builtin_dir",
    "collect_evidence",
    "evaluate",
    "load_policies",
    "load_policy",
    "load_policy_text",
]
