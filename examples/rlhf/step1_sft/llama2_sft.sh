#!/usr/bin/env bash
# Tutorial step 1: supervised fine-tuning of LLaMA-2 on {query, response} / Alpaca / chat records,
# configured by environment variables (-h for the list); runs run_finetune_megatron_llama.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common.sh"

USAGE="usage: MODEL_SIZE=7B LOAD_PATH=CKPT TOKENIZER_MODEL=TOK DATASET_PATH=DATA $(basename "$0")
required:
  MODEL_SIZE       llama size preset (7B, 13B, 70B, ..., tiny) or auto (the checkpoint's config.json)
  LOAD_PATH        Megatron LLaMA-2 checkpoint to start from (e.g. converted from HF), or none (from scratch)
  TOKENIZER_MODEL  LLaMA sentencepiece tokenizer.model, or an HF tokenizer folder
  DATASET_PATH     json/jsonl file or folder of SFT records ({query, response}, Alpaca, chat messages)
$RLHF_OPTIONAL"
mp_usage_check 0 "$#" "$USAGE" "${1:-}"
rlhf_require MODEL_SIZE LOAD_PATH TOKENIZER_MODEL DATASET_PATH
rlhf_run sft llama "$TOKENIZER_MODEL" "$(basename "$0")"
