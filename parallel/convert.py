"""Convert the published DiT .pt into safetensors next to it, once.

    python -m parallel.convert weights/kandinsky4_distil_512.pt   # → weights/kandinsky4_distil_512.safetensors

Multi-rank runs then read each rank's slice of every tensor straight from the file.
"""
import argparse
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from k4flash.weights import CheckpointError, read_checkpoint, safetensors_sibling


def convert(pt_path, out_path=None, overwrite=False) -> Path:
    pt_path = Path(pt_path)
    out_path = Path(out_path) if out_path else safetensors_sibling(pt_path)
    if out_path.exists() and not overwrite:
        return out_path  # cached
    state = read_checkpoint(pt_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source": pt_path.name})
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the published kandinsky4_distil_512.pt")
    parser.add_argument("--out", help="output path (default: next to the checkpoint, .safetensors)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, args.overwrite))
    except (CheckpointError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
