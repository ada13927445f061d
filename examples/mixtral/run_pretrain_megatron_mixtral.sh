#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Mixtral (MoE; expert parallel via EP) on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain mixtral "8x7B | 8x22B | tiny" "$@"
