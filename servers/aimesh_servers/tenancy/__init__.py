"""Tenancy: tenants, tokens, limits, and the usage store (records, rollups, queries)."""
