#!/bin/bash
# Tokenise a folder of .jsonl / .jsonl.zst into a megatron-core .bin/.idx dataset.
#
#   bash run_make_pretraining_dataset.sh MEGATRON_PATH MEGATRON_PATCH_PATH INPUT_DIR TOKENIZER OUTPUT_DIR
#
# MEGATRON_PATH        Megatron-LM checkout prepended to PYTHONPATH, or - for the installed megatron-core
# MEGATRON_PATCH_PATH  megatron_patch checkout prepended to PYTHONPATH, or - for the installed package
# INPUT_DIR            folder (or file/glob) of .jsonl / .jsonl.zst with a "text" key
# TOKENIZER            llamabpe | bloombpe | qwenbpe | gpt2bpe | glmbpe | falconbpe (under
#                      $TOKENIZER_PATH/<key>), or a path to an HF tokenizer folder / .model / .tiktoken
# OUTPUT_DIR           receives wudao_<tokenizer>_text_document.bin/.idx
# Environment: WORKERS (default: number of CPUs), JSON_KEYS (default: text), BACKEND (auto),
#              OUTPUT_NAME (default: wudao_<tokenizer>), PYTHON (default: python).
set -eo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}
if [ "$1" = "-h" ] || [ "$1" = "--help" ] || [ "$#" -ne 5 ]; then
    usage
    exit 2
fi

MEGATRON_PATH="$1"
MEGATRON_PATCH_PATH="$2"
INPUT_DIR="$3"
TOKENIZER="$4"
OUTPUT_DIR="$5"

if [ "${MEGATRON_PATH}" != "-" ]; then
    export PYTHONPATH="${MEGATRON_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
fi
if [ "${MEGATRON_PATCH_PATH}" != "-" ]; then
    export PYTHONPATH="${MEGATRON_PATCH_PATH}${PYTHONPATH:+:${PYTHONPATH}}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCHDYNAMO_DISABLE="${TORCHDYNAMO_DISABLE:-1}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 1)}"
JSON_KEYS="${JSON_KEYS:-text}"
BACKEND="${BACKEND:-auto}"
TOKENIZER_NAME="$(basename "${TOKENIZER%/}")"
# a tokenizer file loses its extension (llama.model -> llama); a folder keeps its whole name
# (Qwen2.5-7B and Qwen2.5-3B must not share a dataset name)
if [ -f "${TOKENIZER}" ]; then TOKENIZER_NAME="${TOKENIZER_NAME%.*}"; fi
OUTPUT_NAME="${OUTPUT_NAME:-wudao_${TOKENIZER_NAME}}"

mkdir -p "${OUTPUT_DIR}"
# shellcheck disable=SC2086
"${PYTHON}" "${SCRIPT_DIR}/preprocess_data.py" \
    --input "${INPUT_DIR}" \
    --output-prefix "${OUTPUT_DIR}/${OUTPUT_NAME}" \
    --json-keys ${JSON_KEYS} \
    --tokenizer-type auto \
    --tokenizer-model "${TOKENIZER}" \
    --append-eod \
    --workers "${WORKERS}" \
    --backend "${BACKEND}" \
    --summary-json "${OUTPUT_DIR}/${OUTPUT_NAME}_summary.json"
