#!/usr/bin/env bash
# PPO / GRPO from a folder of RLHF YAML files (rlhf.yaml + one file per model; docs/rlhf.md), every
# role on every listed device: bash examples/rlhf/run_rlhf.sh 0,1,2,3,4,5,6,7 [CONFIG_DIR]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=../common/lib.sh
source "$ROOT/examples/common/lib.sh"

USAGE="usage: $(basename "$0") DEVICES [CONFIG_DIR]
  DEVICES     comma-separated device ids of this machine, e.g. 0,1,2,3,4,5,6,7: with GPUs they become
              CUDA_VISIBLE_DEVICES (one process each); without GPUs, their count is the number of CPU processes
  CONFIG_DIR  folder with rlhf.yaml and its model files (default: \$CONFIG_DIR, else examples/rlhf/configs/llama2)
environment:
  the variables the config folder reads (examples: POLICY_LOAD, REWARD_LOAD, DATASET_PATH, TOKENIZER_MODEL
  or VOCAB_FILE, exp_name, OUTPUT_DIR, TP, PP, ...; see docs/rlhf.md)
  NUM_DEVICE (the DEVICES count x nodes: every role's num_device), BF16 (true with GPUs, false without)
  ENV (dsw: one machine | dlc: multi-node from WORLD_SIZE (nodes), RANK, MASTER_ADDR, MASTER_PORT)
  MEGATRON_PATH (-: the installed megatron-core) MEGATRON_PATCH_PATH (this checkout)
outputs: under the config's rlhf.output_dir: the ppo_policy / ppo_value checkpoints, rlhf_state.json,
  log/metrics.jsonl (one record per episode), log/console.log, tensorboard/; rerunning resumes"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  printf '%s\n' "$USAGE"
  exit 2
fi
if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
  printf 'error: expected 1 or 2 arguments, got %s\n%s\n' "$#" "$USAGE" >&2
  exit 2
fi
DEVICES=$1
if ! [[ "$DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "error: DEVICES must be comma-separated device ids like 0,1,2,3, got '$DEVICES'" >&2
  exit 2
fi
CONFIG_DIR=${2:-${CONFIG_DIR:-$ROOT/examples/rlhf/configs/llama2}}
if [ ! -f "$CONFIG_DIR/rlhf.yaml" ]; then
  echo "error: no rlhf.yaml in CONFIG_DIR '$CONFIG_DIR'" >&2
  exit 2
fi
IFS=, read -r -a DEVICE_LIST <<< "$DEVICES"
DUP=$(printf '%s\n' "${DEVICE_LIST[@]}" | sort | uniq -d | head -1)
if [ -n "$DUP" ]; then
  echo "error: DEVICES lists device $DUP twice ('$DEVICES'): one process per device" >&2
  exit 2
fi
COUNT=${#DEVICE_LIST[@]}
ENV=${ENV:-dsw}

mp_paths "${MEGATRON_PATH:--}" "${MEGATRON_PATCH_PATH:-$ROOT}"
if [ "$(mp_gpu_count)" -gt 0 ]; then
  export CUDA_VISIBLE_DEVICES=$DEVICES
  export BF16=${BF16:-true}
else
  export BF16=${BF16:-false}
fi
mp_bool BF16 "$BF16"
export NPROC_PER_NODE=$COUNT
mp_launcher "$ENV" "$COUNT"   # NNODES: 1, or DLC's WORLD_SIZE (then unset for torchrun's children)
WORLD=$((COUNT * NNODES))   # the processes this job starts: what the pre-flight checks against
export NUM_DEVICE=${NUM_DEVICE:-$WORLD}

# pre-flight: the whole configuration, the checkpoints and the reward function, before torchrun
# (one error line, exit 2); prints the output folder
OUT=$(python3 -m megatron_patch.rlhf.run --check --world-size "$WORLD" "$CONFIG_DIR/rlhf.yaml")
mkdir -p "$OUT/log"
echo "$(basename "$0"): $CONFIG_DIR/rlhf.yaml on devices $DEVICES ($WORLD process(es) in all), outputs in $OUT"
set -x
"${LAUNCH[@]}" -m megatron_patch.rlhf.run "$CONFIG_DIR/rlhf.yaml" 2>&1 | tee -a "$OUT/log/console.log"
