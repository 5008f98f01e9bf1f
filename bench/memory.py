"""Host memory per rank at the published size, measured on CPU next to the memory model's prediction.

    python -m bench.memory [--size published|smoke] [--runs 1:none 1:after_encode 2:none 2:after_encode 4:after_encode]
                           [--quantize none|fp8] [--dir PATH] [--json F] [--md F]

Writes random weights in the published layout (once; kept in --dir): the DiT at its published
size as `kandinsky4_distil_512.safetensors` (5.57 B parameters, bf16, 11.1 GB; the form
`python -m parallel.convert` makes of the published .pt) and a T5-v1.1-XXL encoder in
`text_encoder/` (4.76 B parameters, bf16, 9.5 GB), both streamed to disk a tensor at a time,
plus the tiny tokenizer. Then, for each run `tp:offload`, fresh gloo ranks on this CPU go through
the pipeline's order: the group's first rank loads T5 and encodes a prompt (after_encode: and
frees it) around the DiT load, as `load_pipeline` does, then every rank runs one DiT forward at
1 frame of 512x512 (1,024 + 224 tokens, bf16). Each phase reports every rank's peak RSS
(VmHWM, after resetting it) and peak anonymous memory (RssAnon, sampled every 5 ms; glibc's mmap
threshold fixed at 1 MiB, so freed tensors leave the process: `_freed_memory_leaves`), next to
parallel.planner.rank_memory's prediction for the same rank: the process's anonymous memory before
any weight plus the resident weights and the phase's activations (device="cpu": no allocator
headroom, no CUDA context). The comparison is with anonymous memory, what the process itself
holds, as a GPU would: the DiT loaders copy every tensor out of the file, and T5's weights,
which transformers leaves as views of the memory-mapped file, are copied too. Peak RSS adds
the file's pages the kernel keeps mapped meanwhile. `--size smoke` runs the same code on a
scaled-down config (CI).

`--quantize fp8` runs the DiT as `dit.quantize=fp8` does (k4flash/fp8.py), from a random FP8 checkpoint
written the same way: `kandinsky4_distil_512.fp8.safetensors`, the bf16 file's tensors (the same draws)
with the blocks' attention and MLP weights quantized by `quantize_rows` (e4m3, 6.4 GB at the published
size), as `python -m parallel.convert --quantize fp8` writes it; the prediction counts the FP8 weights and
the FP8 matmuls' input copies (rank_memory(quantize="fp8")).

With 24 GB of RAM, tp = 4 with T5 resident (none) would need 4 ranks' DiT shards beside T5 at once
and is left out by default; after_encode frees T5 before the DiT loads.
"""
import argparse
import json
import shutil
import statistics
import struct
import tempfile
import threading
from pathlib import Path

import torch

from bench.configs import dit_inputs
from bench.host_memory import reset_peak_rss, status_kib
from bench.ranks import in_fresh_process
from bench.report import Report, add_output_args
from k4flash.published import PUBLISHED_DIT_PARAMS, TEXT_TOKENS
from parallel import cost
from parallel.spawn import run_ranks

SIZES = {
    "published": dict(dit=PUBLISHED_DIT_PARAMS, t5=cost.T5_XXL, latent=(1, 64, 64)),
    "smoke": dict(dit=dict(PUBLISHED_DIT_PARAMS, model_dim=384, ff_dim=1536, time_dim=128, num_blocks=2,
                           in_text_dim=256, axes_dims=(16, 24, 24)),
                  t5=dict(d_model=256, d_ff=512, num_layers=2, num_heads=4, d_kv=64, vocab_size=32128),
                  latent=(1, 32, 32)),
}
DEFAULT_RUNS = {"published": ["1:none", "1:after_encode", "2:none", "2:after_encode", "4:after_encode"],
                "smoke": ["1:none", "1:after_encode", "2:none", "2:after_encode"]}
DEFAULT_FP8_RUNS = {"published": ["1:none", "1:after_encode", "2:after_encode"], "smoke": DEFAULT_RUNS["smoke"]}
DIT_FILES = {"none": "kandinsky4_distil_512.safetensors", "fp8": "kandinsky4_distil_512.fp8.safetensors"}
GIB = 2**30


def write_streamed_safetensors(path: Path, shapes: dict, seed: int = 0, scale: float = 0.02, quantized=(),
                               metadata=None) -> None:
    """A bf16 .safetensors of random tensors, written one tensor at a time (never the whole file in memory).

    `quantized`: weight names written as k4flash/fp8.py's quantize_rows makes them (e4m3, followed by their
    float32 `.weight_scale`), from the same draws as the bf16 file: what parallel.convert --quantize fp8
    makes of it.
    """
    from k4flash.fp8 import SCALE_SUFFIX, quantize_rows

    layout = []  # (name, dtype, shape, element size)
    for name, shape in shapes.items():
        if name in quantized:
            layout += [(name, "F8_E4M3", shape, 1), (name + SCALE_SUFFIX, "F32", shape[:1], 4)]
        else:
            layout.append((name, "BF16", shape, 2))
    header, offset = {}, 0
    for name, dtype, shape, element in layout:
        size = element * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "written_by": "bench.memory (random weights)", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            tensor = (torch.randn(shape, generator=generator) * scale).to(torch.bfloat16)
            if name in quantized:
                q, row_scale = quantize_rows(tensor)
                f.write(q.view(torch.uint8).numpy().tobytes() + row_scale.numpy().tobytes())
            else:
                f.write(tensor.view(torch.int16).numpy().tobytes())
    tmp.replace(path)


