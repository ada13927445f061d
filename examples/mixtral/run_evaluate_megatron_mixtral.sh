#!/usr/bin/env bash
# Loss and perplexity (TASK=sft, default) or pairwise accuracy (TASK=reward) of a Megatron mixtral
# checkpoint on a JSON set (14 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/evaluate.sh"
mp_evaluate mixtral "$@"
