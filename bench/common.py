"""Helpers shared by the benchmarks."""

from __future__ import annotations


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named at the end of `url` unless it exists."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
