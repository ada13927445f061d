# Shared body of the run_pretrain_megatron_<family>.sh scripts (sourced, never run).
#
# mp_pretrain FAMILY "SIZES" "$@" -> checks the 23 positional arguments, binds them to UPPERCASE
# variables and runs megatron_patch.training.pretrain (continued pretraining from a Megatron
# checkpoint, or from scratch) on a .bin/.idx dataset under one torchrun line. SIZES is the family's
# size presets for the usage text. Outputs go to OUTPUT_BASEPATH/{checkpoint,tensorboard,log}/<run
# name>; the run's checkpoint folder is both --save and --load, so rerunning the same command resumes.
# The job's exit code survives the `| tee` into console.log (pipefail).
HERE_PT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE_PT/lib.sh"

mp_pretrain() {
  local family="$1" sizes="$2"; shift 2
  local usage
  usage="usage: run_pretrain_megatron_${family}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
  ENV                      dsw (one machine) | dlc (multi-node: WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)
  MEGATRON_PATH            Megatron-LM checkout to put on PYTHONPATH, or - for the installed megatron-core
  MEGATRON_PATCH_PATH      megatron_patch checkout, or - for the installed package
  MODEL_SIZE               ${sizes} | auto (from the checkpoint)
  BATCH_SIZE GLOBAL_BATCH_SIZE   micro batch per device, global batch
  LR MIN_LR SEQ_LEN EXTRA_VOCAB_SIZE
  PR                       fp32 | fp16 | bf16
  TP PP                    tensor / pipeline parallel sizes
  AC                       sel | full | none (activation recompute)
  DO FL SP                 true|false: distributed optimizer, flash attention, sequence parallel
  SAVE_INTERVAL            iterations between checkpoints (0: one checkpoint at the end only)
  DATASET_PATH             .bin/.idx prefix (or 'W1 P1 W2 P2' for a blend)
  PRETRAIN_CHECKPOINT_PATH Megatron checkpoint to start from, or none (from scratch)
  TRAIN_TOKENS WARMUP_TOKENS  iterations = TRAIN_TOKENS / (GLOBAL_BATCH_SIZE x SEQ_LEN)
  OUTPUT_BASEPATH          outputs go to OUTPUT_BASEPATH/{checkpoint,tensorboard,log}/<run name>
environment: TOKENIZER_PATH (HF tokenizer folder or sentencepiece .model; default: the checkpoint's),
  EP (expert parallel size of MoE models, default 1), NPROC_PER_NODE (processes per node; default
  all GPUs, or TP x PP x EP CPU processes), EXTRA_ARGS"
  mp_usage_check 23 "$#" "$usage" "${1:-}"

  ENV=$1; MEGATRON_PATH=$2; MEGATRON_PATCH_PATH=$3; MODEL_SIZE=$4; BATCH_SIZE=$5
  GLOBAL_BATCH_SIZE=$6; LR=$7; MIN_LR=$8; SEQ_LEN=$9; EXTRA_VOCAB_SIZE=${10}; PR=${11}; TP=${12}
  PP=${13}; AC=${14}; DO=${15}; FL=${16}; SP=${17}; SAVE_INTERVAL=${18}; DATASET_PATH=${19}
  PRETRAIN_CHECKPOINT_PATH=${20}; TRAIN_TOKENS=${21}; WARMUP_TOKENS=${22}; OUTPUT_BASEPATH=${23}
  EP=${EP:-1}

  local v
  mp_posint TP PP EP BATCH_SIZE GLOBAL_BATCH_SIZE SEQ_LEN TRAIN_TOKENS
  mp_nonneg EXTRA_VOCAB_SIZE SAVE_INTERVAL WARMUP_TOKENS
  for v in DO FL SP; do mp_bool "$v" "${!v}"; done
  mp_precision "$PR"
  mp_recompute "$AC"

  mp_paths "$MEGATRON_PATH" "$MEGATRON_PATCH_PATH"
  mp_extra_args
  mp_launcher "$ENV" $((TP * PP * EP))

  OPT_ARGS=()
  [ "$DO" = true ] && OPT_ARGS+=(--use-distributed-optimizer)
  [ "$FL" = true ] && OPT_ARGS+=(--use-flash-attn)
  [ "$SP" = true ] && [ "$TP" -gt 1 ] && OPT_ARGS+=(--sequence-parallel)
  [ "$EP" -gt 1 ] && OPT_ARGS+=(--expert-model-parallel-size "$EP")

  CKPT_ARGS=()
  if [ "$PRETRAIN_CHECKPOINT_PATH" != none ]; then
    CKPT_ARGS+=(--pretrained-checkpoint "$PRETRAIN_CHECKPOINT_PATH")
  fi
  if [ -n "${TOKENIZER_PATH:-}" ]; then
    CKPT_ARGS+=(--tokenizer-model "$TOKENIZER_PATH")
  fi

  NAME="pretrain-megatron-${family}-${MODEL_SIZE}-lr-${LR}-minlr-${MIN_LR}-bs-${BATCH_SIZE}-gbs-${GLOBAL_BATCH_SIZE}-seqlen-${SEQ_LEN}-pr-${PR}-tp-${TP}-pp-${PP}-ac-${AC}-do-${DO}-sp-${SP}"
  [ "$EP" -gt 1 ] && NAME="${NAME}-expp-${EP}"
  CHECKPOINT_DIR="${OUTPUT_BASEPATH}/checkpoint/${NAME}"
  TENSORBOARD_DIR="${OUTPUT_BASEPATH}/tensorboard/${NAME}"
  LOG_DIR="${OUTPUT_BASEPATH}/log/${NAME}"
  mkdir -p -- "$CHECKPOINT_DIR" "$TENSORBOARD_DIR" "$LOG_DIR"

  # shellcheck disable=SC2206  # DATASET_PATH may be a blend: split it on purpose
  DATA_ARGS=(--data-path $DATASET_PATH --split 99,1,0)

  set -x
  "${LAUNCH[@]}" -m megatron_patch.training.pretrain \
    --model-family "$family" --model-size "$MODEL_SIZE" \
    --micro-batch-size "$BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
    --seq-length "$SEQ_LEN" --extra-vocab-size "$EXTRA_VOCAB_SIZE" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    "${PR_ARGS[@]}" "${AC_ARGS[@]}" "${OPT_ARGS[@]}" "${CKPT_ARGS[@]}" "${DATA_ARGS[@]}" \
    --train-tokens "$TRAIN_TOKENS" --lr-warmup-tokens "$WARMUP_TOKENS" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 \
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval "$SAVE_INTERVAL" \
    --log-interval 1 --eval-interval 10000 --eval-iters 10 \
    --tensorboard-dir "$TENSORBOARD_DIR" --log-dir "$LOG_DIR" \
    "${EXTRA[@]}" 2>&1 | tee -a "$LOG_DIR/console.log"
  { set +x; } 2>/dev/null
  echo "> checkpoint: $CHECKPOINT_DIR"
  echo "> logs: $LOG_DIR (console.log, metrics.jsonl)"
}
