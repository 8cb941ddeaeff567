"""`SGJOBS_STORAGE_URL`: what it may say, read in one place (the settings validate it with this)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.paths import unsafe_relative

# Loose on purpose: S3-compatible stores differ in what else they allow; this rules out typos
# (a path where the bucket should be, an empty name), and the store judges the rest.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


@dataclass(frozen=True)
class StorageUrl:
    """A parsed storage URL: `scheme` "" (the local folder, SGJOBS_HOME) or "s3" with its bucket
    and key prefix (without slashes at either end)."""

    scheme: str
    bucket: str = ""
    prefix: str = ""


def parse_storage_url(url: str) -> StorageUrl:
    """ "" (the local folder) or `s3://bucket[/prefix]`; anything else is a ValueError that names
    SGJOBS_STORAGE_URL and says what is accepted."""
    url = url.strip()
    if not url:
        return StorageUrl("")
    accepted = 'accepted: "" (files under SGJOBS_HOME) or s3://bucket/prefix'
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"SGJOBS_STORAGE_URL {url!r}: unknown scheme {parts.scheme!r}; {accepted}")
    if not parts.netloc:
        raise ValueError(f"SGJOBS_STORAGE_URL {url!r} names no bucket; {accepted}")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"SGJOBS_STORAGE_URL {url!r}: {parts.netloc!r} is not a bucket name; {accepted}")
    if parts.query or parts.fragment:
        raise ValueError(f"SGJOBS_STORAGE_URL {url!r}: no query or fragment; {accepted}")
    prefix = "/".join(part for part in parts.path.split("/") if part)
    if prefix and unsafe_relative(prefix) or "." in prefix.split("/"):
        raise ValueError(f"SGJOBS_STORAGE_URL {url!r}: the prefix {prefix!r} is not a plain path")
    return StorageUrl("s3", parts.netloc, prefix)
