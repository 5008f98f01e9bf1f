#!/usr/bin/env bash
# Run k4flash on one node with torchrun: one rank per GPU (NCCL), or NPROC_PER_NODE ranks on CPU (gloo).
#
#   launch/torchrun.sh prompt="a red fox in the snow" save_path=fox.mp4        # every GPU of this node
#   NPROC_PER_NODE=2 launch/torchrun.sh model=tiny time_length=0 save_path=x.mp4   # 2 ranks, e.g. on CPU
#   NPROC_PER_NODE=4 launch/torchrun.sh model=tiny prompts_file=prompts.txt output_dir=out
#
# Every argument is a Hydra override for run_inference_distil.py, passed through untouched.
# Relative paths in overrides are relative to the current directory, as with a plain
# `python run_inference_distil.py`; the script itself is found next to this launcher.
# NPROC_PER_NODE: ranks on this node (default: the visible GPUs, else 1).
# The rendezvous runs on localhost, on a free port that torchrun picks (--standalone).
set -euo pipefail

root="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/.." && pwd)"
entry="$root/run_inference_distil.py"
if [[ ! -f "$entry" ]]; then
  echo "launch/torchrun.sh: $entry not found" >&2
  exit 2
fi

# shellcheck source=launch/nproc.sh
source "$root/launch/nproc.sh"
set_nproc_per_node launch/torchrun.sh --ask-driver

# torchrun through launch.torchrun: the same launcher, but it exits with the ranks' documented status
# (0/1/2/3/130/143, README "When things go wrong") and leaves torchrun's failure report off the screen.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m launch.torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
  "$entry" "$@"
