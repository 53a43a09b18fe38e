"""Batch jobs placed next to their data."""
