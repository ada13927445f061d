"""Megatron -> HF conversion with the flags of earlier per-family scripts (a thin alias).

    python megatron_to_hf.py --load_path MG_DIR --save_path HF_DIR [--target_params_dtype bf16]
                             [--vocab_dir TOKENIZER_DIR] [--megatron_path PATH_OR_-]
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load_path", required=True)
    p.add_argument("--save_path", required=True)
    p.add_argument("--target_params_dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--vocab_dir", default=None, help="copy tokenizer files from here")
    p.add_argument("--megatron_path", default="-")
    a = p.parse_args(argv)
    if a.megatron_path and a.megatron_path != "-":
        sys.path.insert(0, a.megatron_path)
    from megatron_patch.convert import engine, hf_io

    try:
        engine.megatron_to_hf(a.load_path, a.save_path, dtype=a.target_params_dtype)
    except engine.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.vocab_dir:
        for n in hf_io.TOKENIZER_FILES:
            src = os.path.join(a.vocab_dir, n)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(a.save_path, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
