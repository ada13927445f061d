#!/usr/bin/env bash
# Tutorial step 3: PPO of a LLaMA-2 13B SFT policy with a 13B reward model; the six roles share one
# machine of 8 devices at TP=8. -h for the variables.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"
: "${MODEL_SIZE:=13B}" "${TP:=8}" "${PP:=1}" "${SEQ_LEN:=2048}"
: "${GENERATION_BATCH_SIZE:=16}" "${TRAIN_MICRO_BATCH_SIZE:=2}" "${TRAIN_GLOBAL_BATCH_SIZE:=64}"
: "${SAMPLE_PER_EPISODE:=512}" "${NUM_PPO_EPISODE:=100}" "${SAVE_EPISODE_INTERVAL:=10}"
rlhf3_run llama2 TOKENIZER_MODEL 0,1,2,3,4,5,6,7 "$(basename "$0")" "$@"
