"""The policy domain: schema, safe loading of policy files, and pure evaluation of evidence into decisions."""

from policies.checks import (
    CHECK_KINDS,
    AttributeCheck,
    CaptionCheck,
    DescribeCheck,
    MatchCheck,
    ProbeCheck,
    TagsCheck,
)
from policies.evaluate import Action, CategoryResult, PolicyDecision, collect_evidence, decide, evaluate
from policies.loader import MAX_FILE_BYTES, builtin_dir, load_policies, load_policy, load_policy_text, policy_files
from policies.outputs import Contradiction, Evidence, ModelOutputs, Tag
from policies.requirements import AnswerQuery, Requirements, TagSet
from policies.schema import Category, Check, Combine, Defaults, Policy
from policies.taxonomy import Taxonomy, Vocabulary, builtin_taxonomies, load_taxonomies

__all__ = [
    "CHECK_KINDS",
    "MAX_FILE_BYTES",
    "Action",
    "AnswerQuery",
    "AttributeCheck",
    "CaptionCheck",
    "Category",
    "CategoryResult",
    "Check",
    "Combine",
    "Contradiction",
    "Defaults",
    "DescribeCheck",
    "Evidence",
    "MatchCheck",
    "ModelOutputs",
    "Policy",
    "PolicyDecision",
    "ProbeCheck",
    "Requirements",
    "Tag",
    "TagSet",
    "TagsCheck",
    "Taxonomy",
    "Vocabulary",
    "builtin_dir",
    "builtin_taxonomies",
    "collect_evidence",
    "decide",
    "evaluate",
    "load_policies",
    "load_policy",
    "load_policy_text",
    "load_taxonomies",
    "policy_files",
]
