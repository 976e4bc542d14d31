"""The worker side of modtag: Celery tasks, image decoding, URL fetch and the BLIP engine."""
