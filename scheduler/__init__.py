"""Scheduling: cost model, network coordinates, route planning, placement and simulation."""
