"""What a non-admin caller never sees: host paths, host names, process ids and tracebacks.

Job errors, events and artifact paths are written by the worker for the operator; before they reach
a member of a tenant, `Redactor` rewrites them: the service's own folders become `<jobs>`,
`<datasets>`, `<weights>` and `<home>`, any other absolute path is cut to its last part, a worker's
name keeps only its random suffix (`sgjobs@gpu-host-1a2b3c4d` -> `worker-1a2b3c4d`), process ids are
hidden, and traceback data is dropped. Admins get everything as it was written.
"""

from __future__ import annotations

import re
from typing import Any

from app.paths import real
from app.settings import Settings

# Event data keys whose values are only for the operator.
OPERATOR_ONLY_KEYS = frozenset({"traceback", "pid"})
# An absolute POSIX path of two or more parts (a lone "/" or "/x" in prose is left alone).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~>])/(?:[^\s/'\"(),:;<>]+/)+([^\s/'\"(),:;<>]*)")
# Worker names as `app.cli` makes them: sgjobs@<host>-<8 hex>.
_WORKER_NAME = re.compile(r"\bsgjobs@\S*?-([0-9a-f]{8})\b")
_PID = re.compile(r"\b(pid)([ =:]+)\d+", re.IGNORECASE)


class Redactor:
    """Rewrites text and JSON-like data for a non-admin caller."""

    def __init__(self, settings: Settings) -> None:
        roots: dict[str, str] = {}
        # The longest first, so a folder inside `home` gets its own name, not `<home>/...`.
        for placeholder, path in (
            ("<home>", settings.home),
            ("<datasets>", settings.datasets_dir),
            ("<jobs>", settings.jobs_dir),
            ("<weights>", settings.weights_dir),
        ):
            roots[str(path)] = placeholder
            roots[str(real(path))] = placeholder
        ordered = sorted(roots, key=len, reverse=True)
        self._roots = roots
        self._root_pattern = re.compile("|".join(re.escape(r) + r"(?=/|\b|$)" for r in ordered))

    def text(self, value: str) -> str:
        value = self._root_pattern.sub(lambda m: self._roots[m.group(0)], value)
        value = _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<path>", value)
        value = _WORKER_NAME.sub(lambda m: f"worker-{m.group(1)}", value)
        return _PID.sub(lambda m: f"{m.group(1)}{m.group(2)}<hidden>", value)

    def data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.data(v) for k, v in value.items() if k not in OPERATOR_ONLY_KEYS}
        if isinstance(value, list):
            return [self.data(v) for v in value]
        return value