def _t5_config(t5: dict):
    from transformers import T5Config
    return T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False,
                    use_cache=False, dropout_rate=0.0)


def write_weights(folder: Path, size: str, quantize: str = "none") -> Path:
    """The random published-layout weights for `size` in folder/size: T5, the tokenizer and the DiT file
    `quantize` runs from (DIT_FILES). Each file is written to a temporary name and renamed: one that exists is
    complete, and reused."""
    from transformers import T5EncoderModel

    from k4flash.dit import DiffusionTransformer3D
    from k4flash.fp8 import quantized_layer_paths
    from k4flash.tiny import ensure_tiny_weights

    spec, root = SIZES[size], folder / size
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        dit = DiffusionTransformer3D(**spec["dit"])
        config = _t5_config(spec["t5"])
        t5 = T5EncoderModel(config)
    dit_file = root / DIT_FILES[quantize]
    if not dit_file.exists():
        quantized = {f"{path}.weight" for path in quantized_layer_paths(spec["dit"]["num_blocks"])} \
            if quantize == "fp8" else set()
        write_streamed_safetensors(dit_file, {k: tuple(v.shape) for k, v in dit.state_dict().items()}, seed=0,
                                   quantized=quantized,
                                   metadata=dict(quantize="fp8", fp8_skip="[]") if quantized else None)
    if not (root / "text_encoder" / "model.safetensors").exists():
        tied = {"encoder.embed_tokens.weight"}  # the same tensor as shared.weight: written once, as transformers does
        write_streamed_safetensors(root / "text_encoder" / "model.safetensors",
                                   {k: tuple(v.shape) for k, v in t5.state_dict().items() if k not in tied}, seed=1)
    config.architectures = ["T5EncoderModel"]
    config.to_json_file(str(root / "text_encoder" / "config.json"))
    shutil.copytree(ensure_tiny_weights() / "tokenizer", root / "tokenizer", dirs_exist_ok=True)
    return root


