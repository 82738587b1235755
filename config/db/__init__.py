"""Tollgate's PostgreSQL engine (`ENGINE: config.db`); see config/db/base.py."""
