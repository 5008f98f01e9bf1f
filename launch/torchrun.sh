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

count_gpus() {
  # CUDA_VISIBLE_DEVICES restricts what the ranks can see; otherwise ask the driver.
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    local ids
    IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    local n=0 id
    for id in "${ids[@]}"; do [[ -n "${id// /}" && "$id" != "-1" && "$id" != "NoDevFiles" ]] && n=$((n + 1)); done
    echo "$n"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(count_gpus)"
  [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || NPROC_PER_NODE=1
fi
if [[ ! "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'" >&2
  exit 2
fi

exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" "$entry" "$@"
