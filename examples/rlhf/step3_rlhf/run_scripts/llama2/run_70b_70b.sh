#!/usr/bin/env bash
# Tutorial step 3: PPO of a LLaMA-2 70B SFT policy with a 70B reward model at TP=8 x PP=4: the six
# roles share 32 devices, 4 machines of 8 (ENV=dlc, started on every machine; DEVICES lists this
# machine's devices). -h for the variables.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"
: "${MODEL_SIZE:=70B}" "${TP:=8}" "${PP:=4}" "${SEQ_LEN:=2048}"
: "${GENERATION_BATCH_SIZE:=8}" "${TRAIN_MICRO_BATCH_SIZE:=1}" "${TRAIN_GLOBAL_BATCH_SIZE:=32}"
: "${SAMPLE_PER_EPISODE:=256}" "${NUM_PPO_EPISODE:=100}" "${SAVE_EPISODE_INTERVAL:=10}"
rlhf3_run llama2 TOKENIZER_MODEL 0,1,2,3,4,5,6,7 "$(basename "$0")" "$@"
