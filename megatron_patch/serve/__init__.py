"""Serve a Megatron checkpoint behind an OpenAI-compatible HTTP API (chat/completions, completions,
models, health), with request batching and streaming, at TP x PP as local processes.

- ``protocol``: the wire format (validation, responses, stream chunks, errors), pure Python;
- ``scheduler``: batches waiting requests through ``megatron_patch.generation.generate`` and keeps
  the model-parallel ranks in lockstep;
- ``server``: the HTTP handlers, the command line and the torchrun re-launch
  (``python toolkits/serve/openai_server.py`` / ``python -m megatron_patch.serve``).

See docs/serving.md.
"""
from megatron_patch.serve.protocol import APIError

__all__ = ["APIError", "main"]


def main(argv=None) -> int:
    """The command line (``toolkits/serve/openai_server.py``)."""
    from megatron_patch.serve.server import main as _main

    return _main(argv)
