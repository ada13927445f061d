"""Merge cleaned jsonl files, split them every N lines and zstd-compress the shards in a thread pool
(thin CLI over ``megatron_patch.data._shard.shard_and_compress``).

    python shard_and_compress.py -i CLEAN_DIR -o ZST_DIR --lines 1000
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="folder, file or glob of .jsonl")
    p.add_argument("-o", "--output", required=True, help="output folder for shard_*.jsonl.zst")
    p.add_argument("--lines", type=int, default=1000, help="lines per shard")
    p.add_argument("-t", "--threads", type=int, default=4, help="compression threads")
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("--prefix", default="shard")
    a = p.parse_args(argv)

    from megatron_patch.data._shard import shard_and_compress

    try:
        summary = shard_and_compress(a.input, a.output, a.lines, a.threads, a.level, a.prefix)
    except FileNotFoundError as e:  # no input files: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["lines"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
