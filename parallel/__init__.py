"""Distributed runtime and tensor-parallel plans for the k4flash DiT (the model never mentions ranks).

Lazy, so that `parallel.degrees` (the app's early checks) imports no torch.
"""
__all__ = ["parallelize_dit", "dit_tp_plan", "validate_tp_degree", "allowed_tp_degrees"]


def __getattr__(name):
    if name in ("parallelize_dit", "dit_tp_plan"):
        from . import tp
        return getattr(tp, name)
    if name in ("validate_tp_degree", "allowed_tp_degrees"):
        from . import degrees
        return getattr(degrees, name)
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
