#!/usr/bin/env python
"""Serve a Megatron checkpoint behind an OpenAI-compatible API (see docs/serving.md).

    python toolkits/serve/openai_server.py --checkpoint CKPT [--tp N] [--port 0 --port-file F]
        [--served-model-name NAME] [--max-batch-size 8] [--seq-length L] [--precision auto]

A thin wrapper over ``megatron_patch.serve.server.main``; with ``--tp N`` > 1 it re-launches itself
under torchrun as N local processes.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("megatron_patch") is None:  # a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_patch.serve.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
