"""The API with its key check taken out, for `bench.control_plane`'s baseline only.

    python -m bench.open_api --port P     (with the service's SGJOBS_* environment)

The same app as `sgjobs api` (same routes, middleware and database), except that FastAPI's
dependency override answers every request as a fixed admin instead of checking
`Authorization: Bearer`. Run beside the real service on the same database, it shows what the key
check itself costs. The override is set here, in the benchmark package: nothing in `app` can turn
the check off.
"""

from __future__ import annotations

import argparse

import uvicorn

from app.api import get_principal
from app.auth.models import Role
from app.auth.principal import DEFAULT_TENANT, Principal
from app.main import create_app
from app.settings import get_settings

BENCH_ADMIN = Principal(key_id="bench-open-api", tenant=DEFAULT_TENANT, role=Role.admin)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app()
    app.dependency_overrides[get_principal] = lambda: BENCH_ADMIN
    # As `sgjobs api` runs it (app.cli._run_api), access log included: only the key check differs.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=get_settings().log_level)


if __name__ == "__main__":
    main()
