"""Keys an API process checked a moment ago, so that most requests skip the database.

A key is looked up once, then trusted for `Settings.key_cache_seconds`: a revoked key stops working
within that time in every API process (the CLI that revokes it writes only the database). Only
valid keys are kept; an unknown key is asked about every time, so a key created a moment ago
works at once.
"""

from __future__ import annotations

from app.auth.principal import Principal
from app.ttl_cache import TtlCache


class KeyCache(TtlCache[str, Principal]):
    """Principals by key hash, each for `key_cache_seconds`."""
