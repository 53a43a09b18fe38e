"""Errors raised by the scheduler, under their own root :class:`SchedulingError`.

scheduler/ sits below mesh/ and never imports it; mesh.errors names this root among the
errors it expects (``mesh.errors.EXPECTED``).
"""

from __future__ import annotations

__all__ = ["SchedulingError", "SchedulerError", "PlanningError"]


class SchedulingError(Exception):
    """Root of every scheduler error."""


class SchedulerError(SchedulingError, ValueError):
    """Invalid input to the scheduler (a model, peer, link or coordinate that makes no sense)."""


class PlanningError(SchedulingError):
    """No route or placement satisfies the constraints (memory, stage count, capable peers)."""
