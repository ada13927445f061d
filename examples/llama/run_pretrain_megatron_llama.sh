#!/usr/bin/env bash
# Continued pretraining (or from scratch) of LLaMA-1/2/3 on a .bin/.idx dataset
# (23 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/pretrain.sh"
mp_pretrain llama "7B | 13B | 70B | llama3-8B | llama3-70B | llama3.1-8B | 1B | tiny" "$@"
