"""Distributed runtime and tensor-parallel plans for the k4flash DiT (the model never mentions ranks)."""
from .tp import allowed_tp_degrees, dit_tp_plan, parallelize_dit, validate_tp_degree

__all__ = ["parallelize_dit", "dit_tp_plan", "validate_tp_degree", "allowed_tp_degrees"]
