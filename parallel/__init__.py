"""Distributed runtime and parallel plans for the k4flash DiT (the model never mentions ranks).

Lazy, so that `parallel.plan` (the app's early checks) imports no torch.
"""
__all__ = ["parallelize_dit", "dit_shard_styles", "Plan", "validate_tp_degree", "allowed_tp_degrees"]


def __getattr__(name):
    if name in ("parallelize_dit", "dit_shard_styles"):
        from . import tp
        return getattr(tp, name)
    if name in ("Plan", "validate_tp_degree", "allowed_tp_degrees"):
        from . import plan
        return getattr(plan, name)
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
