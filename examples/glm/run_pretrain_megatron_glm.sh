#!/usr/bin/env bash
# Continued pretraining (or from scratch) of GLM on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain glm "9B | 6B | tiny" "$@"
