"""Errors raised by the scheduler; all subclass :class:`mesh.errors.Error`."""

from __future__ import annotations

from mesh.errors import Error

__all__ = ["SchedulerError", "PlanningError"]


class SchedulerError(Error, ValueError):
    """Invalid input to the scheduler (a model, peer, link or coordinate that makes no sense)."""


class PlanningError(Error):
    """No route or placement satisfies the constraints (memory, stage count, capable peers)."""
