# Shared body of the tutorial scripts step1_sft/*.sh and step2_reward/*.sh (sourced, never run).
#
# The tutorials are configured by environment variables only; rlhf_run turns them into the 22
# positional arguments of examples/<family>/run_finetune_megatron_<family>.sh (TASK=sft or reward)
# and runs it. Outputs: ${OUTPUT_DIR:-output}/step1_sft or .../step2_reward, each holding
# {checkpoint,tensorboard,log}/<run name>, relative to the current directory.
HERE_RLHF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_RLHF="$(cd "$HERE_RLHF/../.." && pwd)"
# shellcheck source=../common/lib.sh
source "$ROOT_RLHF/examples/common/lib.sh"

RLHF_OPTIONAL="optional (default):
  ENV (dsw) MEGATRON_PATH (-) MEGATRON_PATCH_PATH (this checkout)
  TP (1) PP (1) BATCH_SIZE (sft 2, reward 1: pairs per micro batch)
  GLOBAL_BATCH_SIZE (BATCH_SIZE x data-parallel size) EPOCHS (sft 2, reward 1)
  LR MIN_LR (sft 1e-5 1e-6, reward 5e-6 5e-7) SEQ_LEN (2048) PAD_LEN (SEQ_LEN)
  EXTRA_VOCAB_SIZE (0) PR (bf16 with GPUs, fp32 without) AC (sel) DO (true) FL (true) SP (false)
  VALID_DATASET_PATH (none) OUTPUT_DIR (output) REWARD_MARGIN (0, reward)
  and those of run_finetune_megatron_<family>.sh: PACKING, SAVE_INTERVAL, NPROC_PER_NODE, EXTRA_ARGS
outputs: \$OUTPUT_DIR/step1_sft or \$OUTPUT_DIR/step2_reward, each with {checkpoint,tensorboard,log}/<run name>;
  rerunning the same command resumes"

rlhf_require() {  # rlhf_require VAR ...  -> one-line error naming the first unset one, exit 2
  local v
  for v in "$@"; do
    if [ -z "${!v:-}" ]; then
      echo "error: $v is not set (run with -h for the variables)" >&2
      exit 2
    fi
  done
}

rlhf_run() {  # rlhf_run sft|reward FAMILY TOKENIZER SCRIPT_NAME
  local step=$1 family=$2 tokenizer=$3 script=$4 stepdir
  case "$step" in
    sft) stepdir=step1_sft
         MODEL_SIZE=${MODEL_SIZE:?}; BATCH_SIZE=${BATCH_SIZE:-2}; EPOCHS=${EPOCHS:-2}
         LR=${LR:-1e-5}; MIN_LR=${MIN_LR:-1e-6} ;;
    reward) stepdir=step2_reward
         MODEL_SIZE=${MODEL_SIZE:-auto}; BATCH_SIZE=${BATCH_SIZE:-1}; EPOCHS=${EPOCHS:-1}
         LR=${LR:-5e-6}; MIN_LR=${MIN_LR:-5e-7}; REWARD_MARGIN=${REWARD_MARGIN:-0} ;;
    *) echo "error: rlhf_run: unknown step '$step'" >&2; exit 2 ;;
  esac
  ENV=${ENV:-dsw}; MEGATRON_PATH=${MEGATRON_PATH:--}; MEGATRON_PATCH_PATH=${MEGATRON_PATCH_PATH:-$ROOT_RLHF}
  TP=${TP:-1}; PP=${PP:-1}; SEQ_LEN=${SEQ_LEN:-2048}; PAD_LEN=${PAD_LEN:-$SEQ_LEN}
  EXTRA_VOCAB_SIZE=${EXTRA_VOCAB_SIZE:-0}; AC=${AC:-sel}; DO=${DO:-true}; FL=${FL:-true}
  SP=${SP:-false}; VALID_DATASET_PATH=${VALID_DATASET_PATH:-none}; OUTPUT_DIR=${OUTPUT_DIR:-output}
  if [ -z "${PR:-}" ]; then
    if [ "$(mp_gpu_count)" -gt 0 ]; then PR=bf16; else PR=fp32; fi
  fi

  echo "$script: $step of a $family model; settings:"
  local v
  for v in MODEL_SIZE LOAD_PATH DATASET_PATH VALID_DATASET_PATH ENV MEGATRON_PATH \
           MEGATRON_PATCH_PATH TP PP BATCH_SIZE GLOBAL_BATCH_SIZE EPOCHS LR MIN_LR SEQ_LEN PAD_LEN \
           EXTRA_VOCAB_SIZE PR AC DO FL SP REWARD_MARGIN OUTPUT_DIR; do
    if [ "$v" = REWARD_MARGIN ] && [ "$step" != reward ]; then continue; fi
    if [ "$v" = GLOBAL_BATCH_SIZE ] && [ -z "${GLOBAL_BATCH_SIZE:-}" ]; then
      echo "  GLOBAL_BATCH_SIZE=(BATCH_SIZE x data-parallel size)"; continue
    fi
    echo "  $v=${!v}"
  done
  echo "  tokenizer: $tokenizer"

  export TASK=$step TOKENIZER_PATH=$tokenizer
  [ "$step" = reward ] && export REWARD_MARGIN
  exec bash "$ROOT_RLHF/examples/$family/run_finetune_megatron_$family.sh" \
    "$ENV" "$MEGATRON_PATH" "$MEGATRON_PATCH_PATH" "$MODEL_SIZE" "$BATCH_SIZE" "$LR" "$MIN_LR" \
    "$SEQ_LEN" "$PAD_LEN" "$EXTRA_VOCAB_SIZE" "$PR" "$TP" "$PP" "$AC" "$DO" "$FL" "$SP" \
    "$DATASET_PATH" "$VALID_DATASET_PATH" "$LOAD_PATH" "$EPOCHS" "$OUTPUT_DIR/$stepdir"
}
