"""The unit layer's fixtures: the tiny random models loaded twice (engine, stock) and the photos decoded."""

from __future__ import annotations

from tests.support.models import loaded, stock
from tests.support.photos import decoded_photos

__all__ = ["decoded_photos", "loaded", "stock"]
