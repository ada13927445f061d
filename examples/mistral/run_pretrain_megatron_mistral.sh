#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Mistral on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain mistral "7B | 7B-v0.2 | tiny" "$@"
