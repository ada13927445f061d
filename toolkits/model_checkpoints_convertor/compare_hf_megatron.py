"""Compare an HF model with a Megatron checkpoint on the same token ids (thin CLI over
``megatron_patch.convert.compare``): prints max |delta logits|, mean KL and top-1 agreement, exits 1
above ``--threshold``.

    python compare_hf_megatron.py --hf-dir HF_DIR --megatron-dir MG_DIR [--threshold 1e-3]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

if __name__ == "__main__":
    from megatron_patch.convert.compare import main

    sys.exit(main())
