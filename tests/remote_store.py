"""A `sgjobs serve` whose store is a SeaweedFS S3 server, and the settings of another machine's home
sharing its database and store (a worker that must fetch what the API stored)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.testing import S3Server
from tests.conftest import started_service
from tests.support import Service


@contextmanager
def serve_with_store(
    backend: Any, s3: S3Server, folder: Path, prefix: str, **settings: object
) -> Iterator[Service]:
    """`sgjobs serve` in a home under `folder`, storing under `prefix` of the S3 server's bucket (its
    AWS settings in the service's environment); `settings` as for `started_service`."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env.items():
            patch.setenv(name, value)
        home = folder / "home"
        home.mkdir(parents=True)
        with started_service(backend, home, storage_url=s3.storage_url(prefix), **settings) as running:
            yield running


def other_home(backend: Any, api: Service, s3: S3Server, home: Path, prefix: str) -> Settings:
    """Settings of a machine with its own `home` and the API's database and store."""
    database_url = Settings(home=api.home, database_url=backend.database_url).database_url
    return Settings(home=home, database_url=database_url, storage_url=s3.storage_url(prefix))
