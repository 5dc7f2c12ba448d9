"""Prefect flows: wiring, retries, caching and artifacts around the core stages."""
