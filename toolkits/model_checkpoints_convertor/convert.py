"""Megatron-LM's converter interface (``tools/checkpoint/convert.py`` flags) over our engine.

    python convert.py --model-type GPT --loader llama2_hf --saver megatron \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 \
        --load-dir HF_DIR --save-dir MG_DIR [--tokenizer-model PATH] [--megatron-path PATH]

Loaders: any ``*_hf`` / ``hf`` / ``huggingface`` name reads an HF folder (the family comes from its
config.json); ``megatron``/``mcore`` reads a Megatron checkpoint. Savers: ``megatron``/``mcore``
(resharding when the loader is Megatron too) and ``hf``/``huggingface``. ``--true-vocab-size`` is
accepted for compatibility and ignored: the vocabulary comes from the HF checkpoint (plus
``EXTRA_VOCAB_SIZE`` through the 6-argument script).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_HF = ("hf", "huggingface", "transformers")
_MG = ("megatron", "mcore", "legacy")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Megatron-LM-style checkpoint converter")
    p.add_argument("--model-type", default="GPT", choices=["GPT"])
    p.add_argument("--loader", required=True)
    p.add_argument("--saver", required=True)
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer-model", default=None,
                   help="a tokenizer file (e.g. tokenizer.model) or a folder of tokenizer files, "
                        "copied into the target with the weights")
    p.add_argument("--megatron-path", default=None)
    p.add_argument("--true-vocab-size", type=int, default=None, help="accepted, ignored")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--params-dtype", "--saver-dtype", dest="dtype", default=None,
                   choices=["fp32", "fp16", "bf16"])
    a = p.parse_args(argv)
    if a.megatron_path:
        sys.path.insert(0, a.megatron_path)
    loader, saver = a.loader.lower(), a.saver.lower()
    hf_in = loader.endswith("_hf") or loader in _HF
    mg_in = loader in _MG
    if not (hf_in or mg_in):
        p.error(f"unknown loader {a.loader!r}")
    if saver not in _HF + _MG:
        p.error(f"unknown saver {a.saver!r}")
    from megatron_patch.convert import engine

    tp, pp, ep = (a.target_tensor_parallel_size, a.target_pipeline_parallel_size,
                  a.target_expert_parallel_size)
    if hf_in and saver in _HF:
        p.error("HF -> HF is not a conversion")
    # copied into the staging folder with the weights: the target appears whole or not at all
    side = [a.tokenizer_model] if a.tokenizer_model else []
    try:
        engine.check_side_files(side)  # a mistyped path: an error before any conversion work
        if hf_in and saver in _MG:
            engine.hf_to_megatron(a.load_dir, a.save_dir, tp=tp, pp=pp, ep=ep, dtype=a.dtype,
                                  divisible_by=a.make_vocab_size_divisible_by, side_files=side)
        elif mg_in and saver in _HF:
            engine.megatron_to_hf(a.load_dir, a.save_dir, dtype=a.dtype, side_files=side)
        else:
            engine.reshard(a.load_dir, a.save_dir, tp=tp, pp=pp, ep=ep, dtype=a.dtype,
                           side_files=side)
    except engine.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
