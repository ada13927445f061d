"""Evaluation of chat models (SFT vs RLHF policies): MT-Bench-style two-turn answers generated from
Megatron checkpoints, graded 1-10 by a judge model behind any OpenAI-compatible chat-completions
endpoint, and a Markdown score table per category.

- ``questions``: read and check an MT-Bench question file (and optional reference answers);
- ``answers``: two-turn answer generation with the in-process generation library, cached per model;
- ``judge``: judge prompts, ``[[N]]`` score parsing, the HTTP client with retries and the judgment
  cache;
- ``mt_bench``: the whole run (answers -> judgments -> table) and the score table.

The command line is ``toolkits/evaluation/mt_bench.py`` (see docs/evaluation.md).
"""
from megatron_patch.evaluation.questions import EvaluationError, Question, load_questions

__all__ = ["EvaluationError", "Question", "load_questions"]
