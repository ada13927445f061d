# Shared body of the step-3 tutorial scripts run_scripts/<family>/run_*.sh (sourced, never run).
#
# rlhf3_run FAMILY TOKENIZER_VAR DEFAULT_DEVICES "$@": checks the variables, then runs
# examples/rlhf/run_rlhf.sh DEVICES examples/rlhf/configs/FAMILY. The calling script has set the
# defaults of its model size (MODEL_SIZE, TP, PP, batch sizes) with ${VAR:=...}, so any of them
# can be overridden from the environment.
HERE_STEP3="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../common.sh
source "$HERE_STEP3/../../common.sh"   # rlhf_require, mp_* helpers

rlhf3_usage() {  # rlhf3_usage SCRIPT FAMILY TOKENIZER_VAR DEFAULT_DEVICES
  local tokhelp="LLaMA sentencepiece tokenizer.model, or an HF tokenizer folder"
  [ "$3" = VOCAB_FILE ] && tokhelp="the Bloom HF tokenizer folder (tokenizer.json)"
  printf '%s\n' "usage: POLICY_LOAD=.. REWARD_LOAD=.. $3=.. DATASET_PATH=.. exp_name=.. $1 [DEVICES]
Tutorial step 3: PPO with the configs of examples/rlhf/configs/$2 (all roles on every device).
  DEVICES            comma-separated device ids of this machine (default $4)
required:
  POLICY_LOAD        the step-1 SFT checkpoint (policy and reference; e.g. models/sft/sft_train)
  REWARD_LOAD        the step-2 reward-model checkpoint (reward model and value model)
  $3$(printf '%*s' $((19 - ${#3})) '')$tokhelp
  DATASET_PATH       prompts: json/jsonl file or folder of {prompt} (or {query}) records
  exp_name           the run's name: outputs in \$OUTPUT_DIR/step3_rlhf/\$exp_name
optional (default):
  REWARD_LOAD_ITERATION (the latest) OUTPUT_DIR (output) MODEL_SIZE ($MODEL_SIZE) TP ($TP) PP ($PP)
  SEQ_LEN ($SEQ_LEN) GENERATION_BATCH_SIZE ($GENERATION_BATCH_SIZE) TRAIN_MICRO_BATCH_SIZE ($TRAIN_MICRO_BATCH_SIZE)
  TRAIN_GLOBAL_BATCH_SIZE ($TRAIN_GLOBAL_BATCH_SIZE) SAMPLE_PER_EPISODE ($SAMPLE_PER_EPISODE) NUM_PPO_EPISODE ($NUM_PPO_EPISODE)
  SAVE_EPISODE_INTERVAL ($SAVE_EPISODE_INTERVAL) and those of examples/rlhf/run_rlhf.sh: ENV (dsw | dlc), NUM_DEVICE,
  BF16, MEGATRON_PATH, MEGATRON_PATCH_PATH
outputs: \$OUTPUT_DIR/step3_rlhf/\$exp_name/{ppo_policy,ppo_value,log,tensorboard}; rerunning resumes"
}

rlhf3_run() {  # rlhf3_run FAMILY TOKENIZER_VAR DEFAULT_DEVICES SCRIPT "$@"
  local family=$1 tokvar=$2 devices=$3 script=$4
  shift 4
  if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    rlhf3_usage "$script" "$family" "$tokvar" "$devices"
    exit 2
  fi
  if [ "$#" -gt 1 ]; then
    echo "error: expected at most 1 argument (DEVICES), got $# (run with -h for the usage)" >&2
    exit 2
  fi
  rlhf_require POLICY_LOAD REWARD_LOAD "$tokvar" DATASET_PATH exp_name
  export POLICY_LOAD REWARD_LOAD DATASET_PATH exp_name "${tokvar?}"
  export MODEL_SIZE TP PP SEQ_LEN GENERATION_BATCH_SIZE TRAIN_MICRO_BATCH_SIZE \
    TRAIN_GLOBAL_BATCH_SIZE SAMPLE_PER_EPISODE NUM_PPO_EPISODE SAVE_EPISODE_INTERVAL
  exec bash "$ROOT_RLHF/examples/rlhf/run_rlhf.sh" "${1:-$devices}" \
    "$ROOT_RLHF/examples/rlhf/configs/$family"
}
