"""The API process's key cache: a checked key is trusted for its time, then asked about again."""

from __future__ import annotations

import time

from app.auth.cache import KeyCache
from app.auth.models import Role
from app.auth.principal import Principal

MEMBER = Principal(key_id="k1", tenant="team", role=Role.member)


def test_a_key_is_trusted_for_its_time_only() -> None:
    cache = KeyCache(ttl_seconds=0.3)
    assert cache.get("h1") is None
    cache.put("h1", MEMBER)
    assert cache.get("h1") == MEMBER
    time.sleep(0.35)
    assert cache.get("h1") is None


def test_no_time_means_no_cache() -> None:
    cache = KeyCache(ttl_seconds=0)
    cache.put("h1", MEMBER)
    assert cache.get("h1") is None


def test_the_oldest_entries_go_when_it_is_full() -> None:
    cache = KeyCache(ttl_seconds=60, max_entries=10)
    for index in range(11):
        cache.put(f"h{index}", MEMBER)
    assert cache.get("h0") is None
    assert all(cache.get(f"h{index}") == MEMBER for index in range(1, 11))
