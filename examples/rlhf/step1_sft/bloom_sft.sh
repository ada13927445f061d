#!/usr/bin/env bash
# Tutorial step 1: supervised fine-tuning of Bloom on {query, response} / Alpaca / chat records,
# configured by environment variables (-h for the list); runs run_finetune_megatron_bloom.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common.sh"

USAGE="usage: MODEL_SIZE=7.1B LOAD_PATH=CKPT TOKENIZER_PATH=TOK DATASET_PATH=DATA $(basename "$0")
required:
  MODEL_SIZE       bloom size preset (560M, 1.1B, 1.7B, 3B, 7.1B, tiny) or auto (the checkpoint's config.json)
  LOAD_PATH        Megatron Bloom checkpoint to start from (e.g. converted from HF), or none (from scratch)
  TOKENIZER_PATH   Bloom HF tokenizer folder (tokenizer.json); VOCAB_FILE is accepted instead
  DATASET_PATH     json/jsonl file or folder of SFT records ({query, response}, Alpaca, chat messages)
$RLHF_OPTIONAL"
mp_usage_check 0 "$#" "$USAGE" "${1:-}"
TOKENIZER_PATH=${TOKENIZER_PATH:-${VOCAB_FILE:-}}
if [ -z "$TOKENIZER_PATH" ]; then
  echo "error: TOKENIZER_PATH (or VOCAB_FILE) is not set (run with -h for the variables)" >&2
  exit 2
fi
rlhf_require MODEL_SIZE LOAD_PATH DATASET_PATH
rlhf_run sft bloom "$TOKENIZER_PATH" "$(basename "$0")"
