#!/bin/bash
# HF <-> Megatron checkpoint conversion (all families; the family comes from the HF config.json or
# from the Megatron checkpoint's megatron_patch.json). A Megatron SOURCE with MG2HF=false is
# resharded to TP/PP. Env: EXTRA_VOCAB_SIZE, EP, CONVERT_DTYPE (fp32|fp16|bf16), FAMILY,
# PYTHON (the interpreter, default python).
set -o pipefail
usage() {
  cat >&2 <<USAGE
usage: $(basename "$0") MEGATRON_PATH SOURCE TARGET TP PP MG2HF
  MEGATRON_PATH  Megatron-LM checkout prepended to PYTHONPATH, or - for the installed megatron-core
  SOURCE         HF folder (MG2HF=false) or Megatron checkpoint (MG2HF=true, or false to reshard)
  TARGET         output folder (must not exist or be empty)
  TP PP          tensor / pipeline parallel sizes of the Megatron checkpoint written
  MG2HF          true: Megatron -> HF;  false: HF -> Megatron (or Megatron -> Megatron)
USAGE
  exit 2
}
[ "$1" = "-h" ] || [ "$1" = "--help" ] && usage
[ $# -ne 6 ] && usage
MEGATRON_PATH="$1"; SOURCE="$2"; TARGET="$3"; TP="$4"; PP="$5"; MG2HF="$6"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH_ROOT="$(cd "$HERE/../.." && pwd)"
if [ "$MEGATRON_PATH" != "-" ]; then export PYTHONPATH="$MEGATRON_PATH:$PYTHONPATH"; fi
export PYTHONPATH="$PATCH_ROOT:$PYTHONPATH"
exec "${PYTHON:-python}" -m megatron_patch.convert.cli auto "$SOURCE" "$TARGET" "$TP" "$PP" "$MG2HF" ${CONVERT_EXTRA_ARGS}
