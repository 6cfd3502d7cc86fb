"""Placement and planner: which logical expert each physical slot holds, and how to re-plan it from load."""

from ep_megatron.placement.placement import STRATEGIES, ExpertPlacement, PlacementDiff, Transfer

__all__ = ["STRATEGIES", "ExpertPlacement", "PlacementDiff", "Transfer"]
