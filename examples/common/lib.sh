# Shared helpers of the launch scripts (sourced, never run). Bash, positional arguments, one torchrun.
#
# mp_usage_check N "$#" USAGE  -> prints USAGE and exits 2 on -h/--help or a wrong argument count
# mp_paths MEGATRON_PATH MEGATRON_PATCH_PATH -> PYTHONPATH ('-' means the installed package)
# mp_launcher ENV NPROC_CPU    -> sets LAUNCH (torchrun command) for dsw (one machine) or dlc
#                                 (multi-node, from the variables DLC sets)
# mp_bool NAME VALUE           -> exits 2 unless VALUE is true or false
# mp_precision PR / mp_recompute AC -> PR_ARGS / AC_ARGS (the PR and AC arguments as flags)

mp_usage_check() {
  local want="$1" got="$2" usage="$3" first="${4:-}"
  if [ "$first" = "-h" ] || [ "$first" = "--help" ]; then
    printf '%s\n' "$usage"
    exit 2
  fi
  if [ "$got" -ne "$want" ]; then
    printf 'error: expected %s arguments, got %s\n%s\n' "$want" "$got" "$usage" >&2
    exit 2
  fi
}

mp_paths() {
  local megatron_path="$1" patch_path="$2"
  if [ "$megatron_path" != "-" ] && [ -n "$megatron_path" ]; then
    export PYTHONPATH="${megatron_path}${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ "$patch_path" != "-" ] && [ -n "$patch_path" ]; then
    export PYTHONPATH="${patch_path}${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

mp_gpu_count() {
  if [ "${MEGATRON_PATCH_DEVICE:-}" = "cpu" ]; then echo 0; return; fi
  python3 -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0
}

mp_launcher() {
  local env="$1" nproc_cpu="$2"
  local gpus
  gpus=$(mp_gpu_count)
  if [ "$gpus" -gt 0 ]; then
    NPROC=${NPROC_PER_NODE:-$gpus}
  else
    NPROC=${NPROC_PER_NODE:-$nproc_cpu}   # CPU: one process per TP x PP rank (more for data parallel)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  case "$env" in
    dsw)
      LAUNCH=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC") ;;
    dlc)
      NPROC=${KUBERNETES_CONTAINER_RESOURCE_GPU:-$NPROC}
      LAUNCH=(torchrun --nnodes "${WORLD_SIZE:?dlc needs WORLD_SIZE (number of nodes)}"
              --node-rank "${RANK:?dlc needs RANK (node rank)}"
              --master-addr "${MASTER_ADDR:?dlc needs MASTER_ADDR}"
              --master-port "${MASTER_PORT:?dlc needs MASTER_PORT}"
              --nproc-per-node "$NPROC") ;;
    *)
      echo "error: ENV must be dsw or dlc, got '$env'" >&2
      exit 2 ;;
  esac
  export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
  # torchrun sets RANK/WORLD_SIZE for its children; DLC's node-level values must not leak into them
  unset RANK WORLD_SIZE LOCAL_RANK
}

mp_bool() {  # mp_bool NAME VALUE -> validates true/false
  case "$2" in
    true|false) ;;
    *) echo "error: $1 must be true or false, got '$2'" >&2; exit 2 ;;
  esac
}

# mp_precision PR -> PR_ARGS (fp32 | fp16 | bf16)
mp_precision() {
  case "$1" in
    fp32) PR_ARGS=() ;;
    fp16) PR_ARGS=(--fp16) ;;
    bf16) PR_ARGS=(--bf16) ;;
    *) echo "error: PR must be fp32, fp16 or bf16, got '$1'" >&2; exit 2 ;;
  esac
}

# mp_recompute AC -> AC_ARGS (sel | full | none)
mp_recompute() {
  case "$1" in
    sel) AC_ARGS=(--recompute-activations) ;;
    full) AC_ARGS=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
    none) AC_ARGS=() ;;
    *) echo "error: AC must be sel, full or none, got '$1'" >&2; exit 2 ;;
  esac
}
