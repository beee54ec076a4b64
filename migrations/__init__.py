"""Alembic revision scripts for ccm (installed as the package `ccm.migrations`)."""
