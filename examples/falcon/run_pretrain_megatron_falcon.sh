#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Falcon on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain falcon "7B | 40B | 180B | rw-1B | tiny | tiny-40B" "$@"
