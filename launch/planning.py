"""Config → `Plan`: the parallel layout of a run and where T5 lives (README "Which plan?").

`request_plan` checks `parallel.*` against the world size and the DiT's widths before torch is
imported (part of the checks run before loading); `choose` turns the request into the run's
`Plan`, `text_encoder.offload` and `dit.offload`, asking the planner (parallel/planner.py) when
something is left to choose.
"""
import logging
from dataclasses import dataclass

from k4flash.geometry import validate_dit_offload, validate_offload, validate_quantize
from parallel.plan import Plan, env_world, validate_plan_degrees, validate_world

from .checks import UsageError, dit_params

log = logging.getLogger("k4flash")
PLAN_CHOICES = ("manual", "auto")
PLAN_FIELDS = ("tp", "ulysses", "sequence_parallel")


@dataclass(frozen=True)
class PlanRequest:
    """parallel.* as configured and checked: a whole plan (parallel.plan=manual), or the degrees the planner
    must keep (auto: `pinned`, (field, value) pairs; the rest it chooses)."""
    plan: Plan = None
    pinned: tuple = ()

    @property
    def auto(self) -> bool:
        return self.plan is None

    def allows(self, candidate: Plan) -> bool:
        if not self.auto:
            return candidate == self.plan
        return all(getattr(candidate, name) == value for name, value in self.pinned)


def request_plan(cfg) -> PlanRequest:
    """The configured plan, checked against this launch's world size and the DiT; UsageError names what is
    allowed."""
    world = env_world()[1]
    p = cfg.parallel
    try:
        if p.plan not in PLAN_CHOICES:
            raise ValueError(f"parallel.plan={p.plan!r}: allowed values are {list(PLAN_CHOICES)}")
        validate_offload(cfg.text_encoder.offload, allow_auto=True)
        validate_quantize(cfg.dit.quantize, list(cfg.dit.fp8_skip), cfg.model.dit_params.num_blocks)
        validate_dit_offload(cfg.dit.offload, allow_auto=True)
        ulysses = 1 if p.ulysses is None else p.ulysses
        if p.plan == "manual":
            plan = Plan.for_world(world, p.tp, ulysses, bool(p.sequence_parallel))
            if plan.group_size > 1:
                validate_plan_degrees(dit_params(cfg), plan.tp, plan.ulysses)
            return PlanRequest(plan=plan)
        tp = validate_world(world, 1 if p.tp is None else p.tp, ulysses)
        if tp > 1 or ulysses > 1:
            validate_plan_degrees(dit_params(cfg), tp, ulysses)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return PlanRequest(pinned=tuple((name, p[name]) for name in PLAN_FIELDS if p[name] is not None))


def choose(cfg, request: PlanRequest, geometry, device) -> tuple:
    """(the run's Plan, its text-encoder offload, its dit.offload) for videos of `geometry` (time_length, width,
    height).

    parallel.plan=auto: the fastest plan the cost model predicts that fits the GPUs' memory, among those the
    request allows; logged with its prediction (rank 0). text_encoder.offload=auto: the first of none,
    after_encode, cpu with which that plan fits (none on CPU). dit.offload=auto: none unless only
    during_decode fits (none on CPU). dit.quantize and dit.fp8_skip are counted as configured, never changed.
    """
    from k4flash.geometry import DIT_OFFLOADS, TEXT_ENCODER_OFFLOADS

    cuda = device.type == "cuda"
    offload, dit_offload = cfg.text_encoder.offload, cfg.dit.offload
    offloads = (offload,) if offload != "auto" else TEXT_ENCODER_OFFLOADS if cuda else ("none",)
    dit_offloads = (dit_offload,) if dit_offload != "auto" else DIT_OFFLOADS if cuda else ("none",)
    if not request.auto and len(offloads) == len(dit_offloads) == 1:
        return request.plan, offloads[0], dit_offloads[0]
    from k4flash.geometry import latent_shape
    from parallel.planner import choose_plan

    world = env_world()[1]
    memory_gb = cfg.parallel.gpu_memory_gb
    if memory_gb is None:
        import torch
        memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if cuda else float("inf")
    latent = latent_shape(geometry.time_length, geometry.height, geometry.width)[:3]
    # A batch or a server needs the DiT again after each decode: during_decode copies it out and back.
    reload = cfg.mode == "serve" or bool(cfg.prompts_file)
    try:
        plan, offload, dit_offload, rows = choose_plan(
            dit_params(cfg), world, memory_gb, latent_fhw=latent, allowed=request.allows, offloads=offloads,
            dit_offloads=dit_offloads, quantize=cfg.dit.quantize, fp8_skip=tuple(cfg.dit.fp8_skip),
            dit_reload=reload)
    except ValueError as err:
        if request.auto:
            raise UsageError(str(err)) from None
        log.warning("%s: the memory model fits no setting with this plan (%s); using the smallest",
                    _auto_keys(cfg), err)
        return request.plan, offloads[-1], dit_offloads[-1]
    row = next(r for r in rows if r["plan_object"] == plan and r["offload"] == offload
               and r["dit_offload"] == dit_offload)
    if env_world()[0] == 0:
        log.info("%s on %d GPU(s), %s: %s, text_encoder.offload=%s, dit.offload=%s (predicted %.2f s per video on "
                 "H100s%s, %.1f GB per GPU; %d choices considered)",
                 "parallel.plan=auto" if request.auto else _auto_keys(cfg), world,
                 "no memory limit" if memory_gb == float("inf") else f"{memory_gb:g} GB each", plan, offload,
                 dit_offload, row["end_to_end_s"], f", {row['dit_offload_s']:.2f} s of it DiT copies over PCIe"
                 if row["dit_offload_s"] else "", row["gpu_memory_gb"], len(rows))
    return plan, offload, dit_offload


def _auto_keys(cfg) -> str:
    """The offload keys left to choose, as the log names them."""
    return ", ".join(f"{key}=auto" for key, value in (("text_encoder.offload", cfg.text_encoder.offload),
                                                      ("dit.offload", cfg.dit.offload)) if value == "auto")
