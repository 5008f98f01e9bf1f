"""Text → video: the Kandinsky 4.0 T2V Flash pipeline, one process.

`Kandinsky4T2VPipeline.generate` reads as numbered stages: validate → encode text →
prepare latents → denoise → decode; `write_outputs` is the last stage. The pipeline
never meets a rank: what a process loads, encodes, decodes and writes, and how it gets
the text embedding, is asked of a `Role`. The default `Role` does everything alone;
parallel/rank_pipeline.py supplies the role of one rank of a multi-rank run.
"""
import contextlib
import functools
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .devices import normalize_device_map, resolve_dtype, synchronize
from .geometry import (FPS, latent_shape, num_latent_frames, validate_dit_offload, validate_offload, validate_quantize,
                       validate_request, validate_resolution)
from .host_memory import HostParking
from .output_paths import derived_path, media_path, output_files
from .outputs import frames_to_pil, one_output, write_json_atomic, write_mp4, write_png, write_safetensors_atomic
from .published import PUBLISHED_DIT_PARAMS, TEXT_TOKENS
from .sampler import Schedule, load_schedule, sample
from .weights import load_dit, resolve_weight_paths

log = logging.getLogger("k4flash")


class Role:
    """What this process does in a generation; this default does all of it, alone.

    `is_main`: the job's first process (progress bars, logs). `is_group_main`: the process
    that encodes the prompt, receives the frames and writes the outputs. A multi-rank
    run's role (parallel/rank_pipeline.py) answers these per rank.
    """
    is_main = True
    is_group_main = True

    def place(self, device_map: dict) -> dict:
        """The devices this process's models go on."""
        return device_map

    def fetch_weights(self, resolve, download: bool):
        """resolve(download) → WeightPaths; a multi-rank role lets one rank download while the rest wait."""
        return resolve(download)

    def load_dit(self, params: dict, checkpoint_path, device, dtype, **quantization) -> torch.nn.Module:
        """quantization: quantize=, fp8_skip= (k4flash/fp8.py)."""
        return load_dit(params, checkpoint_path, device=device, dtype=dtype, **quantization)

    @property
    def loads_vae(self) -> bool:
        return True

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """The group main's `tensor` (text embedding, seed) on every process that denoises with it."""
        return tensor

    def decoder(self, vae):
        """callable(latents) → uint8 frames (1, T, H, W, 3) on CPU, or None where the frames do not land;
        None: this process takes no part in decoding. Any wrapping of the VAE happens here, once."""
        from .vae import decode_latents

        return functools.partial(decode_latents, vae)

    def close(self) -> None:
        """Release what was set up for this process's part (a multi-rank role: a process group it created)."""


@dataclass
class Generation:
    request: dict  # prompt, seed, time_length, width, height
    latents: torch.Tensor  # (F, h, w, 16) float32
    frames: object  # (T, H, W, 3) uint8 on the main rank, else None
    timings: dict


