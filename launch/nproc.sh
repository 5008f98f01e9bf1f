# Sourced by launch/torchrun.sh and launch/slurm.sbatch: how many ranks to start on this node.
#
# set_nproc_per_node NAME [--ask-driver]
#   NPROC_PER_NODE as given, else the GPUs this node may use, else 1; a malformed value stops the
#   script NAME with exit status 2. The GPUs: SLURM_GPUS_ON_NODE (what SLURM allocated), else the
#   entries of CUDA_VISIBLE_DEVICES (when set, even empty), else, with --ask-driver, nvidia-smi -L.

count_gpus() {
  if [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[0-9]+$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    local ids id n=0
    IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    for id in "${ids[@]}"; do [[ -n "${id// /}" && "$id" != "-1" && "$id" != "NoDevFiles" ]] && n=$((n + 1)); done
    echo "$n"
  elif [[ "${1:-}" == --ask-driver ]] && command -v nvidia-smi >/dev/null 2>&1; then
    { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

set_nproc_per_node() {
  local name="$1"
  if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(count_gpus "${2:-}")"
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || NPROC_PER_NODE=1
  fi
  if [[ ! "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
    echo "$name: NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'" >&2
    exit 2
  fi
}
