"""The typed schema of `conf/` (Hydra structured configs): every key, its type, default and meaning.

This is the one source of defaults and of the key documentation: `--help` is generated from
the `doc=` of each field (`help_text`), and the YAML files in conf/ only choose values.
An ill-typed override (`seed=abc`) fails with Hydra's message before anything loads; an
unknown key fails however it is spelled, `+time_lenght=3` included (`unknown_keys`).
"""
import difflib
from dataclasses import MISSING as NO_DEFAULT, dataclass, field, fields, is_dataclass
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from k4flash.published import DEFAULT_HEIGHT, DEFAULT_TIME_LENGTH, DEFAULT_WIDTH, PUBLISHED_DIT_PARAMS as _P

ENTRY = "run_inference_distil.py"


def key(doc: str, default=NO_DEFAULT, *, factory=NO_DEFAULT):
    """A schema field with its one-line documentation (shown by --help)."""
    if factory is not NO_DEFAULT:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class DiTParams:
    """The DiT's constructor arguments (docs/model.md "DiT hyper-parameters"); defaults: the published DiT."""
    in_visual_dim: int = key("VAE latent channels", _P["in_visual_dim"])
    in_text_dim: int = key("text encoder width (T5-XXL: 4096)", _P["in_text_dim"])
    out_visual_dim: int = key("output latent channels", _P["out_visual_dim"])
    time_dim: int = key("time embedding width", _P["time_dim"])
    patch_size: List[int] = key("patch (frames, height, width)", factory=lambda: list(_P["patch_size"]))
    model_dim: int = key("transformer width", _P["model_dim"])
    ff_dim: int = key("feed-forward width", _P["ff_dim"])
    num_blocks: int = key("pairs of transformer blocks", _P["num_blocks"])
    axes_dims: List[int] = key("RoPE dims per axis (frame, row, column); their sum is the head width",
                               factory=lambda: list(_P["axes_dims"]))


@dataclass
class DemoDefaults:
    """What a run generates when time_length / width / height are not given (the published: 12 s, 672×384)."""
    time_length: int = key("seconds when time_length is not given", DEFAULT_TIME_LENGTH)
    width: int = key("width when not given", DEFAULT_WIDTH)
    height: int = key("height when not given", DEFAULT_HEIGHT)


@dataclass
class ModelConfig:
    name: str = key("the conf/model/<name>.yaml that was chosen", MISSING)
    builtin: bool = key("true: weights are generated locally (tiny); weights_dir and download are ignored", False)
    untrained: bool = key("true: the output is noise; said loudly in the log and the sidecar", False)
    dit_params: DiTParams = key("the DiT's constructor arguments", factory=DiTParams)
    demo: DemoDefaults = key("the model's default time_length / width / height", factory=DemoDefaults)


@dataclass
class ParallelConfig:
    plan: str = key("manual: tp / ulysses / sequence_parallel as given; auto: the plan the cost model predicts "
                    "fastest for one video that fits parallel.gpu_memory_gb (any of the three given still wins); "
                    "README \"Which plan?\"", "manual")
    tp: Optional[int] = key("tensor-parallel degree K: ranks that split the DiT's weights (keep it within a node); "
                            "the world size W = D·U·K gives D data-parallel groups, each with its share of the "
                            "prompts; null = every rank that ulysses leaves", None)
    ulysses: Optional[int] = key("Ulysses degree U: ranks that split the tokens, with an all-to-all around "
                                 "attention; heads 48 / (tp·U) must be whole; null = 1 (auto: chosen)", None)
    sequence_parallel: Optional[bool] = key("the TP ranks split the tokens too (all-gather / reduce-scatter "
                                            "instead of all-reduce); null = false (auto: chosen)", None)
    gpu_memory_gb: Optional[float] = key("plan=auto: memory per GPU to plan for; null = the device's own "
                                         "(no limit on CPU)", None)
    timeout_s: float = key("seconds a collective may wait before the job fails (a dead or hung rank)", 600.0)


@dataclass
class TextEncoderConfig:
    offload: str = key("where T5-XXL (9.5 GB in bf16) lives: none = on the GPU for the whole run; after_encode = "
                       "loaded first, every prompt of the run encoded, then freed before the DiT loads; cpu = in "
                       "host memory, streamed to the GPU a block at a time; auto = the first of those the memory "
                       "plan fits (none on CPU). README \"Which GPUs?\"", "auto")


