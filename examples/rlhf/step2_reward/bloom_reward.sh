#!/usr/bin/env bash
# Tutorial step 2: a reward model initialised from the step-1 Bloom SFT checkpoint (the LM head is
# dropped, a new value head added), trained on {prompt, chosen, rejected} pairs; configured by
# environment variables (-h for the list); runs run_finetune_megatron_bloom.sh with TASK=reward.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common.sh"

USAGE="usage: LOAD_PATH=SFT_CKPT TOKENIZER_PATH=TOK DATASET_PATH=DATA $(basename "$0")
required:
  LOAD_PATH        the step-1 checkpoint (output/step1_sft/checkpoint/<run name>), or any Bloom checkpoint
  TOKENIZER_PATH   Bloom HF tokenizer folder (tokenizer.json); VOCAB_FILE is accepted instead
  DATASET_PATH     json/jsonl file or folder of {prompt, chosen, rejected} (or {query, response, score} lists)
  (MODEL_SIZE defaults to auto: the architecture of LOAD_PATH)
$RLHF_OPTIONAL"
mp_usage_check 0 "$#" "$USAGE" "${1:-}"
TOKENIZER_PATH=${TOKENIZER_PATH:-${VOCAB_FILE:-}}
if [ -z "$TOKENIZER_PATH" ]; then
  echo "error: TOKENIZER_PATH (or VOCAB_FILE) is not set (run with -h for the variables)" >&2
  exit 2
fi
rlhf_require LOAD_PATH DATASET_PATH
rlhf_run reward bloom "$TOKENIZER_PATH" "$(basename "$0")"
