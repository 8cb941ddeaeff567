"""Keys an API process checked a moment ago, so that most requests skip the database.

A key is looked up once, then trusted for `Settings.key_cache_seconds`: a revoked key stops working
within that time in every API process (the CLI that revokes it writes only the database). Only
valid keys are kept; an unknown key is asked about every time, so a key created a moment ago
works at once. Used from the event loop only, so it needs no lock.
"""

from __future__ import annotations

import time

from app.auth.principal import Principal

# Enough for every key of a large team; past it the oldest entries go first.
MAX_ENTRIES = 10_000


class KeyCache:
    """Principals by key hash, each until its expiry (monotonic seconds)."""

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, key_hash: str) -> Principal | None:
        found = self._entries.get(key_hash)
        if found is None:
            return None
        principal, expires = found
        if time.monotonic() >= expires:
            del self._entries[key_hash]
            return None
        return principal

    def put(self, key_hash: str, principal: Principal) -> None:
        if self.ttl_seconds <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            # Dicts keep insertion order: drop the oldest tenth in one go.
            for stale in list(self._entries)[: MAX_ENTRIES // 10]:
                del self._entries[stale]
        self._entries[key_hash] = (principal, time.monotonic() + self.ttl_seconds)