@dataclass
class DiTConfig:
    quantize: str = key("none: the published dtype; fp8: the blocks' attention and MLP matmuls in float8 e4m3 with "
                        "per-channel weight and per-token activation scales (11.1 → 6.4 GB for the published DiT; "
                        "the video differs slightly, README \"FP8\"); never chosen by parallel.plan=auto", "none")
    fp8_skip: List[int] = key("dit.quantize=fp8: transformer blocks kept in bf16, by index 0..2·num_blocks-1 "
                              "(negative: from the last); default none, by measurement: no block removes enough "
                              "of FP8's error to earn bf16 (README \"Quality\", python -m bench.quality)",
                              factory=list)
    offload: str = key("where the DiT is while the VAE decodes: none = stays on the GPU; during_decode = freed "
                       "before the decode (one video), or moved to pinned host memory and back (batches, serve); "
                       "auto = during_decode only when the memory plan needs it. Outputs are bit-identical", "auto")


@dataclass
class VAEConfig:
    parallel: bool = key("with a model group (ulysses x tp) of more than one rank, all of them decode a band of "
                         "latent rows (exact: the one-rank frames) and its first rank writes; false: the first "
                         "rank decodes alone", True)


@dataclass
class ServeConfig:
    host: str = key("mode=serve: the address to listen on; the default is loopback only, a network address "
                    "(e.g. 0.0.0.0) is a deliberate choice", "127.0.0.1")
    port: int = key("mode=serve: the port", 8000)
    queue_size: int = key("mode=serve: videos waiting at most; more get 429 with Retry-After", 16)
    output_dir: str = key("mode=serve: where videos and their records are written (kept across restarts)",
                          "./served")
    api_key: Optional[str] = key("mode=serve: when set (or $K4FLASH_API_KEY), every route but / (the page) and "
                                 "/health needs Authorization: Bearer <key>", None)
    allow_unauthenticated: bool = key("mode=serve: listen on an address other machines reach without an API key "
                                      "(refused unless true)", False)
    max_body_bytes: int = key("mode=serve: a request body larger than this gets 413", 65536)
    drain_timeout_s: float = key("mode=serve: after SIGTERM, how long the videos in progress may take to finish",
                                 120.0)
    save_latents: bool = key("mode=serve: also write <id>.latents.safetensors", False)


@dataclass
class RunConfig:
    model: ModelConfig = key("the model: kandinsky4_flash (published weights) or tiny (built-in, untrained)",
                             MISSING)
    parallel: ParallelConfig = key("multi-rank layout", factory=ParallelConfig)
    mode: str = key("generate: the prompt or prompts_file, then exit; serve: keep the model loaded and take "
                    "requests over HTTP (README \"Serve\")", "generate")
    serve: ServeConfig = key("mode=serve: the HTTP server", factory=ServeConfig)
    text_encoder: TextEncoderConfig = key("text encoder placement", factory=TextEncoderConfig)
    dit: DiTConfig = key("the DiT's precision and placement", factory=DiTConfig)
    vae: VAEConfig = key("VAE decode", factory=VAEConfig)
    prompt: str = key("the text prompt (single-video mode)", "")
    seed: int = key("one CPU generator: the same seed gives the same video on any device and rank count", 42)
    time_length: int = key("seconds (default: the model's demo value); 0 = one image, written as <stem>.png",
                           II("model.demo.time_length"))
    width: int = key("width; (height, width) must be an allowed pair (README)", II("model.demo.width"))
    height: int = key("height", II("model.demo.height"))
    save_path: str = key("single-video mode: the H.264 MP4 (8 fps); its JSON sidecar goes beside it", "./test.mp4")
    prompts_file: Optional[str] = key(
        "batch mode: one prompt per line, or .jsonl with prompt/seed/time_length/width/height per line; writes "
        "<output_dir>/<5-digit line index>-<slug>.mp4 (+ .json), and a re-run skips finished ones", None)
    output_dir: str = key("where batch mode writes", "./videos")
    save_latents: bool = key('also write <stem>.latents.safetensors (key "latents")', False)
    overwrite: bool = key("replace existing outputs (single mode) / redo finished prompts (batch mode)", False)
    weights_dir: str = key("kandinsky4_distil_512.pt, vae/, text_encoder/, tokenizer/, scheduler/ (docs/model.md)",
                           "./weights/")
    download: bool = key("fetch missing weights from the Hugging Face Hub when it is reachable", True)
    device: str = key("auto = cuda:LOCAL_RANK when CUDA is available, else cpu", "auto")
    dtype: str = key("auto = bfloat16 on GPU (as the official code), float32 on CPU; or float32, bfloat16, "
                     "float16", "auto")
    progress: bool = key("progress bar over the denoising steps (rank 0)", True)
    compile: bool = key("torch.compile the DiT's blocks: the first step of each new geometry pays the compile "
                        "(tens of seconds); measured by python -m bench.dit_forward --compile", False)


