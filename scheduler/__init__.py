"""Scheduling: cost model, network coordinates, route planning, placement and simulation.

Depends only on numpy (never on mesh/: the house test keeps it so), so it can
be imported by the node, the client and offline tools alike.
"""

from .coords import Coordinate, VivaldiConfig, VivaldiNode, estimate_rtt
from .cost import CostParams, ModelSpec, Peer, RouteCost, evaluate_route, unit_prices
from .errors import PlanningError, SchedulerError
from .network import ClientLink, MatrixNetwork, Network, ZoneNetwork
from .planner import Assignment, RoutePlan, Stage, Task, plan_placement, plan_route

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
