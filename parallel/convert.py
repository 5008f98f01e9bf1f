"""Convert the published DiT .pt into safetensors next to it, once; with --quantize fp8, into its FP8 form.

    python -m parallel.convert weights/kandinsky4_distil_512.pt   # → weights/kandinsky4_distil_512.safetensors
    python -m parallel.convert weights/kandinsky4_distil_512.pt --quantize fp8   # → ….fp8.safetensors (6.4 GB)

Multi-rank runs then read each rank's slice of every tensor straight from the file. An FP8 file holds the
quantized layers' e4m3 weights and float32 `.weight_scale` rows (k4flash/fp8.py); a `dit.quantize=fp8` run finds
it beside the checkpoint and loads it as it is, each rank its slice, scales included.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from k4flash.fp8 import fp8_sibling, quantize_rows, quantized_layer_paths
from k4flash.geometry import validate_quantize
from k4flash.weights import CheckpointError, dit_size, read_checkpoint, safetensors_sibling


def quantized_state(state: dict, fp8_skip=()) -> dict:
    """The state dict with every FP8 layer's weight as e4m3 plus its `.weight_scale`; the rest as it was."""
    size = dit_size(state)
    if size is None:
        raise CheckpointError("not a DiT state dict: it has no text_embeddings.in_layer.weight or no blocks")
    validate_quantize("fp8", fp8_skip, size[0])
    out = dict(state)
    for layer in quantized_layer_paths(size[0], fp8_skip):
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = quantize_rows(state[f"{layer}.weight"])
    return out


def convert(pt_path, out_path=None, overwrite=False, quantize="none", fp8_skip=()) -> Path:
    pt_path = Path(pt_path)
    validate_quantize(quantize, fp8_skip, 1 << 30)  # the value now; the indices once the file's size is known
    default = fp8_sibling(pt_path) if quantize == "fp8" else safetensors_sibling(pt_path)
    out_path = Path(out_path) if out_path else default
    if out_path.exists() and not overwrite:
        return out_path  # cached
    state = read_checkpoint(pt_path)
    metadata = {"source": pt_path.name}
    if quantize == "fp8":
        state = quantized_state(state, tuple(fp8_skip))
        metadata.update(quantize="fp8", fp8_skip=json.dumps(list(fp8_skip)))
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _block_list(text: str) -> list:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of block indices, e.g. 0,-1") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the published kandinsky4_distil_512.pt (or its .safetensors)")
    parser.add_argument("--out", help="output path (default: next to the checkpoint, .safetensors or .fp8.safetensors)")
    parser.add_argument("--quantize", default="none", choices=("none", "fp8"),
                        help="fp8: e4m3 weights with per-channel scales for the blocks' attention and MLP")
    parser.add_argument("--fp8-skip", type=_block_list, default=[],
                        help="with --quantize fp8: blocks kept in bf16, as dit.fp8_skip (e.g. 0,-1; default none, "
                             "dit.fp8_skip's default)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, args.overwrite, args.quantize, args.fp8_skip))
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
