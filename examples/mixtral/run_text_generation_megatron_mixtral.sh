#!/usr/bin/env bash
# Batch text generation from a Megatron mixtral checkpoint (17 PAI-style arguments; -h for the list).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common/text_generation.sh"
mp_text_generation mixtral "$@"
