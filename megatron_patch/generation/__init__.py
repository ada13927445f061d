"""Text generation over megatron-core ``GPTModel``: KV-cache batched decoding at any TP x PP with
greedy / top-k / top-p / temperature / repetition-penalty sampling and per-token log-probs.

- ``generate(model, prompts_token_ids, SamplingParams(...))`` -> ``GenerationOutput`` works on a live
  model (PPO rollouts call it in-process);
- ``sampling``: the pure sampling functions;
- ``loader``: a legacy checkpoint + tokenizer -> a ready model on this rank;
- ``cli``: the batch command line the ``run_text_generation_megatron_<family>.sh`` scripts call.

See docs/generation.md.
"""
from megatron_patch.generation.engine import GenerationOutput, forward_logprobs, generate
from megatron_patch.generation.sampling import SamplingParams, sample

__all__ = ["generate", "forward_logprobs", "GenerationOutput", "SamplingParams", "sample"]
