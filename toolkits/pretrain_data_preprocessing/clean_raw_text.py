"""Clean raw WuDao-style JSON arrays, jsonl or plain text into ``{"text": ...}`` jsonl (thin CLI over
``megatron_patch.data._clean.clean_corpus``).

    python clean_raw_text.py -i RAW_DIR -o CLEAN_DIR -p 32
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="raw file, folder or glob")
    p.add_argument("-o", "--output", required=True, help="output folder (one .jsonl per input)")
    p.add_argument("-p", "--processes", type=int, default=1, help="worker processes")
    p.add_argument("--min-chars", type=int, default=10, help="drop documents shorter than this")
    p.add_argument("--max-symbol-ratio", type=float, default=0.5,
                   help="drop documents whose share of symbol characters is higher")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--ascii-cjk-only", action="store_true",
                   help="legacy PAI whitelist: delete every character that is not CJK or ASCII")
    p.add_argument("--keep-urls", action="store_true")
    p.add_argument("--keep-emails", action="store_true")
    p.add_argument("--text-keys", default="text,content",
                   help="json keys holding the text, first present wins (WuDao: content + title)")
    p.add_argument("--text-mode", choices=("blank", "line"), default="blank",
                   help="plain .txt files: documents are blank-line paragraphs or single lines")
    a = p.parse_args(argv)

    from megatron_patch.data._clean import CleanOptions, clean_corpus

    opts = CleanOptions(min_chars=a.min_chars, max_symbol_ratio=a.max_symbol_ratio,
                        dedup=not a.no_dedup, ascii_cjk_only=a.ascii_cjk_only,
                        remove_urls=not a.keep_urls, remove_emails=not a.keep_emails,
                        text_keys=tuple(k for k in a.text_keys.split(",") if k),
                        text_mode=a.text_mode)
    try:
        summary = clean_corpus(a.input, a.output, a.processes, opts)
    except FileNotFoundError as e:  # no input files: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["kept"] == 0:  # nothing for the next step: not a success
        print(f"error: no documents kept from {a.input} (documents in: "
              f"{summary['documents_in']}, bad lines: {summary['bad_records']['total']})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
