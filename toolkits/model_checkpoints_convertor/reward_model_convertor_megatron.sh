#!/bin/bash
# Reward-model conversion: an HF *ForSequenceClassification (score head) or DeepSpeed-Chat/trlx
# (v_head) reward model <-> a Megatron reward checkpoint (rm_head on the last pipeline stage).
# Same 6 arguments as model_convertor_huggingface_megatron.sh.
set -o pipefail
if [ "$1" = "-h" ] || [ "$1" = "--help" ] || [ $# -ne 6 ]; then
  echo "usage: $(basename "$0") MEGATRON_PATH SOURCE TARGET TP PP MG2HF" >&2
  echo "  (as model_convertor_huggingface_megatron.sh; SOURCE must be a reward model)" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONVERT_EXTRA_ARGS="--reward" exec bash "$HERE/model_convertor_huggingface_megatron.sh" "$@"