class PhasePeak:
    """A phase's peak RSS (VmHWM after resetting the mark) and peak anonymous RSS (sampled every 5 ms)."""

    def __enter__(self):
        reset_peak_rss()
        self.anon = status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.anon = max(self.anon, status_kib("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, status_kib("RssAnon")) * 1024
        self.rss = max(status_kib("VmHWM"), status_kib("VmRSS")) * 1024


MMAP_THRESHOLD = 1 << 20  # glibc: blocks from 1 MiB up are mmapped, and unmapped when freed


def _freed_memory_leaves():
    """glibc malloc's mmap threshold fixed at MMAP_THRESHOLD (mallopt M_MMAP_THRESHOLD), so a freed tensor's memory
    leaves the process and the anonymous peak is what was alive, which the memory model counts. By default glibc
    raises the threshold up to 32 MB as blocks are freed and keeps such blocks in its heap: an FP8 forward's
    float32 temporaries then stay held, not alive (+0.2-0.3 GiB at the published size)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator as it is
        pass


def _rank_run(runtime, root, size, offload, quantize="none"):
    """One rank: T5 and the DiT loaded in the pipeline's order, a prompt encoded, one DiT forward; per phase peaks."""
    import gc

    _freed_memory_leaves()
    from k4flash.text_encoder import T5TextEncoder
    from k4flash.weights import load_dit
    from parallel.load import load_dit_sharded

    spec, root = SIZES[size], Path(root)
    first = runtime.group_rank == 0
    baseline = status_kib("RssAnon") * 1024
    phases, t5 = {}, None

    def load_t5():
        nonlocal t5
        with PhasePeak() as peak:
            t5 = T5TextEncoder(root / "text_encoder", root / "tokenizer", device="cpu", dtype=torch.bfloat16,
                               offload=offload)
            # transformers leaves the weights as views of the memory-mapped file (page cache, which the kernel
            # drops and re-reads under pressure); a GPU holds a copy. Copy them, as the device would.
            for param in t5.encoder.parameters():
                param.data = param.data.clone()
            gc.collect()
            t5(["a red square on a blue field"])
            if offload == "after_encode":
                t5.release()
                t5 = None
                gc.collect()
        phases["T5 load + encode"] = peak

    if first and offload == "after_encode":
        load_t5()
    with PhasePeak() as peak:
        checkpoint = root / DIT_FILES[quantize]
        if runtime.group_size > 1:
            dit = load_dit_sharded(spec["dit"], checkpoint, runtime.dit_mesh, dtype=torch.bfloat16, quantize=quantize)
        else:
            dit = load_dit(spec["dit"], checkpoint, dtype=torch.bfloat16, quantize=quantize)
    phases["DiT load"] = peak
    if first and offload != "after_encode":
        load_t5()
    inputs = dit_inputs(dict(params=spec["dit"], latent=spec["latent"], text_tokens=TEXT_TOKENS),
                        dtype=torch.bfloat16, seed=0)
    with PhasePeak() as peak, torch.no_grad():
        dit(*inputs)
    phases["DiT forward"] = peak
    runtime.barrier()
    return dict(baseline=baseline, phases={name: dict(rss=p.rss, anon=p.anon) for name, p in phases.items()})


def _single(root, size, offload, quantize="none"):
    from parallel.runtime import Runtime
    torch.set_num_threads(2)
    return _rank_run(Runtime(), root, size, offload, quantize)


def predicted(size, tp, offload, rank, baseline, quantize="none") -> dict:
    """rank_memory's host-memory prediction per phase for this rank (bytes), the measured baseline added."""
    from parallel.plan import Plan
    from parallel.planner import rank_memory

    spec = SIZES[size]
    m = rank_memory(spec["dit"], Plan(tp=tp), offload, spec["latent"], TEXT_TOKENS, device="cpu",
                    group_main=rank == 0, loads_vae=False, t5=spec["t5"], quantize=quantize)
    # The pipeline's order: after_encode loads T5 before the DiT, none after it; either way the DiT load
    # holds no T5 yet, only the shard.
    return {"T5 load + encode": baseline + m["stages"]["encode"], "DiT load": baseline + m["dit_weights"],
            "DiT forward": baseline + m["stages"]["denoise"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="published")
    parser.add_argument("--runs", nargs="+", help="tp:offload pairs (default: every one that fits 24 GB of RAM)")
    parser.add_argument("--quantize", choices=sorted(DIT_FILES), default="none",
                        help="fp8: the DiT as dit.quantize=fp8 runs it, from a random FP8 checkpoint")
    parser.add_argument("--dir", type=Path, help="where the random weights are written and kept (default: a "
                        "temporary folder, removed after)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    defaults = (DEFAULT_FP8_RUNS if args.quantize == "fp8" else DEFAULT_RUNS)[args.size]
    runs = [(int(tp), offload) for tp, offload in (r.split(":") for r in (args.runs or defaults))]
    report = Report("memory", size=args.size, latent=SIZES[args.size]["latent"], dtype="bfloat16",
                    quantize=args.quantize, backend="gloo, 1 thread per rank")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_weights(args.dir or Path(tmp), args.size, args.quantize)
        rows = []
        for tp, offload in runs:
            try:
                per_rank = [in_fresh_process(_single, str(root), args.size, offload, args.quantize)] if tp == 1 \
                    else run_ranks(tp, _rank_run, str(root), args.size, offload, args.quantize, tp=tp, timeout=3600,
                                   start_method="spawn")
            except Exception as err:  # e.g. the kernel's OOM killer: report the run, go on with the next
                report.note(f"tp={tp} {offload}: failed: {str(err).splitlines()[0]}")
                continue
            for rank, result in enumerate(per_rank):
                if rank > 1:  # ranks past the second hold the same as the second
                    continue
                expected = predicted(args.size, tp, offload, rank, result["baseline"], args.quantize)
                for phase, measured in result["phases"].items():
                    rows.append(dict(tp=tp, offload=offload, rank=rank, phase=phase,
                                     baseline=result["baseline"] / GIB, rss=measured["rss"] / GIB,
                                     anon=measured["anon"] / GIB, predicted=expected[phase] / GIB,
                                     error=(measured["anon"] - expected[phase]) / expected[phase]))
    report.table("Peak host memory per rank and phase, GiB, measured vs parallel.planner.rank_memory"
                 + (", dit.quantize=fp8" if args.quantize == "fp8" else ""), [
        ("tp", "tp", None), ("offload", "text_encoder.offload", None), ("rank", "rank", None),
        ("phase", "phase", None), ("baseline", "anonymous before weights", ".2f"), ("rss", "peak RSS", ".2f"),
        ("anon", "peak anonymous", ".2f"), ("predicted", "predicted", ".2f"),
        ("error", "anonymous vs predicted", "+.1%")], rows)
    peaks = {}
    for row in rows:
        key = (row["tp"], row["offload"], row["rank"])
        peaks[key] = max(peaks.get(key, (0, 0)), (row["anon"], row["predicted"]))
    report.note("Whole-run peak per rank, measured / predicted: " + "; ".join(
        f"tp={tp} {offload} rank {rank}: {m:.2f} / {p:.2f} GiB ({(m - p) / p:+.1%})"
        for (tp, offload, rank), (m, p) in peaks.items()))
    report.note(f"Largest whole-run error: {max(abs(m - p) / p for m, p in peaks.values()):.1%}; median "
                f"{statistics.median(abs(m - p) / p for m, p in peaks.values()):.1%}.")
    return report.emit(args.json, args.md)


if __name__ == "__main__":
    main()
