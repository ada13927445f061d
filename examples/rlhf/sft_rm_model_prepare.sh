#!/usr/bin/env bash
# RLHF tutorial, between steps 2 and 3: lays out the step-1 SFT and step-2 reward-model
# checkpoints as ChatLearn's tutorial does (TARGET_SFT/{sft_train,sft_pred},
# TARGET_RM/{rw_train,rw_pred}), each a full checkpoint folder made of hard links to the source's
# files. The sources are never modified.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common/lib.sh"

USAGE="usage: $(basename "$0") SOURCE_RM SOURCE_SFT TARGET_RM TARGET_SFT
  SOURCE_RM   step-2 reward-model checkpoint folder (output/step2_reward/checkpoint/<run name>)
  SOURCE_SFT  step-1 SFT checkpoint folder (output/step1_sft/checkpoint/<run name>)
  TARGET_RM   gets rw_train (value model: reward_train) and rw_pred (reward_ref, reward_forward)
  TARGET_SFT  gets sft_train (ppo_policy) and sft_pred (policy, reference)
Each of the four is a copy of its source's layout (latest_checkpointed_iteration.txt, iter_* or
release, megatron_patch.json, config.json, tokenizer files) made of hard links (cp -al: no extra
space), or a plain copy (cp -a, with a note) where the file system cannot link. Training writes
new files (atomic renames) and never modifies a loaded one, so the sources stay intact. Refused
(exit 2): a source without latest_checkpointed_iteration.txt, a target that exists and is not
empty, a target inside a source. Then, for step 3 (examples/rlhf/configs/<family>/rlhf.yaml):
  POLICY_LOAD=TARGET_SFT/sft_train REWARD_LOAD=TARGET_RM/rw_train
environment: COPY_MODE=link (default) | copy (independent copies, no hard links)"
mp_usage_check 4 "$#" "$USAGE" "${1:-}"

SOURCE_RM=$1; SOURCE_SFT=$2; TARGET_RM=$3; TARGET_SFT=$4
COPY_MODE=${COPY_MODE:-link}
TRACKER=latest_checkpointed_iteration.txt

die() { echo "error: $*" >&2; exit 2; }

case "$COPY_MODE" in
  link|copy) ;;
  *) die "COPY_MODE must be link or copy, got '$COPY_MODE'" ;;
esac
for v in SOURCE_RM SOURCE_SFT; do
  [ -d "${!v}" ] || die "$v ${!v} is not a folder"
  [ -f "${!v}/$TRACKER" ] || die "$v ${!v} is not a Megatron checkpoint folder (no $TRACKER)"
done

# source, target pairs; every check is done before anything is written
PAIRS=("$SOURCE_SFT" "$TARGET_SFT/sft_train" "$SOURCE_SFT" "$TARGET_SFT/sft_pred"
       "$SOURCE_RM" "$TARGET_RM/rw_train" "$SOURCE_RM" "$TARGET_RM/rw_pred")
for ((i = 1; i < ${#PAIRS[@]}; i += 2)); do
  dst=$(realpath -m -- "${PAIRS[i]}")
  if [ -e "$dst" ] && { [ ! -d "$dst" ] || [ -n "$(ls -A -- "$dst")" ]; }; then
    die "target $dst already exists and is not empty"
  fi
  up=$(dirname -- "$dst")   # the nearest existing folder above it must be a writable folder
  while [ ! -e "$up" ] && [ ! -L "$up" ]; do up=$(dirname -- "$up"); done
  [ -d "$up" ] || die "cannot create target $dst: $up is not a folder"
  [ -w "$up" ] || [ -e "$dst" ] || die "cannot create target $dst: $up is not writable"
  for v in SOURCE_RM SOURCE_SFT; do
    case "$dst/" in
      "$(realpath -m -- "${!v}")"/*)
        die "target $dst is inside $v ${!v} (sources are never modified)" ;;
    esac
  done
done

copy_tree() {  # copy_tree SRC DST (DST absent or empty)
  local src=$1 dst=$2
  mkdir -p -- "$dst"
  if [ "$COPY_MODE" = link ]; then
    if cp -al -- "$src/." "$dst/" 2>/dev/null; then
      echo "$dst: hard links to $src"
      return
    fi
    echo "note: $dst: cannot hard-link to $src (another file system?); copying with cp -a" >&2
    rm -rf -- "$dst"   # only what the failed cp -al made: dst was absent or empty
    mkdir -p -- "$dst"
  fi
  cp -a -- "$src/." "$dst/"
  echo "$dst: copy of $src"
}

for ((i = 0; i < ${#PAIRS[@]}; i += 2)); do
  copy_tree "${PAIRS[i]}" "${PAIRS[i + 1]}"
done
printf 'step 3: POLICY_LOAD=%q REWARD_LOAD=%q\n' "$TARGET_SFT/sft_train" "$TARGET_RM/rw_train"
