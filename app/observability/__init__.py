"""Observability: GET /metrics in the Prometheus text format (every name prefixed `sgjobs_`)."""