class Kandinsky4T2VPipeline:
    def __init__(self, device_map, dit, text_encoder, vae, schedule: Schedule, resolution=512, dtype=None,
                 noise_dtype=torch.bfloat16, *, text_dim=None, text_tokens=None, metadata=None,
                 role: Optional[Role] = None, dit_offload: str = "none"):
        """text_tokens: the text embedding's length, the encoder's max_length (default: the encoder's, else
        224). Every process of a group must be given the same one: off the group main it sizes the buffer
        the embedding is received into, and a broadcast does not check sizes. dit_offload: where the DiT (or
        this rank's shard) is while the VAE decodes: none = on its device; during_decode = freed when generate's
        `last`, else parked in pinned host memory until the next denoise (k4flash/host_memory.py)."""
        validate_resolution(resolution)
        self.role = role or Role()
        self.device_map = normalize_device_map(device_map)
        # The DiT, or a zero-argument loader of it: text_encoder.offload=after_encode loads it only once T5 is gone.
        self._dit = dit
        self.text_encoder = text_encoder  # None where the role does not encode
        self.vae = vae  # None where the role does not decode
        self.decode = self.role.decoder(vae)  # None where the role does not decode
        self.schedule = schedule
        self.resolution = resolution
        self.dtype = resolve_dtype(dtype, self.device_map["dit"])
        self.noise_dtype = noise_dtype
        self.text_dim = text_dim or (text_encoder.d_model if text_encoder is not None else None)
        encoder_tokens = text_encoder.max_length if text_encoder is not None else None
        self.text_tokens = text_tokens or encoder_tokens or TEXT_TOKENS
        if encoder_tokens is not None and encoder_tokens != self.text_tokens:
            raise ValueError(f"text_tokens={self.text_tokens} but the text encoder pads to {encoder_tokens}")
        self.metadata = dict(metadata or {})
        self.dit_offload = validate_dit_offload(dit_offload)
        self.dit_parking = None  # HostParking of the DiT, from its first park (dit_offload=during_decode)

    @property
    def is_group_main(self) -> bool:
        """This process gets the frames and writes the outputs (always, in one process)."""
        return self.role.is_group_main

    @property
    def dit(self) -> torch.nn.Module:
        """The DiT on its device: loaded now if it waited for T5 to go, back from host memory if parked."""
        if self._dit is None:
            raise RuntimeError("the DiT was freed for the decode of the last generation (generate(last=True) with "
                               "dit_offload=during_decode); load the pipeline again to generate more")
        if self.dit_parking is not None and self.dit_parking.parked:
            self.dit_parking.unpark()
        if not isinstance(self._dit, torch.nn.Module):
            if self.text_encoder is not None and not self.text_encoder.released:
                self.text_encoder.release()  # after_encode: the DiT is the next thing to need the memory
            self._dit = self._dit()
        return self._dit

    def encode_prompts(self, texts) -> list:
        """Each prompt's text embedding (1, text_tokens, d_model) in host memory, on the process that encodes (None
        elsewhere). With text_encoder.offload=after_encode the encoder is freed afterwards: a batch encodes
        every prompt first, so T5 is gone before the DiT loads and denoises."""
        if self.text_encoder is None:
            return [None] * len(texts)
        embeds = [self._encode(text).cpu() for text in texts]
        if self.text_encoder.offload == "after_encode":
            self.text_encoder.release()
        return embeds

    def _encode(self, text: str) -> torch.Tensor:
        count = self.text_encoder.token_count(text)
        if count > self.text_encoder.max_length:
            log.warning("prompt is %d tokens; only the first %d condition the video (the rest is truncated)",
                        count, self.text_encoder.max_length)
        return self.text_encoder([text])

    def _autocast(self):
        # The official code runs the bf16 DiT under autocast (LayerNorms in float32); do the same.
        device = self.device_map["dit"]
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def encode_text(self, text: str, text_embed: torch.Tensor = None) -> torch.Tensor:
        """(1, text_tokens, d_model) on the DiT device in the DiT dtype; the group main encodes (or takes
        `text_embed`, from encode_prompts), the others receive into a buffer of that size."""
        device = self.device_map["dit"]
        if self.text_encoder is not None:
            embed = text_embed if text_embed is not None else self._encode(text)
            embed = embed.to(device=device, dtype=self.dtype)
            if embed.shape[1] != self.text_tokens:  # the other ranks receive text_tokens rows
                raise ValueError(f"text_embed has {embed.shape[1]} tokens; this pipeline's is {self.text_tokens}")
            if self.text_encoder.offload == "after_encode" and not self.text_encoder.released:
                self.text_encoder.release()
        else:
            embed = torch.empty(1, self.text_tokens, self.text_dim, device=device, dtype=self.dtype)
        return self.role.share(embed)

    @torch.no_grad()
    def denoise(self, text_embed, shape, seed, progress=True, on_stage=None) -> torch.Tensor:
        """Final latents (F, h, w, 16), float32, for one video; on_stage("denoising", done) after each step."""
        device = self.device_map["dit"]

        def velocity(latent, timestep):
            t = torch.full((1,), float(timestep), device=device)
            with self._autocast():
                return self.dit(latent[None].to(self.dtype), text_embed, t)[0]

        bar = tqdm(total=len(self.schedule.timesteps), desc="denoise", disable=not (progress and self.role.is_main))

        def step_done(i, *_):
            bar.update(1)
            if on_stage is not None:
                on_stage("denoising", i + 1)
        latents = sample(velocity, shape, self.schedule, seed, device=device, noise_dtype=self.noise_dtype,
                         on_step=step_done)
        bar.close()
        return latents

    @torch.no_grad()
    def generate(self, text: str, time_length: int = 12, width: int = 512, height: int = 512, seed: int = None,
                 progress: bool = True, text_embed: torch.Tensor = None, on_stage=None,
                 last: bool = False) -> Generation:
        """Stages 1-5: validate, encode, prepare latents, denoise, decode. Frames only on the group main.

        text_embed: encode_prompts' embedding (on the process that encodes): skips the encoder. on_stage(stage,
        steps done), on every process alike: ("encoding", 0), ("denoising", 0..4), ("decoding", 4); what it raises
        ends the generation there (a server's progress, cancel). last=True: none follows, so
        dit_offload=during_decode frees the DiT rather than parking it (the same on every rank)."""
        on_stage = on_stage or (lambda stage, step: None)
        # 1. Validate the request before any work.
        validate_request(text, time_length, height, width, self.resolution)
        if seed is None:
            seed = int(self.role.share(torch.randint(2**63 - 1, (1,)).to(self.device_map["dit"])).item())
        timings = {}
        clock = time.perf_counter()

        # 2. Encode the prompt (text_tokens: 224 published, no attention mask).
        on_stage("encoding", 0)
        text_embed = self.encode_text(text, text_embed)
        synchronize(self.device_map["dit"])
        timings["text_encode_s"] = time.perf_counter() - clock

        # 3. Prepare the latent geometry: (F, H/8, W/8, 16).
        shape = latent_shape(time_length, height, width)

        # 4. Denoise: 4 renoise steps of the DiT (first back from host memory if it was parked for a decode).
        if self.dit_parking is not None and self.dit_parking.parked:
            clock = time.perf_counter()
            self.dit_parking.unpark()
            timings["dit_restore_s"] = time.perf_counter() - clock
        on_stage("denoising", 0)
        clock = time.perf_counter()
        latents = self.denoise(text_embed, shape, seed, progress=progress, on_stage=on_stage)
        synchronize(self.device_map["dit"])
        timings["denoise_s"] = time.perf_counter() - clock
        if self.dit_offload == "during_decode":  # the decode gets the DiT's memory; on every rank with a shard
            clock = time.perf_counter()
            self._offload_dit(free=last)
            timings["dit_free_s" if last else "dit_offload_s"] = time.perf_counter() - clock
        frames = None
        on_stage("decoding", len(self.schedule.timesteps))
        if self.decode is not None:
            # 5. Decode with the VAE (2 latent frames per batch, 1 for images).
            clock = time.perf_counter()
            frames = self.decode(latents)  # (1, T, H, W, 3) uint8 on the group main, None elsewhere
            frames = frames[0] if frames is not None else None  # (T, H, W, 3)
            synchronize(self.device_map["vae"])
            timings["decode_s"] = time.perf_counter() - clock
        request = {"prompt": text, "seed": seed, "time_length": time_length, "width": width, "height": height}
        return Generation(request, latents, frames, timings)

    def _offload_dit(self, free: bool) -> None:
        """The DiT off its device: freed (nothing keeps it; the cached device memory goes back), or parked."""
        if free:
            self._dit = self.dit_parking = None
            gc.collect()  # a TP plan's hooks make reference cycles
            torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
            return
        if self.dit_parking is None:
            self.dit_parking = HostParking(self.dit)
        self.dit_parking.park()

    def close(self) -> None:
        """End what the loader set up for this pipeline and nothing else: under a launcher, the process group
        get_T2V_pipeline created (one the caller initialised stays). A no-op in one process; idempotent.
        After it the pipeline cannot generate on several ranks. Also `with get_T2V_pipeline(...) as pipe:`."""
        self.role.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write_outputs(self, generation: Generation, save_path, save_latents=False, overwrite=False,
                      extra_metadata=None) -> Path:
        """Stage 6 (group main): MP4 (PNG for an image), optional latents, JSON sidecar, each atomic; returns the
        path of the video (or image) written."""
        clock, frames = time.perf_counter(), generation.frames
        save_path = media_path(save_path, generation.request["time_length"])
        # Video, then latents, then the sidecar: the sidecar marks a finished output (batch resume). All or none.
        with one_output(output_files(save_path, generation.request["time_length"], save_latents), overwrite):
            if generation.request["time_length"] == 0:
                write_png(save_path, frames[0], overwrite=overwrite)
            else:
                write_mp4(save_path, frames, fps=FPS, overwrite=overwrite)
            if save_latents:
                write_safetensors_atomic(derived_path(save_path, ".latents.safetensors"),
                                         {"latents": generation.latents.cpu().contiguous()}, overwrite=overwrite)
            timings = dict(generation.timings, write_s=time.perf_counter() - clock)
            sidecar = {
                **generation.request, "resolution": self.resolution,
                "latent_frames": num_latent_frames(generation.request["time_length"]),
                "video_frames": int(frames.shape[0]), "fps": FPS, "dtype": str(self.dtype).replace("torch.", ""),
                "timesteps": list(self.schedule.timesteps), "timings": timings,
                **self.metadata, **(extra_metadata or {}),
            }
            write_json_atomic(derived_path(save_path, ".json"), sidecar, overwrite=overwrite)
        return save_path

    @torch.no_grad()
    def __call__(self, text: str, save_path="./test.mp4", bs: int = 1, time_length: int = 12, width: int = 512,
                 height: int = 512, seed: int = None, return_frames: bool = False, save_latents: bool = False,
                 overwrite: bool = False, progress: bool = True):
        """The official call: writes `save_path` (MP4 + JSON sidecar) and returns its path, or returns the
        frames as PIL images when `return_frames=True` or `time_length=0` (a one-image list; nothing is
        written, as in the official code: the CLI, which returns nothing, writes `<stem>.png` instead).

        An existing output (`save_path`, its sidecar, its latents when asked for) is kept and FileExistsError
        raised unless `overwrite=True`, as in the CLI; the check runs before any work."""
        if bs != 1:
            raise ValueError(f"bs={bs} is not supported; the distilled pipeline generates one video per call (bs=1)")
        writes = not (return_frames or time_length == 0)
        existing = [p for p in output_files(save_path, time_length, save_latents) if p.exists()] if writes else []
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} already exists (an output of save_path {save_path}); pass "
                                  "overwrite=True to replace it")
        generation = self.generate(text, time_length, width, height, seed, progress)
        if not self.is_group_main:
            return None
        if not writes:
            return frames_to_pil(generation.frames)
        return self.write_outputs(generation, save_path, save_latents=save_latents, overwrite=overwrite)


