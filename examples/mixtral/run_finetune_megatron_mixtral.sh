#!/usr/bin/env bash
# Supervised fine-tuning (TASK=sft, default) or reward-model training (TASK=reward) of a Megatron
# mixtral checkpoint (22 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/finetune.sh"
mp_finetune mixtral "$@"
