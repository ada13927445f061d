# Shared body of the run_finetune_megatron_<family>.sh scripts (sourced, never run).
#
# mp_finetune FAMILY "$@"  -> checks the 22 positional arguments, binds them to UPPERCASE variables
# and runs megatron_patch.training.finetune (TASK=sft, the default, or TASK=reward) under one
# torchrun line. Outputs go to OUTPUT_BASEPATH/{checkpoint,tensorboard,log}/<run name>; the run's
# checkpoint folder is both --save and --load, so rerunning the same command resumes. The job's
# exit code survives the `| tee` into console.log.
HERE_FT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE_FT/lib.sh"

mp_finetune() {
  local family="$1"; shift
  local usage
  usage="usage: run_finetune_megatron_${family}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
  ENV                      dsw (one machine) | dlc (multi-node: WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)
  MEGATRON_PATH            Megatron-LM checkout to put on PYTHONPATH, or - for the installed megatron-core
  MEGATRON_PATCH_PATH      megatron_patch checkout, or - for the installed package
  MODEL_SIZE               a ${family} size preset (7B, ..., tiny) or auto (from the checkpoint's config.json;
                           a checkpoint that carries config.json always defines the architecture)
  BATCH_SIZE               micro batch per device (global batch: \$GLOBAL_BATCH_SIZE, default
                           BATCH_SIZE x data-parallel size, i.e. no gradient accumulation)
  LR MIN_LR                cosine decay from LR to MIN_LR over all epochs
  SEQ_LEN                  tokens kept per sample (prompt + response, cut at the end)
  PAD_LEN                  row length samples are padded to (>= SEQ_LEN; with PACKING=true the packed row length)
  EXTRA_VOCAB_SIZE         rows added to the tokenizer's vocabulary before padding
  PR                       fp32 | fp16 | bf16 (fp32 on CPU)
  TP PP                    tensor / pipeline parallel sizes
  AC                       sel | full | none (activation recompute)
  DO FL SP                 true|false: distributed optimizer, flash attention, sequence parallel
  TRAIN_DATASET_PATH       json/jsonl file or folder: SFT {query, response} / Alpaca / chat messages;
                           reward {prompt, chosen, rejected} or {query, response, score} lists
  VALID_DATASET_PATH       the same for validation (after every epoch), or none
  PRETRAIN_CHECKPOINT_PATH Megatron checkpoint whose weights start the run, or none (from scratch)
  EPOCH                    passes over the training set
  OUTPUT_BASEPATH          outputs go to OUTPUT_BASEPATH/{checkpoint,tensorboard,log}/<run name>
environment: TASK (sft | reward, default sft), TOKENIZER_PATH (HF tokenizer folder or sentencepiece
  .model; default: the checkpoint's tokenizer files), GLOBAL_BATCH_SIZE, PACKING (true|false, SFT),
  REWARD_MARGIN (reward, default 0), SAVE_INTERVAL (iterations; default: every epoch; 0: at the
  end only), EP (expert parallel size of MoE models, default 1), NPROC_PER_NODE (processes per
  node; default all GPUs, or TP x PP x EP CPU processes), EXTRA_ARGS"
  mp_usage_check 22 "$#" "$usage" "${1:-}"

  ENV=$1; MEGATRON_PATH=$2; MEGATRON_PATCH_PATH=$3; MODEL_SIZE=$4; BATCH_SIZE=$5; LR=$6
  MIN_LR=$7; SEQ_LEN=$8; PAD_LEN=$9; EXTRA_VOCAB_SIZE=${10}; PR=${11}; TP=${12}; PP=${13}
  AC=${14}; DO=${15}; FL=${16}; SP=${17}; TRAIN_DATASET_PATH=${18}; VALID_DATASET_PATH=${19}
  PRETRAIN_CHECKPOINT_PATH=${20}; EPOCH=${21}; OUTPUT_BASEPATH=${22}
  TASK=${TASK:-sft}
  PACKING=${PACKING:-false}
  EP=${EP:-1}

  case "$TASK" in
    sft|reward) ;;
    *) echo "error: TASK must be sft or reward, got '$TASK'" >&2; exit 2 ;;
  esac
  for v in DO FL SP PACKING; do mp_bool "$v" "${!v}"; done
  mp_precision "$PR"
  mp_recompute "$AC"

  mp_paths "$MEGATRON_PATH" "$MEGATRON_PATCH_PATH"
  mp_extra_args
  mp_posint TP PP EP BATCH_SIZE SEQ_LEN PAD_LEN EPOCH
  mp_nonneg EXTRA_VOCAB_SIZE
  [ -z "${GLOBAL_BATCH_SIZE:-}" ] || mp_posint GLOBAL_BATCH_SIZE
  [ -z "${SAVE_INTERVAL:-}" ] || mp_nonneg SAVE_INTERVAL
  mp_launcher "$ENV" $((TP * PP * EP))   # NPROC processes on each of NNODES nodes
  # global batch: BATCH_SIZE x data-parallel size (one micro batch per replica, no accumulation)
  # unless GLOBAL_BATCH_SIZE says otherwise
  local dp=$((NPROC * NNODES / (TP * PP)))
  [ "$dp" -ge 1 ] || dp=1  # too few processes for TP x PP: the entry point says so
  GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$((BATCH_SIZE * dp))}

  OPT_ARGS=()
  [ "$DO" = true ] && OPT_ARGS+=(--use-distributed-optimizer)
  [ "$FL" = true ] && OPT_ARGS+=(--use-flash-attn)
  [ "$SP" = true ] && [ "$TP" -gt 1 ] && OPT_ARGS+=(--sequence-parallel)
  [ "$EP" -gt 1 ] && OPT_ARGS+=(--expert-model-parallel-size "$EP")
  TASK_ARGS=(--task "$TASK")
  [ "$PACKING" = true ] && TASK_ARGS+=(--packing)
  [ "$TASK" = reward ] && TASK_ARGS+=(--reward-margin "${REWARD_MARGIN:-0}")

  CKPT_ARGS=()
  if [ "$PRETRAIN_CHECKPOINT_PATH" != none ]; then
    CKPT_ARGS+=(--pretrained-checkpoint "$PRETRAIN_CHECKPOINT_PATH")
  fi
  if [ -n "${TOKENIZER_PATH:-}" ]; then
    CKPT_ARGS+=(--tokenizer-model "$TOKENIZER_PATH")
  fi
  [ -n "${SAVE_INTERVAL:-}" ] && CKPT_ARGS+=(--save-interval "$SAVE_INTERVAL")
  DATA_ARGS=(--train-data "$TRAIN_DATASET_PATH")
  if [ "$VALID_DATASET_PATH" != none ]; then
    DATA_ARGS+=(--valid-data "$VALID_DATASET_PATH")
  fi

  NAME="${TASK}-megatron-${family}-${MODEL_SIZE}-lr-${LR}-minlr-${MIN_LR}-bs-${BATCH_SIZE}-gbs-${GLOBAL_BATCH_SIZE}-seqlen-${SEQ_LEN}-padlen-${PAD_LEN}-pr-${PR}-tp-${TP}-pp-${PP}-ac-${AC}-do-${DO}-sp-${SP}-ep-${EPOCH}"
  [ "$PACKING" = true ] && NAME="${NAME}-packing"
  [ "$EP" -gt 1 ] && NAME="${NAME}-expp-${EP}"
  CHECKPOINT_DIR="${OUTPUT_BASEPATH}/checkpoint/${NAME}"
  TENSORBOARD_DIR="${OUTPUT_BASEPATH}/tensorboard/${NAME}"
  LOG_DIR="${OUTPUT_BASEPATH}/log/${NAME}"
  mkdir -p -- "$CHECKPOINT_DIR" "$TENSORBOARD_DIR" "$LOG_DIR"

  set -x
  "${LAUNCH[@]}" -m megatron_patch.training.finetune \
    --model-family "$family" --model-size "$MODEL_SIZE" "${TASK_ARGS[@]}" \
    --micro-batch-size "$BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
    --seq-length "$SEQ_LEN" --pad-len "$PAD_LEN" --extra-vocab-size "$EXTRA_VOCAB_SIZE" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    "${PR_ARGS[@]}" "${AC_ARGS[@]}" "${OPT_ARGS[@]}" "${CKPT_ARGS[@]}" "${DATA_ARGS[@]}" \
    --epochs "$EPOCH" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 \
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" \
    --log-interval 1 --tensorboard-dir "$TENSORBOARD_DIR" --log-dir "$LOG_DIR" \
    "${EXTRA[@]}" 2>&1 | tee -a "$LOG_DIR/console.log"
  { set +x; } 2>/dev/null
  echo "> checkpoint: $CHECKPOINT_DIR"
  echo "> logs: $LOG_DIR (console.log, metrics.jsonl)"
}
