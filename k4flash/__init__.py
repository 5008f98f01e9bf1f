"""k4flash: fast, distributed inference for Kandinsky 4.0 T2V Flash."""
__version__ = "0.1.0"
__all__ = ["DiffusionTransformer3D", "PUBLISHED_DIT_PARAMS", "Kandinsky4T2VPipeline", "get_T2V_pipeline"]


def __getattr__(name):
    # Lazy: `k4flash.cli` must answer bad input without importing diffusers/transformers.
    if name in ("DiffusionTransformer3D", "PUBLISHED_DIT_PARAMS"):
        from . import dit
        return getattr(dit, name)
    if name in ("Kandinsky4T2VPipeline", "get_T2V_pipeline"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'k4flash' has no attribute {name!r}")
