#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Qwen2 on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain qwen2 "0.5B | 1.5B | 7B | tiny" "$@"
