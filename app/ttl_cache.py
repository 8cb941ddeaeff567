"""A bounded map whose entries expire: what an API process may reuse for a few seconds without asking
the database again (checked API keys, the checkpoints /predict found)."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Enough for every key or model of a large team; past it the oldest entries go first.
MAX_ENTRIES = 10_000


class TtlCache(Generic[K, V]):
    """Values by key, each for `ttl_seconds` (0: nothing is kept) after it was put. Thread-safe."""

    def __init__(self, ttl_seconds: float, *, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            value, expires = found
            if time.monotonic() >= expires:
                del self._entries[key]
                return None
            return value

    def put(self, key: K, value: V) -> None:
        if self.ttl_seconds <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                # Dicts keep insertion order: drop the oldest tenth in one go.
                for stale in list(self._entries)[: max(1, self.max_entries // 10)]:
                    del self._entries[stale]
            self._entries[key] = (value, time.monotonic() + self.ttl_seconds)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)
