"""Which parallel degrees a launch may use: plain arithmetic, no torch, so the app refuses a bad
`parallel.tp` in milliseconds, before anything heavy is imported (docs/parallel.md "Tensor-parallel plan")."""
import os


def env_world() -> tuple:
    """(rank, world_size, local_rank) from the launcher's environment (all 0 / 1 without one)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), \
        int(os.environ.get("LOCAL_RANK", "0"))


def validate_world(world: int, tp, ulysses=1) -> int:
    """The TP degree for this world size (tp=None: all ranks not taken by Ulysses); raises when W is not a
    multiple of ulysses·tp. The data-parallel degree is the rest: W / (ulysses·tp)."""
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1 or world % ulysses:
        allowed = [k for k in range(1, world + 1) if world % k == 0]
        raise ValueError(f"parallel.ulysses={ulysses!r} does not divide the world size {world}; allowed: {allowed}")
    tp = world // ulysses if tp is None else tp
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or world % (tp * ulysses):
        allowed = [k for k in range(1, world // ulysses + 1) if world % (k * ulysses) == 0]
        if ulysses == 1:
            raise ValueError(f"parallel.tp={tp!r} does not divide the world size {world}; allowed: {allowed}")
        raise ValueError(f"parallel.tp={tp!r} with parallel.ulysses={ulysses} does not divide the world size "
                         f"{world}; allowed tp: {allowed}")
    return tp


def allowed_tp_degrees(params: dict, limit: int = 64) -> list:
    """TP degrees that split heads, ff_dim and every sharded width evenly."""
    heads = params["model_dim"] // sum(params["axes_dims"])
    widths = (heads, params["ff_dim"], params["model_dim"], 6 * params["model_dim"])
    return [k for k in range(1, limit + 1) if all(w % k == 0 for w in widths)]


def validate_tp_degree(params: dict, tp: int) -> None:
    heads = params["model_dim"] // sum(params["axes_dims"])
    allowed = allowed_tp_degrees(params)
    if tp not in allowed:
        raise ValueError(f"tensor-parallel degree {tp} does not divide the DiT (heads={heads}, "
                         f"ff_dim={params['ff_dim']}, model_dim={params['model_dim']}); allowed degrees: {allowed}")


def allowed_ulysses_degrees(params: dict, tp: int = 1, limit: int = 64) -> list:
    """Ulysses degrees U for which every rank gets whole heads: heads / (tp·U) is a whole number."""
    heads = params["model_dim"] // sum(params["axes_dims"])
    return [u for u in range(1, limit + 1) if heads % (tp * u) == 0]


def validate_plan_degrees(params: dict, tp: int, ulysses: int = 1) -> None:
    """Refuse a (tp, ulysses) pair the DiT cannot be split by, naming the allowed degrees."""
    validate_tp_degree(params, tp)
    heads = params["model_dim"] // sum(params["axes_dims"])
    allowed = allowed_ulysses_degrees(params, tp)
    if ulysses not in allowed:
        raise ValueError(f"Ulysses degree {ulysses} with tp={tp} leaves {heads}/{tp * ulysses} heads per rank "
                         f"(heads={heads} must split into whole heads over tp·ulysses); allowed ulysses "
                         f"degrees at tp={tp}: {allowed}")
