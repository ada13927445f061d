#!/usr/bin/env bash
# Every GPU check of the project in one go, for a lent GPU machine whose time is short: the GPU
# benchmarks and the `gpu`-marked tests, most wanted first, each under its own time limit, each
# step's whole log in $OUT/<step>.log (default ./gpu_out) and its last lines on stdout.
#
#   bash benchmarks/gpu_checks.sh                 # all steps
#   STEPS="pytest generate" bash benchmarks/gpu_checks.sh
#
# The machine needs megatron-core and chatterbot-corpus (the benchmarks' prompts) importable,
# e.g. wheels installed with `pip install --target` and PYTHONPATH (docs/benchmarks.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-"pytest generate ppo train_step"}
# steps (each a few minutes at most on an H200; a 10-minute command holds about three):
#   pytest       the gpu-marked tests
#   generate     benchmarks/generate.py --gpu (1B, batch 64, equal prompts, greedy)
#   generate_gqa the same with 4 KV heads of 16 (grouped-query attention)
#   generate_rl  the same at a PPO rollout's shape: prompts of 8-256 tokens, 256 sampled tokens,
#                with a torch.profiler table of one call
#   ppo          benchmarks/ppo_gpu.py: the SFT job and PPO with every role resident
#   ppo_offload  benchmarks/ppo_gpu.py: PPO with offloading (after ppo: its SFT result is reused)
#                (PPO_PROFILE=1: both print a torch.profiler table of one more episode's rollout,
#                then time its first generate call, cut to 64 tokens, on the rollout's model
#                and on the checkpoint loaded for generation, mixed and equal prompt lengths)
#   train_step   benchmarks/train_step.py --gpu

step() {  # name, limit (s), command...
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, megatron.core as m, transformers as t
print(sys.version.split()[0], 'torch', torch.__version__, 'megatron-core', m.__version__,
      'transformers', t.__version__)" || exit 1

for s in $STEPS; do
    case $s in
        ppo|ppo_offload)
             modes=sft,ppo; [ "$s" = ppo_offload ] && modes=ppo-offload
             step "$s" "${PPO_LIMIT:-270}" python3 benchmarks/ppo_gpu.py --episodes 2 --warmup 1 \
                 --modes "$modes" --work /tmp/ppo_gpu_work --json "$OUT/$s.json" \
                 ${PPO_PROFILE:+--profile}
             # a step cut short still leaves the modes it finished
             cat /tmp/ppo_gpu_work/result_*.json > "$OUT/ppo_modes.txt" 2>/dev/null ;;
        pytest) step pytest "${PYTEST_LIMIT:-170}" python3 -m pytest -m gpu -q -rs \
                    -p no:cacheprovider tests/test_rlhf_gpu.py tests/test_generation_gpu.py \
                    tests/test_gpu_training.py ;;
        generate) step generate "${GENERATE_LIMIT:-110}" python3 benchmarks/generate.py --gpu \
                      --repeats 3 --no-mcore ;;
        generate_gqa) step generate_gqa "${GENERATE_LIMIT:-110}" python3 benchmarks/generate.py \
                      --gpu --models 1Bgqa --repeats 3 --no-mcore ;;
        generate_rl) TAIL=60 step generate_rl "${GENERATE_LIMIT:-150}" \
                      python3 benchmarks/generate.py --gpu --repeats 2 --no-mcore \
                      --prompt-lens 8:256 --new-tokens 256 --sample --profile ;;
        train_step) step train_step "${TRAIN_LIMIT:-75}" python3 benchmarks/train_step.py --gpu ;;
        *) echo "unknown step $s (pytest, generate, generate_gqa, generate_rl, ppo, ppo_offload," \
                "train_step)"
           exit 2 ;;
    esac
done
