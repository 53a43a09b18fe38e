"""Scheduling: cost model, network coordinates, route planning, placement and simulation.

Depends only on numpy (never on mesh/: the house test keeps it so), so it can
be imported by the node, the client and offline tools alike.
"""

from typing import TYPE_CHECKING, Any

from .errors import PlanningError, SchedulerError

if TYPE_CHECKING:
    from .coords import Coordinate, VivaldiConfig, VivaldiNode, estimate_rtt
    from .cost import CostParams, ModelSpec, Peer, RouteCost, evaluate_route, unit_prices
    from .network import ClientLink, MatrixNetwork, Network, ZoneNetwork
    from .planner import Assignment, RoutePlan, Stage, Task, plan_placement, plan_route

# The numpy parts load on first use: importing scheduler.errors (as mesh.errors does, so every
# ``edgemesh`` command) must not pull in numpy.
_LAZY = {
    **dict.fromkeys(("Coordinate", "VivaldiConfig", "VivaldiNode", "estimate_rtt"), "coords"),
    **dict.fromkeys(
        ("CostParams", "ModelSpec", "Peer", "RouteCost", "evaluate_route", "unit_prices"), "cost"
    ),
    **dict.fromkeys(("ClientLink", "MatrixNetwork", "Network", "ZoneNetwork"), "network"),
    **dict.fromkeys(
        ("Assignment", "RoutePlan", "Stage", "Task", "plan_placement", "plan_route"), "planner"
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "Assignment",
    "ClientLink",
    "Coordinate",
    "CostParams",
    "MatrixNetwork",
    "ModelSpec",
    "Network",
    "Peer",
    "PlanningError",
    "RouteCost",
    "RoutePlan",
    "SchedulerError",
    "Stage",
    "Task",
    "VivaldiConfig",
    "VivaldiNode",
    "ZoneNetwork",
    "estimate_rtt",
    "evaluate_route",
    "plan_placement",
    "plan_route",
    "unit_prices",
]
