#!/bin/bash
# Bloom conversion (the family-specific name kept from earlier releases); same engine and the same
# 6 arguments as model_convertor_huggingface_megatron.sh, with the family forced to bloom.
set -o pipefail
if [ "$1" = "-h" ] || [ "$1" = "--help" ] || [ $# -ne 6 ]; then
  echo "usage: $(basename "$0") MEGATRON_PATH SOURCE TARGET TP PP MG2HF" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FAMILY=bloom exec bash "$HERE/model_convertor_huggingface_megatron.sh" "$@"
