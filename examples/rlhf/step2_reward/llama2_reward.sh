#!/usr/bin/env bash
# Tutorial step 2: a reward model initialised from the step-1 LLaMA-2 SFT checkpoint (the LM head is
# dropped, a new value head added), trained on {prompt, chosen, rejected} pairs; configured by
# environment variables (-h for the list); runs run_finetune_megatron_llama.sh with TASK=reward.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common.sh"

USAGE="usage: LOAD_PATH=SFT_CKPT TOKENIZER_MODEL=TOK DATASET_PATH=DATA $(basename "$0")
required:
  LOAD_PATH        the step-1 checkpoint (output/step1_sft/checkpoint/<run name>), or any LLaMA checkpoint
  TOKENIZER_MODEL  LLaMA sentencepiece tokenizer.model, or an HF tokenizer folder
  DATASET_PATH     json/jsonl file or folder of {prompt, chosen, rejected} (or {query, response, score} lists)
  (MODEL_SIZE defaults to auto: the architecture of LOAD_PATH)
$RLHF_OPTIONAL"
mp_usage_check 0 "$#" "$USAGE" "${1:-}"
rlhf_require LOAD_PATH TOKENIZER_MODEL DATASET_PATH
rlhf_run reward llama "$TOKENIZER_MODEL" "$(basename "$0")"
