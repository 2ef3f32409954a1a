"""Prefect flows and the `anole` CLI. They orchestrate; the work lives in `pipeline/` and `workers/`."""
