"""Streaming readers for raw and cleaned text: jsonl, jsonl.zst, WuDao-style JSON arrays and plain
text, with bad records (malformed JSON, invalid UTF-8, truncated zstd streams) counted and reported
by file and line instead of aborting the run.

Everything here streams: memory is bounded by the read block size and the largest single record.
"""
from __future__ import annotations

import glob
import io
import json
import os
from collections import Counter
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

BLOCK = 1 << 22  # 4 MiB reads
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark: not text (skipped at the start of a file)
MAX_RECORD = 1 << 28  # a JSON array element larger than 256 MiB is reported, not parsed
TEXT_EXTS = (".jsonl", ".jsonl.zst", ".json", ".json.zst", ".zst", ".txt", ".txt.zst")


class BadRecords:
    """Counts bad records by reason and keeps the first ``keep`` as ``file:line: reason``."""

    def __init__(self, keep: int = 20) -> None:
        self.keep = keep
        self.counts: Counter = Counter()
        self.examples: List[str] = []

    def add(self, path: str, line: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.keep:
            msg = f"{path}:{line}: {reason}"
            self.examples.append(msg + (f" ({detail})" if detail else ""))

    def merge(self, other: "BadRecords") -> None:
        self.counts.update(other.counts)
        room = self.keep - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])

    def merge_dict(self, counts: dict, examples: Sequence[str]) -> None:
        self.counts.update(counts)
        room = self.keep - len(self.examples)
        if room > 0:
            self.examples.extend(list(examples)[:room])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}

    def __bool__(self) -> bool:  # truthiness = "has bad records"
        return self.total > 0


def list_input_files(spec: str | Sequence[str], exts: Sequence[str] = TEXT_EXTS) -> List[str]:
    """Files named by ``spec``: a file, a folder (searched recursively, sorted) or a glob; a list of
    such. Folders contribute files whose name ends with one of ``exts``."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: List[str] = []
    for s in specs:
        if os.path.isfile(s):
            out.append(s)
        elif os.path.isdir(s):
            found = []
            for root, _dirs, files in os.walk(s):
                for f in files:
                    if f.endswith(tuple(exts)) and not f.startswith(".") \
                            and not f.endswith("summary.json"):
                        found.append(os.path.join(root, f))
            out.extend(sorted(found))
        else:
            matches = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no input files match {s!r}")
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"no input files in {spec!r} (looked for {', '.join(exts)})")
    return out


def is_zst(path: str) -> bool:
    return path.endswith(".zst")


def iter_blocks(path: str, report: Optional[BadRecords] = None, block: int = BLOCK,
                line_hint: Optional[List[int]] = None) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in blocks. A truncated or corrupt ``.zst`` ends the stream
    with a ``truncated-zstd``/``corrupt-zstd`` record (at the line given by ``line_hint[0]`` when
    the caller keeps count) instead of raising; everything decoded before it is still yielded."""
    with open(path, "rb") as fh:
        if not is_zst(path):
            while True:
                data = fh.read(block)
                if not data:
                    return
                yield data
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        obj = dctx.decompressobj()
        fed = False
        while True:
            data = fh.read(block)
            if not data:
                break
            while data:
                try:
                    out = obj.decompress(data)
                except zstandard.ZstdError as e:
                    if report is not None:
                        report.add(path, (line_hint or [0])[0] + 1, "corrupt-zstd", str(e))
                    return
                fed = True
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj = dctx.decompressobj()
                    fed = False
                else:
                    data = b""
        if fed and not obj.eof and report is not None:
            report.add(path, (line_hint or [0])[0] + 1, "truncated-zstd",
                       "stream ends inside a frame; the partial last line is dropped")


