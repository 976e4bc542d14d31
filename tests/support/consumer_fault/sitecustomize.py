"""Put on a worker's PYTHONPATH with MODTAG_TEST_CONSUMER_FAULT=1: the first broker connection loss ends Celery's
consumer with the audit's `Unrecoverable error` (AttributeError: 'NoneType' object has no attribute 'hostname').

A fake, and only because the real one cannot be had on demand: the audit saw kombu raise it in `restore_unacked`
while Celery closed a connection Redis dropped, in two of three outages; with the kombu here, repeated SIGKILLs
of Redis while tasks ack did not bring it out. The fault is raised where Celery handles the lost connection, so
the rest of the worker (its stop, the restart by `modtag worker`) runs for real."""

import os

if os.environ.get("MODTAG_TEST_CONSUMER_FAULT"):
    from celery.worker.consumer import consumer

    _handle = consumer.Consumer.on_connection_error_after_connected
    _raised: list[bool] = []

    def _fault(self, exc):  # type: ignore[no-untyped-def]
        if not _raised:
            _raised.append(True)
            raise AttributeError("'NoneType' object has no attribute 'hostname'")
        return _handle(self, exc)

    consumer.Consumer.on_connection_error_after_connected = _fault