def _rows(schema, prefix=""):
    """(dotted key, type, default, doc) for every leaf of a schema dataclass, nested ones flattened."""
    for f in fields(schema):
        name, doc = prefix + f.name, f.metadata.get("doc", "")
        default_type = f.default_factory if f.default_factory is not NO_DEFAULT else None
        if is_dataclass(default_type) or (f.name == "model" and schema is RunConfig):
            yield from _rows(default_type or ModelConfig, name + ".")
            continue
        if f.default_factory is not NO_DEFAULT:
            default = f.default_factory()
        else:
            default = f.default
        if isinstance(default, str) and default.startswith("${"):
            default = default[2:-1]  # an interpolation: name the key it follows
        elif default is MISSING:
            default = "set by the model"
        else:
            default = "null" if default is None else repr(default)
        kind = {Optional[int]: "int or null", Optional[str]: "str or null", List[int]: "list of int"}.get(
            f.type, getattr(f.type, "__name__", str(f.type)))
        yield name, kind, default, doc


def help_text() -> str:
    """The app's --help page: usage, the model choices (Hydra fills in $APP_CONFIG_GROUPS), every key."""
    lines = [f"{ENTRY}: generate videos with Kandinsky 4.0 T2V Flash.", "",
             f"  python {ENTRY} [KEY=VALUE ...]              e.g. model=tiny prompt=\"a red fox\" seed=7",
             f"  torchrun --nproc-per-node 8 {ENTRY} [KEY=VALUE ...]", "",
             "Choices (model=NAME):", "$APP_CONFIG_GROUPS", "", "Keys (default; meaning):"]
    for name, kind, default, doc in _rows(RunConfig):
        lines.append(f"  {name} ({kind}; default {default}): {doc}")
    lines += ["", "--cfg job --resolve prints the resolved config; --hydra-help lists Hydra's own options."]
    return _literal_for_hydra("\n".join(lines), keep="$APP_CONFIG_GROUPS")


def _literal_for_hydra(text: str, keep: str) -> str:
    """`text` as Hydra's help template, so that it prints as written but for the placeholder `keep`.

    The template is read twice: by OmegaConf (`${...}` interpolates, `\\${` is a literal one), then by
    string.Template (`$NAME` substitutes, `$$` is a literal $). A field doc may say `$K4FLASH_API_KEY`.
    """
    return text.replace("$", "$$").replace("$" + keep, keep).replace("${", "\\${")


SECRETS = ("serve.api_key",)  # keys whose value no output, response or log line shows


def shown_config(cfg: DictConfig) -> dict:
    """The resolved config as a sidecar or a response may show it: each secret that is set reads "<hidden>"."""
    shown = OmegaConf.to_container(cfg, resolve=True)
    for dotted in SECRETS:
        *parents, name = dotted.split(".")
        node = shown
        for parent in parents:
            node = node.get(parent) or {}
        if node.get(name) is not None:
            node[name] = "<hidden>"
    return shown


def unknown_keys(cfg: DictConfig) -> list:
    """Keys of a composed run config that the schema does not have, as one-line messages (Hydra's own
    check misses keys added with a `+` prefix)."""
    schema = OmegaConf.structured(RunConfig(model=ModelConfig(name="?")))
    problems = []

    def walk(node, reference, prefix):
        for name in node.keys():
            if prefix == "" and name == "hydra":
                continue
            dotted = prefix + str(name)
            if name not in reference:
                close = difflib.get_close_matches(str(name), [str(k) for k in reference.keys()], n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                problems.append(f"unknown config key {dotted!r}{hint}; `python {ENTRY} --help` lists the keys")
                continue
            child, expected = node._get_node(name), reference._get_node(name)
            if isinstance(child, DictConfig) and isinstance(expected, DictConfig):
                walk(child, expected, dotted + ".")

    walk(cfg, schema, "")
    return problems


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="hydra/help", name="k4flash", node={"app_name": ENTRY, "header": "", "footer": "",
                                                         "template": help_text()})