def iter_line_chunks(path: str, report: Optional[BadRecords] = None, block: int = BLOCK
                     ) -> Iterator[Tuple[int, bytes, bool]]:
    """``(first_line_number, blob, complete)``: blobs of whole lines (newline-terminated except
    possibly the file's last line). ``complete`` is False for the tail of a truncated stream, whose
    last line is cut. Line numbers are 1-based."""
    line_no = [0]  # lines emitted so far (shared with iter_blocks for its error position)
    pending = b""
    local = BadRecords() if report is None else report
    before = local.total
    for data in iter_blocks(path, local, block, line_no):
        if pending:
            data = pending + data
        cut = data.rfind(b"\n")
        if cut < 0:
            pending = data
            continue
        blob, pending = data[:cut + 1], data[cut + 1:]
        start = line_no[0] + 1
        line_no[0] += blob.count(b"\n")
        yield start, blob, True
    truncated = local.total > before and any(
        r in local.counts for r in ("truncated-zstd", "corrupt-zstd"))
    if pending:
        yield line_no[0] + 1, pending, not truncated


def sniff_json_array(path: str) -> bool:
    """Whether the file's first non-blank character (after a UTF-8 byte-order mark) is ``[`` (a
    WuDao-style JSON array)."""
    head = b""
    for data in iter_blocks(path, None, 1 << 16):
        head += data
        if len(head) < 3 and head == BOM[:len(head)]:
            continue  # could still be a byte-order mark
        s = (head[3:] if head.startswith(BOM) else head).lstrip()
        if s:
            return s[:1] == b"["
        head = BOM if head.startswith(BOM) else b""
    return False


def iter_json_array(path: str, report: BadRecords) -> Iterator[Tuple[int, object]]:
    """Stream the elements of a top-level JSON array without loading the file: ``(index, obj)``.
    A syntax error stops the file (recorded with the element index and byte position)."""
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    started = False
    index = 0
    blocks = iter_blocks(path, report)
    tail = b""
    eof = False

    def more() -> bool:
        nonlocal buf, pos, tail, eof
        if eof:
            return False
        try:
            data = next(blocks)
        except StopIteration:
            eof = True
            if tail:
                report.add(path, index + 1, "invalid-utf8",
                           "the file ends inside a UTF-8 sequence; replaced by U+FFFD")
                buf = buf[pos:] + tail.decode("utf-8", errors="replace")
                pos = 0
                tail = b""
                return True
            return False
        data = tail + data
        # keep an incomplete UTF-8 sequence for the next block (a truly invalid byte is reported
        # below and decoded as U+FFFD: the element keeps its place in the array)
        cut = len(data)
        for k in range(1, min(4, len(data)) + 1):
            b = data[-k]
            if b & 0xC0 != 0x80:
                need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
                if need > k:
                    cut = len(data) - k
                break
        tail = data[cut:]
        try:
            text = data[:cut].decode("utf-8")
        except UnicodeDecodeError as e:
            report.add(path, index + 1, "invalid-utf8",
                       f"near array element {index}: {e.reason}; replaced by U+FFFD, kept")
            text = data[:cut].decode("utf-8", errors="replace")
        buf = buf[pos:] + text
        pos = 0
        return True

    while True:
        while pos < len(buf) and (buf[pos] in " \t\r\n\ufeff" or (started and buf[pos] == ",")):
            pos += 1
        if pos >= len(buf):
            if not more():
                break
            continue
        ch = buf[pos]
        if not started:
            if ch != "[":
                report.add(path, 1, "not-a-json-array")
                return
            started = True
            pos += 1
            continue
        if ch == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except RecursionError:
            report.add(path, index + 1, "malformed-json",
                       f"array element {index}: nested too deep to parse; the rest of the file "
                       "is skipped")
            return
        except json.JSONDecodeError as e:
            # an element cut by the block boundary: read on (bounded, so a broken file cannot
            # pull itself into memory), else report it
            if len(buf) - pos < MAX_RECORD and more():
                continue
            report.add(path, index + 1, "malformed-json", f"array element {index}: {e.msg}")
            return
        if end == len(buf) and not eof:
            # a number or literal could continue in the next block: read more and decode again
            if more():
                continue
        pos = end
        index += 1
        yield index, obj
    if started:
        report.add(path, index + 1, "truncated-json-array", "missing closing ']'")


