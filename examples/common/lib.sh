# Shared helpers of the launch scripts (sourced, never run). Bash, positional arguments, one torchrun.
#
# mp_usage_check N "$#" USAGE  -> prints USAGE and exits 2 on -h/--help or a wrong argument count
# mp_paths MEGATRON_PATH MEGATRON_PATCH_PATH -> PYTHONPATH ('-' means the installed package)
# mp_launcher ENV NPROC_CPU    -> sets LAUNCH (torchrun command), NPROC (processes on this node),
#                                 NNODES and NODE_RANK for dsw (one machine) or dlc (multi-node,
#                                 from WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT that DLC sets;
#                                 a missing or bad one is one error line, exit 2)
# mp_bool NAME VALUE           -> exits 2 unless VALUE is true or false
# mp_precision PR / mp_recompute AC -> PR_ARGS / AC_ARGS (the PR and AC arguments as flags)
# mp_posint NAME... / mp_nonneg NAME... -> exits 2 unless each variable is a number > 0 / >= 0

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

mp_dlc_nodes() {  # checks what DLC sets for ENV=dlc -> NNODES, NODE_RANK (one error line, exit 2)
  local v
  for v in WORLD_SIZE RANK MASTER_ADDR MASTER_PORT; do
    if [ -z "${!v:-}" ]; then
      echo "error: ENV=dlc needs $v (set by DLC: WORLD_SIZE = nodes, RANK = node rank, MASTER_ADDR, MASTER_PORT)" >&2
      exit 2
    fi
  done
  if ! [[ "$WORLD_SIZE" =~ ^[1-9][0-9]*$ ]] || ! [[ "$RANK" =~ ^[0-9]+$ ]] || [ "$RANK" -ge "$WORLD_SIZE" ]; then
    echo "error: ENV=dlc needs a node RANK in 0..WORLD_SIZE-1, got RANK='$RANK' WORLD_SIZE='$WORLD_SIZE'" >&2
    exit 2
  fi
  if ! [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || [ "$MASTER_PORT" -lt 1 ] || [ "$MASTER_PORT" -gt 65535 ]; then
    echo "error: ENV=dlc needs MASTER_PORT to be a port number, got '$MASTER_PORT'" >&2
    exit 2
  fi
  NNODES=$WORLD_SIZE
  NODE_RANK=$RANK
}

mp_launcher() {  # -> LAUNCH, NPROC (processes on this node), NNODES, NODE_RANK
  local env="$1" nproc_cpu="$2"
  local gpus
  case "$env" in
    dsw) NNODES=1; NODE_RANK=0 ;;
    dlc) mp_dlc_nodes ;;
    *)
      echo "error: ENV must be dsw or dlc, got '$env'" >&2
      exit 2 ;;
  esac
  gpus=$(mp_gpu_count)
  if [ "$gpus" -gt 0 ]; then
    # dlc: the node's GPUs as DLC counts them (KUBERNETES_CONTAINER_RESOURCE_GPU), else the visible ones
    if [ "$env" = dlc ] && [[ "${KUBERNETES_CONTAINER_RESOURCE_GPU:-}" =~ ^[1-9][0-9]*$ ]]; then
      gpus=$KUBERNETES_CONTAINER_RESOURCE_GPU
    fi
    NPROC=${NPROC_PER_NODE:-$gpus}
  else
    # CPU: one process per TP x PP rank (more for data parallel); DLC's GPU count means nothing here
    NPROC=${NPROC_PER_NODE:-$nproc_cpu}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC_PER_NODE must be a positive number of processes, got '$NPROC'" >&2
    exit 2
  fi
  case "$env" in
    dsw)
      LAUNCH=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC") ;;
    dlc)
      LAUNCH=(torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK"
              --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
              --nproc-per-node "$NPROC") ;;
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

mp_posint() {  # mp_posint NAME... -> each variable must be a positive whole number (exit 2)
  local v
  for v in "$@"; do
    if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
      echo "error: $v must be a positive number, got '${!v}'" >&2
      exit 2
    fi
  done
}

mp_nonneg() {  # mp_nonneg NAME... -> each variable must be a whole number >= 0 (exit 2)
  local v
  for v in "$@"; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
      echo "error: $v must be a whole number >= 0, got '${!v}'" >&2
      exit 2
    fi
  done
}

# mp_extra_args -> EXTRA: EXTRA_ARGS split as a shell splits a command line (quotes group words:
# EXTRA_ARGS="--stop '### End'" is two arguments), without glob expansion or command substitution
mp_extra_args() {
  EXTRA=()
  [ -n "${EXTRA_ARGS:-}" ] || return 0
  local split='import shlex, sys
sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))'
  if ! python3 -c "$split" "$EXTRA_ARGS" > /dev/null 2>&1; then
    echo "error: EXTRA_ARGS is not a valid argument list (unbalanced quotes?): $EXTRA_ARGS" >&2
    exit 2
  fi
  mapfile -d '' -t EXTRA < <(python3 -c "$split" "$EXTRA_ARGS")
}
