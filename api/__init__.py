"""The HTTP API: job submission, decisions, policies, health and metrics. Never imports torch."""
