"""Merge cleaned jsonl files, split them into shards of N lines and zstd-compress the shards with a
thread pool (``zstandard`` releases the GIL while compressing). Streaming: at most
``2 x threads`` shards are in memory at once.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

from megatron_patch.data.text_io import BadRecords, iter_line_chunks, list_input_files


def _compress_to(path: str, data: bytes, level: int) -> int:
    import zstandard

    blob = zstandard.ZstdCompressor(level=level).compress(data)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob)


def shard_and_compress(inputs, output_dir: str, lines_per_shard: int = 1000, threads: int = 4,
                       level: int = 3, prefix: str = "shard", log=None) -> dict:
    """Write ``output_dir/<prefix>_00000.jsonl.zst``, ... each holding ``lines_per_shard`` lines
    of the inputs (in sorted file order; blank lines skipped). Returns a summary dict."""
    if lines_per_shard <= 0:
        raise ValueError("lines_per_shard must be positive")
    log = log or sys.stderr
    t0 = time.time()
    files = list_input_files(inputs, (".jsonl", ".jsonl.zst"))
    os.makedirs(output_dir, exist_ok=True)
    report = BadRecords()
    shards: List[str] = []
    futures = []
    bytes_in = bytes_out = lines_total = 0
    buf: List[bytes] = []

    def flush(pool) -> None:
        nonlocal buf
        if not buf:
            return
        path = os.path.join(output_dir, f"{prefix}_{len(shards):05d}.jsonl.zst")
        shards.append(path)
        futures.append(pool.submit(_compress_to, path, b"".join(buf), level))
        buf = []
        while len(futures) > 2 * threads:
            collect(futures.pop(0))

    def collect(fut) -> None:
        nonlocal bytes_out
        bytes_out += fut.result()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for f in files:
            for start, blob, complete in iter_line_chunks(f, report):
                lines = blob.split(b"\n")
                if lines and lines[-1] == b"":
                    lines.pop()
                for k, line in enumerate(lines):
                    if not line.strip():
                        continue
                    if not complete and k == len(lines) - 1:
                        # the cut last line of a truncated .zst: reported here, by its own file
                        # and line, not written as if it were whole
                        report.add(f, start + k, "truncated-line")
                        continue
                    buf.append(line + b"\n")
                    bytes_in += len(line) + 1
                    lines_total += 1
                    if len(buf) >= lines_per_shard:
                        flush(pool)
        flush(pool)
        for fut in futures:
            collect(fut)
    # shards of an earlier run into this folder beyond this run's last one would be read as data
    stale = [p for p in glob.glob(os.path.join(glob.escape(output_dir),
                                               glob.escape(prefix) + "_[0-9][0-9][0-9][0-9][0-9]"
                                               ".jsonl.zst"))
             if p not in set(shards)]
    for p in stale:
        os.remove(p)
    summary = {"files": len(files), "lines": lines_total, "shards": len(shards),
               "bytes_in": bytes_in, "bytes_out": bytes_out, "bad_records": report.as_dict(),
               "seconds": round(time.time() - t0, 3)}
    summary["stale_shards_removed"] = len(stale)
    print(f"shard: {len(files)} files, {lines_total} lines -> {len(shards)} shards in {output_dir}, "
          f"{bytes_in / 1e6:.1f} MB -> {bytes_out / 1e6:.1f} MB zstd, bad lines {report.total}"
          + (f" ({dict(report.counts)})" if report.total else "")
          + (f", {len(stale)} shards of an earlier run removed" if stale else ""),
          file=log, flush=True)
    for ex in report.examples[:10]:
        print(f"  bad: {ex}", file=log)
    return summary
