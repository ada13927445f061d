#!/usr/bin/env bash
# Continued pretraining (or from scratch) of Bloom on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain bloom "560M | 1.1B | 1.7B | 3B | 7.1B | tiny" "$@"
