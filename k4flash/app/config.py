"""The typed schema of `conf/` (Hydra structured configs).

A typo'd key or an ill-typed value in an override (`time_lenght=3`, `seed=abc`) fails at
once with Hydra's own message, before anything loads. Every field says what it is here,
where it is declared; the YAML files in conf/ only choose values.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from k4flash.published import DEFAULT_HEIGHT, DEFAULT_TIME_LENGTH, DEFAULT_WIDTH, PUBLISHED_DIT_PARAMS as _P


@dataclass
class DiTParams:
    """The DiT's constructor arguments (docs/model.md "DiT hyper-parameters"); defaults: the published DiT."""
    in_visual_dim: int = _P["in_visual_dim"]  # VAE latent channels
    in_text_dim: int = _P["in_text_dim"]  # text encoder width (T5-XXL: 4096)
    out_visual_dim: int = _P["out_visual_dim"]
    time_dim: int = _P["time_dim"]
    patch_size: List[int] = field(default_factory=lambda: list(_P["patch_size"]))  # (frames, height, width)
    model_dim: int = _P["model_dim"]
    ff_dim: int = _P["ff_dim"]
    num_blocks: int = _P["num_blocks"]  # pairs of transformer blocks
    axes_dims: List[int] = field(default_factory=lambda: list(_P["axes_dims"]))  # RoPE dims per axis; sum = head_dim


@dataclass
class DemoDefaults:
    """What a run generates when time_length / width / height are not given (the published: 12 s, 672×384)."""
    time_length: int = DEFAULT_TIME_LENGTH
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT


@dataclass
class ModelConfig:
    name: str = MISSING  # the conf/model/<name>.yaml that was chosen
    builtin: bool = False  # true: weights are generated locally (tiny); weights_dir and download are ignored
    untrained: bool = False  # true: the output is noise; said loudly in the log and the sidecar
    dit_params: DiTParams = field(default_factory=DiTParams)
    demo: DemoDefaults = field(default_factory=DemoDefaults)


@dataclass
class ParallelConfig:
    # Tensor-parallel degree K: ranks per DiT replica (keep it within a node). The world
    # size W must be a multiple: W = D·K gives D data-parallel groups, each generating its
    # own share of the prompts. null = all ranks in one TP group (D = 1).
    tp: Optional[int] = None
    # Seconds a collective may wait before the job fails (a dead or hung rank).
    timeout_s: float = 600.0


@dataclass
class VAEConfig:
    # When a TP group has more than one rank, all of them decode (each a band of latent rows, exact:
    # the same frames as one rank) and the group's first rank writes; false: the first rank decodes alone.
    parallel: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prompt: str = ""  # the text prompt (single-video mode)
    seed: int = 42  # one CPU generator: the same seed gives the same video on any device and rank count
    time_length: int = II("model.demo.time_length")  # seconds; 0 = one image (<save_path stem>.png)
    width: int = II("model.demo.width")  # (height, width) must be an allowed pair (README)
    height: int = II("model.demo.height")
    save_path: str = "./test.mp4"  # single-video mode: H.264 MP4, 8 fps, JSON sidecar beside it
    # Batch mode: one prompt per line, or JSONL with per-line prompt/seed/time_length/width/height.
    # Writes <output_dir>/<line index, 5 digits>-<slug>.mp4 (+ .json); a re-run skips finished ones.
    prompts_file: Optional[str] = None
    output_dir: str = "./videos"
    save_latents: bool = False  # also write <stem>.latents.safetensors (key "latents")
    overwrite: bool = False  # replace existing outputs (single mode) / redo finished prompts (batch mode)
    weights_dir: str = "./weights/"  # kandinsky4_distil_512.pt, vae/, text_encoder/, tokenizer/, scheduler/ (docs/model.md)
    download: bool = True  # fetch missing weights from the Hugging Face Hub when online
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "auto"  # auto = bfloat16 on GPU (as the official code), float32 on CPU
    progress: bool = True  # progress bar over the denoising steps (rank 0)
    # torch.compile the DiT's transformer blocks (DiffusionTransformer3D.compile_blocks): the
    # first step of each new geometry pays the compile (tens of seconds), later steps run the
    # compiled graph. Measured on/off by `python -m bench.dit_forward --compile`.
    compile: bool = False


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
