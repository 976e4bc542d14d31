"""Every Prometheus metric modtag exports, defined once. Labels are bounded (never a job id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from core import __version__

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_MODEL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BUILD_INFO = Info("modtag_build", "modtag version and component of this process")

JOBS_SUBMITTED = Counter("modtag_jobs_submitted_total", "Jobs accepted by the API", ["policy", "source"])
JOBS_COMPLETED = Counter("modtag_jobs_completed_total", "Jobs that reached a final state", ["policy", "outcome"])
JOBS_FAILED = Counter("modtag_jobs_failed_total", "Jobs that ended failed, by error code", ["policy", "code"])
JOBS_RETRIED = Counter("modtag_jobs_retried_total", "Job attempts retried after a transient error", ["reason"])
JOBS_REENQUEUED = Counter("modtag_jobs_reenqueued_total", "Jobs the reconciler put back on the queue", ["status"])
DECISIONS = Counter("modtag_decisions_total", "Decisions stored", ["policy", "action"])
CATEGORY_DECISIONS = Counter(
    "modtag_category_decisions_total", "Per-category outcomes of stored decisions", ["policy", "category", "action"]
)
JOB_DURATION = Histogram(
    "modtag_job_duration_seconds", "From submission to final state", ["policy"], buckets=_LATENCY_BUCKETS
)
STAGE_DURATION = Histogram(
    "modtag_stage_duration_seconds",
    "Time per stage of a job in the worker (fetch, decode, infer, evaluate, store)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_INFERENCE = Histogram(
    "modtag_model_inference_seconds",
    "Model compute per batch, by model role and stage",
    ["model", "stage"],
    buckets=_MODEL_BUCKETS,
)
BATCH_SIZE = Histogram("modtag_batch_size_images", "Images per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64))
CALLBACKS = Counter("modtag_callbacks_total", "Job and listing webhook attempts, by outcome", ["outcome"])
WEBHOOKS_ABANDONED = Counter(
    "modtag_webhook_deliveries_abandoned_total", "Webhook deliveries given up after their last retry", ["event_type"]
)
MODEL_LOAD = Gauge("modtag_model_load_seconds", "Time the last load of each model took", ["model"])
QUEUE_DEPTH = Gauge("modtag_queue_depth", "Messages waiting in each Celery queue", ["queue"])
JOBS_BY_STATUS = Gauge("modtag_jobs", "Jobs in the database by status", ["status"])
REVIEW_QUEUE = Gauge("modtag_review_queue_size", "Decisions waiting for a human reviewer")
REVIEW_OLDEST_AGE = Gauge(
    "modtag_review_oldest_age_seconds", "How long the oldest open review item has waited (0 when the queue is empty)"
)
REVIEW_RESOLUTION = Histogram(
    "modtag_review_resolution_seconds",
    "From entering the review queue (or being reopened) to a person's resolution",
    ["policy", "resolution"],
    buckets=(60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 8 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0),
)
AUTH_FAILURES = Counter("modtag_auth_failures_total", "Requests refused by access control, by error code", ["code"])
HTTP_REQUESTS = Counter("modtag_http_requests_total", "HTTP requests served by the API", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "modtag_http_request_duration_seconds", "API request latency", ["method", "route"], buckets=_LATENCY_BUCKETS
)

DECISIONS_WITHOUT_MODELS = Counter(
    "modtag_decisions_without_models_total",
    "Decisions made without running the models, by how (hash_match: a bank match blocked; reused: an identical "
    "earlier upload's decision)",
    ["policy", "how"],
)
ERASURES = Counter(
    "modtag_erasures_total", "Jobs whose image and content were erased, by why (request, retention)", ["why"]
)
ORPHAN_BLOBS_DELETED = Counter(
    "modtag_orphan_blobs_deleted_total", "Blobs past the grace period that no job used, deleted by the orphan sweep"
)
SHADOW_DECISIONS = Counter(
    "modtag_shadow_decisions_total",
    "Shadow policy decisions recorded beside an active decision, by whether they agreed (agree, disagree, error)",
    ["policy", "shadow", "outcome"],
)
BANK_FLOOD_WARNINGS = Counter(
    "modtag_bank_flood_warnings_total",
    "Banked hashes that matched more than MODTAG_BANK_FLOOD_SHARE of a tenant's uploads of the day (once per item "
    "and day), by tenant and bank kind (block, allow)",
    ["tenant", "bank_kind"],
)
POLICY_RELOADS = Counter(
    "modtag_policy_reloads_total", "Reloads of changed policy files, by outcome (loaded, failed)", ["outcome"]
)
QUOTA_ADMITTED = Counter(
    "modtag_quota_admitted_total",
    "Submissions (photos) the tenant quota let through, by tenant and lane (interactive, bulk)",
    ["tenant", "lane"],
)
QUOTA_REFUSED = Counter(
    "modtag_quota_refused_total",
    "Submissions (photos) refused 429 quota_exceeded, by tenant, lane and reason (rate, daily_cap)",
    ["tenant", "lane", "reason"],
)
QUOTA_UNCHECKED = Counter(
    "modtag_quota_unchecked_total",
    "Submissions (photos) admitted without a quota check because Redis was unreachable (quotas fail open)",
    ["lane"],
)
DEPENDENCY_UP = Gauge(
    "modtag_dependency_up",
    "Whether this process reached each dependency (database, blob_store, broker) when it last tried: 1 yes, 0 no",
    ["dependency"],
)


def set_build_info(component: str) -> None:
    BUILD_INFO.info({"version": __version__, "component": component})
