"""``python -m megatron_patch.serve ...``: the OpenAI-compatible server (what torchrun re-launches)."""
import sys

from megatron_patch.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
