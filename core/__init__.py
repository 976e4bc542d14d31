"""Shared by the API and the worker: settings, database, blob store, metrics, errors, queues. No torch."""

__version__ = "0.1.0"
