"""Shared test fixtures and helpers: test modules import from here, never from one another or from a conftest.

photos: real public-domain photos (scikit-image), encoded or decoded. waiting: wait on a condition, never on
a fixed interval. api: an API served in-process over real HTTP, keys, the error shape. deployment: the API
and workers as child processes. models: the tiny random models as fixtures. receiver: an HTTP server that
records callbacks. policies: policies written inline (load, failure, a one-category policy). s3: a
real S3 HTTP server (moto) and a bucket per test. proxy: a TCP path to a server that a test can cut. outages:
what outage tests read (a worker's metrics, decisions per job, the outage log lines) and do (kill Redis).
servers: Redis, PostgreSQL, a database empty (`empty_database_url`, where migration tests start) or migrated
(`database_url`). sockets: HTTP over a raw socket (a head without its body, bytes one at a time).
"""
