"""One rank's pipeline: the role of a rank in a (dp × ulysses × tp) run, and the loader that builds with it.

`RankRole` answers, for this rank of any plan, everything the single-process pipeline asks
(k4flash/pipeline.py `Role`): its DiT (a TP shard, with its share of the tokens under
Ulysses or sequence parallelism) everywhere; T5 and the writing on its model group's
first rank; the text embedding broadcast from that rank; the VAE on every rank of the
group with the row-parallel decode (parallel/vae.py), or with `vae_parallel=False` on
the first rank alone. The VAE wrapping and the decode it enables come from `decoder`, so
they cannot be taken apart.
"""
import atexit
import functools

import torch

from k4flash.devices import normalize_device_map
from k4flash.pipeline import Role, load_pipeline
from k4flash.vae import decode_latents
from k4flash.weights import load_dit

from .fetch import fetch_on_rank0
from .load import load_dit_sharded
from .plan import Plan, env_world
from .runtime import Runtime, init_runtime
from .vae import parallelize_vae


class RankRole(Role):
    """What one rank of a (dp × ulysses × tp) mesh loads, encodes, decodes and writes.

    docs/parallel.md "Mesh and roles".
    """

    def __init__(self, runtime: Runtime, vae_parallel: bool = True, owns_runtime: bool = False):
        self.runtime = runtime
        self.owns_runtime = owns_runtime  # load_rank_pipeline made the runtime: close() ends it
        self.sharded = runtime.group_size > 1
        # With one rank per model group there is nothing to split the decode over.
        self.decodes_in_parallel = self.sharded and vae_parallel

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def is_group_main(self) -> bool:
        return self.runtime.is_group_main

    def place(self, device_map: dict) -> dict:
        """The DiT on this rank's device (cuda:LOCAL_RANK on GPU), whatever device_map says. Off the group
        main, and with several model groups per node (whose first ranks each need their own GPU), T5 and the
        VAE go there too; a single group's first rank keeps the device_map's choice for them."""
        if not self.is_group_main or self.runtime.dp_size > 1:
            return {key: self.runtime.device for key in device_map}
        return {**device_map, "dit": self.runtime.device}

    def fetch_weights(self, resolve, download: bool):
        # Anything missing is fetched once, on rank 0, while the others wait on the launcher's store: not in
        # a barrier, which the collective timeout would cut short during a long download.
        if not download:
            return resolve(False)
        return fetch_on_rank0(resolve, self.runtime.rank, self.runtime.world_size)

    def load_dit(self, params, checkpoint_path, device, dtype, **quantization):
        if self.sharded:
            return load_dit_sharded(params, checkpoint_path, self.runtime.dit_mesh, device=device, dtype=dtype,
                                    sequence_parallel=self.runtime.sequence_parallel, **quantization)
        return load_dit(params, checkpoint_path, device=device, dtype=dtype, **quantization)

    @property
    def loads_vae(self) -> bool:
        return self.decodes_in_parallel or self.is_group_main

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.runtime.broadcast_from_group_main(tensor)

    def close(self) -> None:
        if self.owns_runtime:
            self.owns_runtime = False
            atexit.unregister(self.runtime.close)
            self.runtime.close()  # destroys the process group only if init_runtime created it

    def decoder(self, vae):
        if self.decodes_in_parallel:
            return parallelize_vae(vae, self.runtime).decode  # collective: every rank of the job gets here
        return functools.partial(decode_latents, vae) if self.is_group_main else None


def load_rank_pipeline(*args, runtime: Runtime = None, tp: int = None, ulysses: int = 1,
                       sequence_parallel: bool = False, vae_parallel: bool = True, **kwargs):
    """k4flash.pipeline.load_pipeline(*args, **kwargs) for this rank of a multi-rank run.

    Joins the process group the launcher set up unless a `runtime` is given, with the plan of
    `tp` (ranks per TP group, default all that `ulysses` leaves), `ulysses` and `sequence_parallel`.
    On GPU each rank's DiT is on cuda:LOCAL_RANK.

    A process group this call creates (none was initialised) belongs to the pipeline: `pipe.close()`
    destroys it, and so does interpreter exit if close was not called. One the caller initialised, or
    a `runtime` passed in, is left alone.
    """
    owns_runtime = runtime is None
    if owns_runtime:
        device = normalize_device_map(args[0] if args else kwargs["device_map"])["dit"]
        plan = Plan.for_world(env_world()[1], tp, ulysses, sequence_parallel)
        # A library call inside the caller's program: its exit is the caller's business.
        runtime = init_runtime("cuda" if device.type == "cuda" else "cpu", plan=plan, fast_exit=False)
        if runtime.owns_process_group:
            # Destroyed at exit at the latest: NCCL warns of, and may hang on, a group never destroyed.
            atexit.register(runtime.close)
    role = RankRole(runtime, vae_parallel=vae_parallel, owns_runtime=owns_runtime)
    try:
        return load_pipeline(*args, role=role, **kwargs)
    except BaseException:
        role.close()  # a failed load leaves no group of its own behind
        raise
