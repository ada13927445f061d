"""Token-length distribution of an SFT / reward / RL-prompt dataset (percentiles and a histogram), to
choose SEQ_LEN / PAD_LEN (thin CLI over ``megatron_patch.data.sft.token_lengths``/``length_stats``).

    python sample_stats.py --input train.json --tokenizer llamabpe [--kind sft|reward|rl]
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="json/jsonl files, folders or globs")
    p.add_argument("--tokenizer", required=True, help="TOKENIZER_PATH key or tokenizer path")
    p.add_argument("--tokenizer-type", default="auto")
    p.add_argument("--kind", choices=("sft", "reward", "rl"), default="sft")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    a = p.parse_args(argv)

    from megatron_patch.data.sft import length_stats, token_lengths
    from megatron_patch.tokenizer import build_tokenizer

    tok = build_tokenizer(a.tokenizer_type, a.tokenizer)
    stats = length_stats(token_lengths(a.input, tok, a.kind), a.bins)
    if a.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"samples {stats['count']}  mean {stats['mean']:.1f}  min {stats['min']}  "
          f"max {stats['max']} tokens")
    print("percentile  " + "  ".join(f"p{k:<6}" for k in stats["percentiles"]))
    print("tokens      " + "  ".join(f"{v:<7}" for v in stats["percentiles"].values()))
    top = max(c for _lo, _hi, c in stats["histogram"]) or 1
    for lo, hi, c in stats["histogram"]:
        print(f"{lo:>7}-{hi:<7} {c:>8}  {'#' * max(1 if c else 0, round(40 * c / top))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
