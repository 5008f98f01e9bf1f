"""What a parallel plan is and which ones a launch may use: plain arithmetic, no torch, so the app refuses a
bad `parallel.tp` in milliseconds, before anything heavy is imported (docs/parallel.md "Tensor-parallel plan").

A `Plan` is the one meaning of "plan" in this project: how the ranks of a launch split the work, as
W = dp · ulysses · tp. How a plan is applied to the DiT is parallel/tp.py and parallel/sequence.py;
which plan is fastest for some GPUs is parallel/planner.py.
"""
import os
from dataclasses import dataclass


def env_world() -> tuple:
    """(rank, world_size, local_rank) from the launcher's environment (all 0 / 1 without one)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), \
        int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Plan:
    """How W = dp · ulysses · tp ranks split the work: `tp` ranks split the DiT's weights, `ulysses` ranks its
    tokens, and `dp` such model groups of ulysses · tp consecutive ranks take turns at the prompts.
    sequence_parallel: the TP ranks split the tokens between the matmuls too (only with tp > 1)."""
    tp: int = 1
    ulysses: int = 1
    sequence_parallel: bool = False
    dp: int = 1

    @property
    def group_size(self) -> int:
        """Ranks that make one video together (a model group)."""
        return self.tp * self.ulysses

    @property
    def world_size(self) -> int:
        return self.dp * self.group_size

    @classmethod
    def for_world(cls, world: int, tp=None, ulysses=1, sequence_parallel=False) -> "Plan":
        """The plan of `world` ranks with these degrees (tp=None: every rank Ulysses leaves); raises ValueError
        naming the allowed degrees when ulysses · tp does not divide the world."""
        tp = validate_world(world, tp, ulysses)
        return cls(tp, ulysses, bool(sequence_parallel) and tp > 1, world // (tp * ulysses))

    def __str__(self):
        parts = [f"tp={self.tp}" + ("+sp" if self.sequence_parallel else "")]
        if self.ulysses > 1:
            parts.append(f"ulysses={self.ulysses}")
        if self.dp > 1:
            parts.append(f"dp={self.dp}")
        return " ".join(parts)


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


def _heads(params: dict) -> int:
    return params["model_dim"] // sum(params["axes_dims"])


def allowed_tp_degrees(params: dict, limit: int = 64) -> list:
    """TP degrees that split heads, ff_dim and every sharded width evenly."""
    widths = (_heads(params), params["ff_dim"], params["model_dim"], 6 * params["model_dim"])
    return [k for k in range(1, limit + 1) if all(w % k == 0 for w in widths)]


def validate_tp_degree(params: dict, tp: int) -> None:
    allowed = allowed_tp_degrees(params)
    if tp not in allowed:
        raise ValueError(f"tensor-parallel degree {tp} does not divide the DiT (heads={_heads(params)}, "
                         f"ff_dim={params['ff_dim']}, model_dim={params['model_dim']}); allowed degrees: {allowed}")


def allowed_ulysses_degrees(params: dict, tp: int = 1, limit: int = 64) -> list:
    """Ulysses degrees U for which every rank gets whole heads: heads / (tp·U) is a whole number."""
    return [u for u in range(1, limit + 1) if _heads(params) % (tp * u) == 0]


def validate_plan_degrees(params: dict, tp: int, ulysses: int = 1) -> None:
    """Refuse a (tp, ulysses) pair the DiT cannot be split by, naming the allowed degrees."""
    validate_tp_degree(params, tp)
    allowed = allowed_ulysses_degrees(params, tp)
    if ulysses not in allowed:
        heads = _heads(params)
        raise ValueError(f"Ulysses degree {ulysses} with tp={tp} leaves {heads}/{tp * ulysses} heads per rank "
                         f"(heads={heads} must split into whole heads over tp·ulysses); allowed ulysses "
                         f"degrees at tp={tp}: {allowed}")


def candidate_plans(params: dict, world: int) -> list:
    """Every plan the DiT allows on `world` ranks: ulysses · tp dividing world, whole heads per rank."""
    plans = []
    for tp in allowed_tp_degrees(params, limit=world):
        for ulysses in allowed_ulysses_degrees(params, tp, limit=world // tp):
            if world % (tp * ulysses):
                continue
            for sp in ((False, True) if tp > 1 else (False,)):
                plans.append(Plan(tp, ulysses, sp, world // (tp * ulysses)))
    return plans
