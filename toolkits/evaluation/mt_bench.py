"""MT-Bench evaluation of Megatron checkpoints (e.g. SFT vs RLHF policies) with an
OpenAI-compatible judge. A thin command line over ``megatron_patch.evaluation.mt_bench``:

    python toolkits/evaluation/mt_bench.py \
        --question-file toolkits/evaluation/data/mt_bench_sample.jsonl --out runs/mt_bench \
        --model sft=/ckpt/llama2-7b-sft --model rlhf=/ckpt/llama2-7b-ppo \
        --judge-base-url http://127.0.0.1:8000/v1 --judge-model judge --parallel 8

See docs/evaluation.md. Bad input ends with one ``error: ...`` line and exit code 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_patch.evaluation.mt_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
