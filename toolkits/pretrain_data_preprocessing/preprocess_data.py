"""Tokenise jsonl / jsonl.zst / JSON-array text into megatron-core ``.bin/.idx`` datasets; flags follow
Megatron-LM's ``tools/preprocess_data.py`` (thin CLI over ``megatron_patch.data._preprocess``).

    python preprocess_data.py --input ZST_DIR --output-prefix OUT/wudao \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizer.model \\
        --append-eod --workers 8
    -> OUT/wudao_text_document.bin / .idx

Exit status 0 unless no document at all could be written (every record bad, or no input).
"""
import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="file(s), folder(s) or glob(s) of .jsonl, .jsonl.zst or .json")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract")
    g.add_argument("--split-sentences", action="store_true",
                   help="not supported (one sequence per document)")
    g.add_argument("--keep-newlines", action="store_true", help="accepted; newlines are always kept")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="auto",
                   help="auto, hf, sentencepiece, gpt2bpe, tiktoken, or Megatron-LM's "
                        "HuggingFaceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer / "
                        "GPT2BPETokenizer")
    g.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_model", default=None,
                   help="HF tokenizer folder, .model, .tiktoken, or a TOKENIZER_PATH key")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="ignored (read from the tokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append eod after every document")
    g.add_argument("--lang", default="english", help="ignored (sentence splitting only)")
    g.add_argument("--backend", choices=("auto", "gigatoken", "reference"), default="auto",
                   help="encoder: auto = gigatoken when installed and verified identical")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dataset-impl", default="mmap", help="ignored (always mmap .bin/.idx)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="process the files in this many groups, merged at the end")
    g.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    g.add_argument("--summary-json", default=None, help="also write the summary here")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.split_sentences:
        print("error: --split-sentences is not supported; documents are single sequences",
              file=sys.stderr)
        return 2
    if a.tokenizer_model is None and a.vocab_file is None:
        print("error: give --tokenizer-model (or --vocab-file/--merge-file)", file=sys.stderr)
        return 2

    from megatron_patch.data._preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(input=a.input, output_prefix=a.output_prefix, json_keys=a.json_keys,
                           tokenizer_type=a.tokenizer_type, tokenizer_model=a.tokenizer_model,
                           vocab_file=a.vocab_file, merge_file=a.merge_file,
                           append_eod=a.append_eod, workers=a.workers, partitions=a.partitions,
                           backend=a.backend, log_interval=a.log_interval)
    try:
        summary = preprocess(cfg)
    except FileNotFoundError as e:  # no input files: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.summary_json:
        with open(a.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
