#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Galactica on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain galactica "125M | 1.3B | 6.7B | 30B | tiny" "$@"
