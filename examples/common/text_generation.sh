# Shared body of the run_text_generation_megatron_<family>.sh scripts (sourced, never run).
#
# mp_text_generation FAMILY "$@"  -> checks the 17 positional arguments, binds them to UPPERCASE
# variables and runs megatron_patch.generation.cli under one torchrun line (TP x PP ranks per replica;
# on a machine without GPUs, TP CPU processes). Exit code preserved through `| tee` into
# OUTPUT_FILE.log (with ENV=dlc, node N > 0 writes OUTPUT_FILE.nodeN.log).
HERE_TG="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE_TG/lib.sh"

mp_text_generation() {
  local family="$1"; shift
  local usage
  usage="usage: run_text_generation_megatron_${family}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH TOKENIZER CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY
  ENV                  dsw (one machine, all local devices) | dlc (multi-node: WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT)
  MEGATRON_PATH        Megatron-LM checkout to put on PYTHONPATH, or - for the installed megatron-core
  MEGATRON_PATCH_PATH  megatron_patch checkout, or - for the installed package
  TOKENIZER            HF tokenizer folder, sentencepiece .model, a key under \$TOKENIZER_PATH (llamabpe, bloombpe, qwenbpe, gpt2bpe, glmbpe, falconbpe), or - / none for the checkpoint's own tokenizer files
  CHECKPOINT_PATH      legacy Megatron checkpoint (release or latest iteration); resharded when saved at another TP
  MODEL_SIZE           auto (from the checkpoint's config.json) or a ${family} size preset
  TP                   tensor parallel size (CPU: TP processes)
  BS                   prompts per batch
  SEQ_LEN              prompt + generated tokens
  TOP_K                1 = greedy, 0 = off
  INPUT_SEQ_LEN        longest prompt in tokens (cut from the left; 0 = SEQ_LEN - OUTPUT_SEQ_LEN)
  OUTPUT_SEQ_LEN       new tokens per prompt
  INPUT_FILE           one prompt per line, or jsonl with 'query'
  OUTPUT_FILE          one completion per line (newlines as \\n), or jsonl with 'query' and 'response'
  TOP_P                0 = off
  TEMPERATURE          0 = greedy
  REPETITION_PENALTY   1.0 = off
environment: PP (pipeline stages, default 1), NPROC_PER_NODE (default: all GPUs, or TP x PP CPU
  processes; a multiple of TP x PP runs data-parallel replicas), EXTRA_ARGS (e.g. '--chat --stop ###'
  --seed N --no-flash --precision bf16)"
  mp_usage_check 17 "$#" "$usage" "${1:-}"

  ENV=$1; MEGATRON_PATH=$2; MEGATRON_PATCH_PATH=$3; TOKENIZER=$4; CHECKPOINT_PATH=$5
  MODEL_SIZE=$6; TP=$7; BS=$8; SEQ_LEN=$9; TOP_K=${10}; INPUT_SEQ_LEN=${11}; OUTPUT_SEQ_LEN=${12}
  INPUT_FILE=${13}; OUTPUT_FILE=${14}; TOP_P=${15}; TEMPERATURE=${16}; REPETITION_PENALTY=${17}
  PP=${PP:-1}
  mp_posint TP PP BS

  mp_paths "$MEGATRON_PATH" "$MEGATRON_PATCH_PATH"
  mp_extra_args
  # processes per node: all local GPUs (data-parallel replicas of TP x PP ranks), or TP x PP CPU
  # processes on a machine without GPUs; NPROC_PER_NODE overrides both
  mp_launcher "$ENV" $((TP * PP))
  local out_dir console="${OUTPUT_FILE}.log"
  out_dir=$(dirname -- "$OUTPUT_FILE")
  mkdir -p -- "$out_dir"
  # dlc: every node tees its own console; they would overwrite each other in one shared file
  if [ "$NODE_RANK" -gt 0 ]; then console="${OUTPUT_FILE}.node${NODE_RANK}.log"; fi

  set -x
  "${LAUNCH[@]}" -m megatron_patch.generation.cli \
    --model-family "$family" \
    --checkpoint "$CHECKPOINT_PATH" --tokenizer "$TOKENIZER" --model-size "$MODEL_SIZE" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --micro-batch-size "$BS" --seq-length "$SEQ_LEN" --top-k "$TOP_K" \
    --input-seq-len "$INPUT_SEQ_LEN" --out-seq-length "$OUTPUT_SEQ_LEN" \
    --input-file "$INPUT_FILE" --output-file "$OUTPUT_FILE" \
    --top-p "$TOP_P" --temperature "$TEMPERATURE" --repetition-penalty "$REPETITION_PENALTY" \
    "${EXTRA[@]}" 2>&1 | tee "$console"
  { set +x; } 2>/dev/null
}