def decode_json_line(line: bytes) -> Tuple[Optional[object], Optional[str]]:
    """``(obj, None)`` or ``(None, reason)`` for one jsonl line (reasons: invalid-utf8,
    malformed-json)."""
    try:
        text = line.decode("utf-8-sig")  # a byte-order mark (a file's first line) is not JSON
    except UnicodeDecodeError:
        return None, "invalid-utf8"
    try:
        return json.loads(text), None
    except (json.JSONDecodeError, RecursionError):
        return None, "malformed-json"


def iter_jsonl(path: str, report: BadRecords) -> Iterator[Tuple[int, object]]:
    """``(line_number, obj)`` per non-blank jsonl line; bad lines go to ``report``."""
    for start, blob, complete in iter_line_chunks(path, report):
        lines = blob.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for k, line in enumerate(lines):
            n = start + k
            if not line.strip():
                continue
            if not complete and k == len(lines) - 1:
                report.add(path, n, "truncated-line")
                continue
            obj, why = decode_json_line(line)
            if why:
                report.add(path, n, why)
            else:
                yield n, obj


def iter_text_paragraphs(path: str, report: BadRecords, mode: str = "blank"
                         ) -> Iterator[Tuple[int, str]]:
    """Plain text documents: paragraphs separated by blank lines (``mode='blank'``) or one per
    line (``mode='line'``); ``(first_line_number, text)``. Undecodable lines are reported."""
    para: List[str] = []
    first = 0
    for start, blob, _complete in iter_line_chunks(path, report):
        lines = blob.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for k, raw in enumerate(lines):
            n = start + k
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r")
            except UnicodeDecodeError:
                report.add(path, n, "invalid-utf8")
                continue
            if mode == "line":
                if line.strip():
                    yield n, line
                continue
            if line.strip():
                if not para:
                    first = n
                para.append(line)
            elif para:
                yield first, "\n".join(para)
                para = []
    if para:
        yield first, "\n".join(para)


def iter_records(path: str, report: BadRecords, text_mode: str = "blank"
                 ) -> Iterator[Tuple[int, object]]:
    """Records of any supported raw file: JSON array elements, jsonl objects, or plain-text
    paragraphs (as strings). ``.json`` files are arrays when they start with ``[``, else jsonl."""
    name = path[:-4] if path.endswith(".zst") else path
    if name.endswith(".json") and sniff_json_array(path):
        yield from iter_json_array(path, report)
    elif name.endswith((".jsonl", ".json")):
        yield from iter_jsonl(path, report)
    elif sniff_json_array(path):
        yield from iter_json_array(path, report)
    else:
        yield from iter_text_paragraphs(path, report, text_mode)


class BigWriter(io.BufferedWriter):
    """A buffered binary file with a large buffer (fewer syscalls for bulk output)."""

    def __init__(self, path: str, buffer_size: int = 1 << 24) -> None:
        super().__init__(io.FileIO(path, "w"), buffer_size=buffer_size)


def write_lines(path: str, lines: Iterable[bytes]) -> int:
    n = 0
    with BigWriter(path) as f:
        for line in lines:
            f.write(line)
            n += 1
    return n


def load_records(paths, what: str = "records", log=None) -> Tuple[List[Tuple[str, int, object]],
                                                                   BadRecords]:
    """Every record of ``paths`` (files, folders or globs of .json arrays / .jsonl[.zst]) as
    ``(path, line_or_index, obj)``, with bad lines reported. Raises ``ValueError`` when there were
    records but every one was bad, or when there were none at all."""
    import sys

    report = BadRecords()
    out: List[Tuple[str, int, object]] = []
    for path in list_input_files(paths, (".json", ".jsonl", ".json.zst", ".jsonl.zst")):
        for n, obj in iter_records(path, report):
            out.append((path, n, obj))
    if report:
        print(f"{what}: skipped {report.total} bad lines {dict(report.counts)}",
              file=log or sys.stderr)
        for ex in report.examples:
            print(f"  bad: {ex}", file=log or sys.stderr)
    if not out:
        raise ValueError(f"{what}: no valid records in {paths!r}"
                         + (f" ({report.total} bad: {report.examples[:3]})" if report else ""))
    return out, report