def _conf_from_official_yaml(conf_path):
    """Paths and DiT params from the official pipeline conf (OmegaConf YAML)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(conf_path)
    try:
        return {
            "dit_params": OmegaConf.to_container(conf.dit.params),
            "dit_path": conf.dit.checkpoint_path,
            "scheduler_path": conf.dit.scheduler,
            "vae_path": conf.vae.checkpoint_path,
            "text_encoder_path": conf.text_embedder.params.checkpoint_path,
            "tokenizer_path": conf.text_embedder.params.tokenizer_path,
            "max_length": int(conf.text_embedder.get("tokens_lenght", TEXT_TOKENS)),
        }
    except Exception as err:  # omegaconf raises several key/attribute errors
        raise ValueError(f"conf_path {conf_path} is not an official pipeline conf: {err}".splitlines()[0]) from err


def load_pipeline(device_map, resolution: int = 512, cache_dir="./weights/", dit_path=None,
                  text_encoder_path=None, tokenizer_path=None, vae_path=None, scheduler_path=None, conf_path=None, *,
                  dit_params: dict = None, dtype: torch.dtype = None, download: bool = True,
                  noise_dtype: torch.dtype = torch.bfloat16, compile: bool = False, text_encoder_offload: str = "none",
                  quantize: str = "none", fp8_skip=(), dit_offload: str = "none",
                  role: Optional[Role] = None) -> Kandinsky4T2VPipeline:
    """Resolve the weights, load T5, DiT and VAE as `role` says (default: all of them, here), return the pipeline.

    The arguments are the model card's `get_T2V_pipeline` (k4flash/__init__.py), which calls this
    in a single process. Missing weights are fetched from the Hub when online (`download=True`),
    else a FileNotFoundError names the missing file and where to put it. `dit_params` defaults to
    the published DiT. `compile=True` torch.compiles the DiT's blocks (DiffusionTransformer3D.compile_blocks).
    `text_encoder_offload` (T5TextEncoder): none, cpu, or after_encode, which loads T5 before the DiT and
    the DiT only once T5 is freed (at the first denoise). `quantize="fp8"` runs the DiT's block matmuls in float8
    except for the `fp8_skip` blocks (k4flash/fp8.py); the weights may be the bf16 checkpoint or its FP8 conversion.
    `dit_offload`: none or during_decode, where the DiT is while the VAE decodes (Kandinsky4T2VPipeline).
    """
    from .vae import load_vae

    role = role or Role()
    validate_resolution(resolution)
    device_map = role.place(normalize_device_map(device_map))
    max_length = TEXT_TOKENS  # the text embedding's length: the encoder pads to it, the other ranks receive it
    if conf_path is not None:
        conf = _conf_from_official_yaml(conf_path)
        max_length = conf.pop("max_length")
        dit_params = dit_params or conf.pop("dit_params")
        dit_path, scheduler_path, vae_path, text_encoder_path, tokenizer_path = (
            dit_path or conf["dit_path"], scheduler_path or conf["scheduler_path"], vae_path or conf["vae_path"],
            text_encoder_path or conf["text_encoder_path"], tokenizer_path or conf["tokenizer_path"])
    dit_params = dict(dit_params or PUBLISHED_DIT_PARAMS)
    fp8_skip = tuple(fp8_skip)
    validate_quantize(quantize, fp8_skip, dit_params["num_blocks"])
    validate_dit_offload(dit_offload)
    paths = role.fetch_weights(functools.partial(resolve_weight_paths, cache_dir, dit_path, text_encoder_path,
                                                 tokenizer_path, vae_path, scheduler_path), download)
    dtype = resolve_dtype(dtype, device_map["dit"])
    validate_offload(text_encoder_offload)
    schedule = load_schedule(paths.scheduler)

    def load_dit_now():
        dit = role.load_dit(dit_params, paths.dit, device=device_map["dit"], dtype=dtype, quantize=quantize,
                            fp8_skip=fp8_skip)
        return dit.compile_blocks() if compile else dit

    # An FP8 DiT's video differs from the published dtype's: its sidecar says so.
    quantized = {"dit_quantize": quantize, "dit_fp8_skip": list(fp8_skip)} if quantize != "none" else {}
    deferred = text_encoder_offload == "after_encode" and role.is_group_main
    dit = load_dit_now if deferred else load_dit_now()
    text_encoder = vae = None
    if role.is_group_main:
        from .text_encoder import T5TextEncoder  # transformers' T5 takes seconds to import: only an encoding rank pays
        text_encoder = T5TextEncoder(paths.text_encoder, paths.tokenizer, max_length=max_length,
                                     device=device_map["text_embedder"], dtype=dtype, offload=text_encoder_offload)
        if text_encoder.d_model != dit_params["in_text_dim"]:
            raise ValueError(f"text encoder width {text_encoder.d_model} != DiT in_text_dim "
                             f"{dit_params['in_text_dim']}")
    if role.loads_vae:
        vae = load_vae(paths.vae, device=device_map["vae"], dtype=dtype)
    return Kandinsky4T2VPipeline(device_map, dit, text_encoder, vae, schedule, resolution=resolution, dtype=dtype,
                                 noise_dtype=noise_dtype, text_dim=dit_params["in_text_dim"], text_tokens=max_length,
                                 role=role, metadata=quantized, dit_offload=dit_offload)
