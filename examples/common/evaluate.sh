# Shared body of the run_evaluate_megatron_<family>.sh scripts (sourced, never run).
#
# mp_evaluate FAMILY "$@"  -> checks the 14 positional arguments, binds them to UPPERCASE variables
# and runs megatron_patch.training.finetune --eval-only under one torchrun line: the checkpoint's
# loss and perplexity (TASK=sft, default) or pairwise accuracy (TASK=reward) on a JSON set, printed
# and written to OUTPUT_BASEPATH/log/<run name>/<checkpoint folder name>/evaluation.json. The exit
# code survives the `| tee`.
HERE_EV="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE_EV/lib.sh"

mp_evaluate() {
  local family="$1"; shift
  local usage
  usage="usage: run_evaluate_megatron_${family}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP DATASET_PATH CHECKPOINT_PATH OUTPUT_BASEPATH
  ENV                  dsw (one machine) | dlc (multi-node: WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)
  MEGATRON_PATH        Megatron-LM checkout to put on PYTHONPATH, or - for the installed megatron-core
  MEGATRON_PATCH_PATH  megatron_patch checkout, or - for the installed package
  MODEL_SIZE           auto (from the checkpoint's config.json) or a ${family} size preset
  BATCH_SIZE           micro batch per device (samples per step: BATCH_SIZE x data-parallel size; a
                       tail smaller than that is left out)
  SEQ_LEN PAD_LEN      tokens kept per sample, row length (as in fine-tuning)
  EXTRA_VOCAB_SIZE     as the checkpoint was trained with
  PR                   fp32 | fp16 | bf16
  TP PP                tensor / pipeline parallel sizes (a legacy checkpoint loads at its own TP, any PP)
  DATASET_PATH         json/jsonl file or folder (SFT records; reward pairs with TASK=reward)
  CHECKPOINT_PATH      Megatron checkpoint folder (latest iteration), e.g. a run_finetune output
  OUTPUT_BASEPATH      console.log and evaluation.json go to OUTPUT_BASEPATH/log/<run name>/<checkpoint name>
environment: TASK (sft: lm loss and perplexity | reward: accuracy and chosen-rejected gap; default
  sft), TOKENIZER_PATH (default: the checkpoint's tokenizer files), NPROC_PER_NODE (default all
  GPUs, or TP x PP CPU processes), EXTRA_ARGS (e.g. --packing, --use-flash-attn)"
  mp_usage_check 14 "$#" "$usage" "${1:-}"

  ENV=$1; MEGATRON_PATH=$2; MEGATRON_PATCH_PATH=$3; MODEL_SIZE=$4; BATCH_SIZE=$5; SEQ_LEN=$6
  PAD_LEN=$7; EXTRA_VOCAB_SIZE=$8; PR=$9; TP=${10}; PP=${11}; DATASET_PATH=${12}
  CHECKPOINT_PATH=${13}; OUTPUT_BASEPATH=${14}
  TASK=${TASK:-sft}

  case "$TASK" in
    sft|reward) ;;
    *) echo "error: TASK must be sft or reward, got '$TASK'" >&2; exit 2 ;;
  esac
  mp_precision "$PR"
  mp_posint TP PP BATCH_SIZE

  mp_paths "$MEGATRON_PATH" "$MEGATRON_PATCH_PATH"
  mp_extra_args
  mp_launcher "$ENV" $((TP * PP))   # NPROC processes on each of NNODES nodes
  local dp=$((NPROC * NNODES / (TP * PP)))
  [ "$dp" -ge 1 ] || dp=1
  local gbs=$((BATCH_SIZE * dp))

  TOK_ARGS=()
  if [ -n "${TOKENIZER_PATH:-}" ]; then
    TOK_ARGS+=(--tokenizer-model "$TOKENIZER_PATH")
  fi
  local ckpt_name data_name
  ckpt_name=$(basename -- "${CHECKPOINT_PATH%/}")
  data_name=$(basename -- "${DATASET_PATH%/}")
  data_name=${data_name%.json*}
  # one folder per checkpoint under one per (task, family, data set, settings); names stay short
  NAME="evaluate-${TASK}-${family}-${data_name}-seqlen-${SEQ_LEN}-padlen-${PAD_LEN}-pr-${PR}-tp-${TP}-pp-${PP}"
  LOG_DIR="${OUTPUT_BASEPATH}/log/${NAME}/${ckpt_name}"
  mkdir -p -- "$LOG_DIR"

  set -x
  "${LAUNCH[@]}" -m megatron_patch.training.finetune --eval-only --task "$TASK" \
    --model-family "$family" --model-size "$MODEL_SIZE" \
    --pretrained-checkpoint "$CHECKPOINT_PATH" "${TOK_ARGS[@]}" \
    --valid-data "$DATASET_PATH" \
    --micro-batch-size "$BATCH_SIZE" --global-batch-size "$gbs" \
    --seq-length "$SEQ_LEN" --pad-len "$PAD_LEN" --extra-vocab-size "$EXTRA_VOCAB_SIZE" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    "${PR_ARGS[@]}" --log-dir "$LOG_DIR" \
    "${EXTRA[@]}" 2>&1 | tee -a "$LOG_DIR/console.log"
  { set +x; } 2>/dev/null
  echo "> results: $LOG_DIR/evaluation.json"
}
