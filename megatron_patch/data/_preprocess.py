"""Tokenise jsonl / jsonl.zst / JSON-array corpora into megatron-core ``.bin/.idx`` datasets.

The library behind ``toolkits/pretrain_data_preprocessing/preprocess_data.py`` (flags compatible with
Megatron-LM's ``tools/preprocess_data.py``). Output per json key: ``<prefix>_<key>_document.bin/.idx``
written with megatron-core's ``IndexedDatasetBuilder``; one sequence per document, ``eod`` appended
with ``append_eod``; token dtype uint16 when the vocabulary fits (else int32).

Throughput design: the parent reads the input in 4 MiB blobs of whole lines and hands them to a
process pool (bounded: at most ``2 x workers`` blobs in flight, so memory does not grow with the
input); a worker parses the lines with ``json.loads`` and encodes the whole batch in one call of the
fastest *verified-identical* encoder (``megatron_patch.tokenizer.fast``), returning one flat id
array per key; the parent appends it to the ``.bin`` through a 16 MiB buffer. Results are written in
input order, so the output bytes do not depend on ``workers``.

Bad records (malformed JSON, invalid UTF-8, a missing key, a truncated zstd stream) are counted and
reported as ``file:line: reason``; empty documents are skipped and counted. The run fails only when
no document at all could be written.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from json.decoder import scanstring as _scanstring

from megatron_patch.data.text_io import (BadRecords, iter_json_array, iter_line_chunks,
                                         list_input_files, sniff_json_array)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INPUT_EXTS = (".jsonl", ".jsonl.zst", ".json", ".json.zst")
ARRAY_BATCH_DOCS = 2048


@dataclass
class PreprocessConfig:
    input: Sequence[str] | str
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    tokenizer_type: str = "auto"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    backend: str = "auto"
    log_interval: float = 5.0
    extra: Dict = field(default_factory=dict)


def token_dtype(vocab_size: int):
    """Smallest dtype holding ids ``< vocab_size`` among those megatron-core's index supports."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.int32


# ------------------------------------------------------------------------------------------------
# index writing (megatron-core's builder, with a vectorised, memory-lean finalize)
# ------------------------------------------------------------------------------------------------

def make_builder(bin_path: str, dtype):
    """megatron-core's ``IndexedDatasetBuilder`` with a 16 MiB write buffer, lengths kept in
    compact arrays, and ``finalize`` writing the same bytes as megatron-core's but with numpy
    (megatron-core builds a Python list of every sequence pointer, ~40 bytes per document).

    The ``.bin`` and ``.idx`` are written as ``*.tmp-<pid>`` files and renamed into place by
    ``finalize`` (an existing ``.idx`` removed first): a run that dies part way leaves an earlier
    dataset of the same prefix as it was, and no moment shows a new ``.bin`` beside an old
    ``.idx`` (megatron-core writes both in place)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, _IndexWriter

    class LeanIndexedDatasetBuilder(IndexedDatasetBuilder):
        def __init__(self, path, dt):
            self.final_bin, self.tmp = path, f".tmp-{os.getpid()}"  # (two runs never share one)
            super().__init__(path + self.tmp, dtype=dt)
            self.data_file.close()
            self.data_file = open(path + self.tmp, "wb", buffering=1 << 24)
            self.sequence_lengths = array("i")
            self.document_indices = array("q", [0])

        def add_batch(self, ids: np.ndarray, lengths: np.ndarray) -> None:
            """Append ``len(lengths)`` documents of one sequence each, stored back to back."""
            self.data_file.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
            start = len(self.sequence_lengths)
            self.sequence_lengths.frombytes(np.asarray(lengths, dtype=np.int32).tobytes())
            self.document_indices.frombytes(
                np.arange(start + 1, start + 1 + len(lengths), dtype=np.int64).tobytes())

        def abort(self) -> None:
            """Remove this builder's temporary files (an existing dataset stays as it was)."""
            self.data_file.close()
            for path in (self.final_bin + self.tmp, self.final_bin[:-4] + ".idx" + self.tmp):
                if os.path.exists(path):
                    os.remove(path)

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32) \
                if len(self.sequence_lengths) else np.zeros(0, np.int32)
            docs = np.frombuffer(self.document_indices, dtype=np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            if len(lengths) > 1:
                np.cumsum(lengths[:-1].astype(np.int64) * DType.size(self.dtype), out=pointers[1:])
            with _IndexWriter(idx_path + self.tmp, self.dtype) as writer:
                import struct

                f = writer.idx_writer
                f.write(struct.pack("<Q", len(lengths)))
                f.write(struct.pack("<Q", len(docs)))
                f.write(lengths.tobytes(order="C"))
                f.write(pointers.tobytes(order="C"))
                f.write(docs.tobytes(order="C"))
            if os.path.exists(idx_path):
                os.remove(idx_path)  # an old pair: its index goes first, then both are replaced
            os.replace(self.final_bin + self.tmp, self.final_bin)
            os.replace(idx_path + self.tmp, idx_path)

    return LeanIndexedDatasetBuilder(bin_path, dtype)


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------

_STATE: dict = {}


def _set_state(encoder, keys, append_eod, eod, dtype) -> None:
    _STATE.update(encoder=encoder, keys=tuple(keys), append_eod=append_eod, eod=eod, dtype=dtype)


def _encode_texts(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(ids in the output dtype, per-document lengths) for non-empty ``texts``."""
    enc, eod, dtype = _STATE["encoder"], _STATE["eod"], _STATE["dtype"]
    flat, offsets = enc.encode_flat(texts)
    lengths = np.diff(offsets)
    if _STATE["append_eod"]:
        flat = np.insert(flat, offsets[1:], eod)  # eod after every document
        lengths = lengths + 1
    else:
        keep = lengths > 0  # a document that encodes to nothing would be an empty sequence
        lengths = lengths[keep]
    return flat.astype(dtype, copy=False), lengths.astype(np.int32)


def _has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (valid JSON, ``"\\ud800"``, but no
    tokenizer takes it: it has no UTF-8 form)."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _add_record(path: str, n: int, obj, keys, texts: Dict[str, List[str]], bad: BadRecords) -> int:
    """File one parsed record's texts under their keys; returns how many were empty."""
    if not isinstance(obj, dict):
        bad.add(path, n, "not-an-object")
        return 0
    vals = [obj.get(k) for k in keys]
    missing = [k for k, v in zip(keys, vals) if not isinstance(v, str)]
    if missing:
        bad.add(path, n, "missing-key", ",".join(missing))
        return 0
    broken = [k for k, v in zip(keys, vals) if _has_lone_surrogate(v)]
    if broken:
        bad.add(path, n, "invalid-unicode", "lone surrogate in " + ",".join(broken))
        return 0
    if len(keys) > 1 and not all(vals):
        # one dataset per key, document i of each from record i: a record with an empty value
        # is left out of all of them (counted once), or the datasets would stop lining up
        return 1
    empty = 0
    for k, v in zip(keys, vals):
        if v:
            texts[k].append(v)
        else:
            empty += 1
    return empty


def _parse_lines(path: str, first: int, blob: bytes, complete: bool, keys,
                 texts: Dict[str, List[str]], bad: BadRecords) -> int:
    """Parse the jsonl lines of ``blob`` into ``texts``; returns the number of empty documents.

    Fast path for the common one-key line ``{"<key>": "..."}``: one UTF-8 decode per blob and
    ``json.decoder.scanstring`` (the C string scanner ``json.loads`` itself uses, strict mode) for
    the value; any other line shape goes through ``json.loads``. Results are identical."""
    if first == 1 and blob.startswith(b"\xef\xbb\xbf"):
        blob = blob[3:]  # a UTF-8 byte-order mark is not part of the first line
    try:
        text = blob.decode("utf-8")
        lines = text.split("\n")
    except UnicodeDecodeError:
        text = None
        lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    last = len(lines) - 1
    empty = 0
    fast = text is not None and len(keys) == 1
    if fast:
        k = json.dumps(keys[0])
        p1, p2 = "{" + k + ": \"", "{" + k + ":\""
        n1, n2 = len(p1), len(p2)
        out = texts[keys[0]]
        append = out.append
    scan = _scanstring
    for i, line in enumerate(lines):
        if fast and i != last:
            start = n1 if line.startswith(p1) else (n2 if line.startswith(p2) else 0)
            if start:
                try:
                    val, end = scan(line, start)
                except ValueError:
                    end = -1
                if end == len(line) - 1 and line[end] == "}" or \
                        (end > 0 and line[end:].strip() == "}"):
                    if "\\u" in line and _has_lone_surrogate(val):
                        bad.add(path, first + i, "invalid-unicode", "lone surrogate in " + keys[0])
                    elif val:
                        append(val)
                    else:
                        empty += 1
                    continue
        if not complete and i == last:
            bad.add(path, first + i, "truncated-line")
            continue
        try:
            obj = json.loads(line if text is not None else line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.add(path, first + i, "invalid-utf8")
            continue
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep to parse
            if not line.strip():
                continue
            bad.add(path, first + i, "malformed-json", str(e)[:80])
            continue
        empty += _add_record(path, first + i, obj, keys, texts, bad)
    return empty


def encode_task(task) -> dict:
    """Parse and encode one task: ``("lines", path, first_line, blob, complete)``,
    ``("range", path, first_line, offset, length)`` (whole lines of a plain file, read here),
    ``("zfile", path, 1)`` (a whole small compressed file, decompressed here) or
    ``("docs", path, first_index, [record, ...])``. Returns ids per key and the bad records."""
    kind, path, first = task[0], task[1], task[2]
    keys = _STATE["keys"]
    bad = BadRecords(keep=50)
    texts: Dict[str, List[str]] = {k: [] for k in keys}
    if kind == "lines":
        nbytes = len(task[3])
        empty = _parse_lines(path, first, task[3], task[4], keys, texts, bad)
    elif kind == "range":
        with open(path, "rb") as f:
            f.seek(task[3])
            blob = f.read(task[4])
        nbytes = len(blob)
        empty = _parse_lines(path, first, blob, True, keys, texts, bad)
    elif kind == "zfile":
        nbytes = empty = 0
        for start, blob, complete in iter_line_chunks(path, bad):
            nbytes += len(blob)
            empty += _parse_lines(path, start, blob, complete, keys, texts, bad)
    else:
        nbytes = 0
        empty = 0
        for n, obj in enumerate(task[3], start=first):
            empty += _add_record(path, n, obj, keys, texts, bad)
            if isinstance(obj, dict):
                nbytes += sum(len(obj[k].encode("utf-8")) for k in keys
                              if isinstance(obj.get(k), str))
    out = {}
    docs = 0
    for k in keys:
        if texts[k]:
            ids, lengths = _encode_texts(texts[k])
            out[k] = (ids, lengths)
            docs += len(lengths)
    return {"ids": out, "docs": docs, "empty": empty, "bytes": nbytes,
            "bad_counts": dict(bad.counts), "bad_examples": bad.examples}


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------

ZFILE_MAX = 4 << 20  # compressed files up to this size are handed to a worker whole


def _tasks(files: Sequence[str], report: BadRecords, ipc: bool = False) -> Iterator[tuple]:
    """Work items in input order. With ``ipc`` (a worker pool), workers read the data themselves
    where they can (line ranges of plain files, whole small ``.zst`` files), so the parent does not
    pickle every byte through a pipe."""
    for path in files:
        if path.endswith((".json", ".json.zst")) and sniff_json_array(path):
            batch: List[object] = []
            start = 1
            for idx, obj in iter_json_array(path, report):
                if not batch:
                    start = idx
                batch.append(obj)
                if len(batch) >= ARRAY_BATCH_DOCS:
                    yield ("docs", path, start, batch)
                    batch = []
            if batch:
                yield ("docs", path, start, batch)
            continue
        if ipc and path.endswith(".zst") and os.path.getsize(path) <= ZFILE_MAX:
            yield ("zfile", path, 1)
            continue
        plain = ipc and not path.endswith(".zst")
        offset = 0
        for first, blob, complete in iter_line_chunks(path, report):
            if plain:
                yield ("range", path, first, offset, len(blob))
                offset += len(blob)
            else:
                yield ("lines", path, first, blob, complete)


def _sample_texts(files: Sequence[str], key: str, limit: int = 256) -> List[str]:
    """Up to ``limit`` documents from the start of the input, for the encoder identity check."""
    out: List[str] = []
    scratch = BadRecords()
    for task in _tasks(files[:1], scratch):
        recs = task[3].split(b"\n", 4 * limit) if task[0] == "lines" else task[3]
        for r in recs:
            if isinstance(r, bytes):
                try:
                    r = json.loads(r.decode("utf-8-sig"))
                except (ValueError, RecursionError):  # bad lines are reported by the run itself
                    continue
            if isinstance(r, dict) and isinstance(r.get(key), str) and \
                    0 < len(r[key]) <= 1 << 16 and not _has_lone_surrogate(r[key]):
                out.append(r[key])
                if len(out) >= limit:
                    return out
        break
    return out


class _Progress:
    def __init__(self, interval: float, stream=None) -> None:
        stream = stream or sys.stderr
        self.t0 = self.last = time.time()
        self.interval = interval
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, docs: int, nbytes: int, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        line = (f"[preprocess] {docs:,} docs {nbytes / 1e6:,.1f} MB | {docs / dt:,.0f} docs/s "
                f"{nbytes / 1e6 / dt:,.2f} MB/s")
        if self.tty and not final:
            self.stream.write("\r" + line)
        else:
            self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()


def _run_partition(files, prefix, cfg: PreprocessConfig, tokenizer, encoder, dtype,
                   report: BadRecords, progress: _Progress, totals: Counter,
                   keep_empty: bool = False) -> Dict[str, str]:
    """One dataset per key at ``prefix``; when no document was written (and not ``keep_empty``)
    nothing is renamed into place: an earlier dataset of the same prefix stays as it was."""
    builders = {}
    outputs = {}
    for key in cfg.json_keys:
        out_prefix = f"{prefix}_{key}_document"
        builders[key] = make_builder(out_prefix + ".bin", dtype)
        outputs[key] = out_prefix
    _set_state(encoder, cfg.json_keys, cfg.append_eod, tokenizer.eod, dtype)

    def consume(res: dict) -> None:
        for key, (ids, lengths) in res["ids"].items():
            builders[key].add_batch(ids, lengths)
            totals["tokens"] += int(len(ids))
        totals["docs"] += res["docs"]
        totals["empty"] += res["empty"]
        totals["bytes"] += res["bytes"]
        report.merge_dict(res["bad_counts"], res["bad_examples"])
        progress.update(totals["docs"], totals["bytes"])

    workers = max(1, int(cfg.workers))
    totals.setdefault("setup_cpu", _cpu_seconds())
    docs_before = totals["docs"]
    if workers == 1:
        for task in _tasks(files, report):
            consume(encode_task(task))
    else:
        import gc

        gc.freeze()  # forked workers then do not copy the parent's heap pages by collecting them
        try:
            ctx = mp.get_context("fork")
            with ctx.Pool(workers) as pool:
                inflight: deque = deque()
                for task in _tasks(files, report, ipc=True):
                    inflight.append(pool.apply_async(encode_task, (task,)))
                    while len(inflight) >= 2 * workers:
                        consume(inflight.popleft().get())
                while inflight:
                    consume(inflight.popleft().get())
                pool.close()
                pool.join()
        finally:
            gc.unfreeze()
    if totals["docs"] == docs_before and not keep_empty:
        for b in builders.values():
            b.abort()
        return outputs
    for key, b in builders.items():
        b.finalize(outputs[key] + ".idx")
    return outputs


def _remove_stale_temporaries(prefix: str, keys, log) -> None:
    """``*.tmp-<pid>`` files of this prefix left by a run that was killed (its pid is gone)."""
    import glob

    for key in keys:
        for path in glob.glob(glob.escape(f"{prefix}_{key}_document") + ".*.tmp-*") + \
                glob.glob(glob.escape(f"{prefix}_partition_") + "*" +
                          glob.escape(f"_{key}_document") + ".*.tmp-*"):
            pid = path.rsplit(".tmp-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # a live run's
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
            os.remove(path)
            print(f"[preprocess] removed {path} (left by an interrupted run)", file=log)


def preprocess(cfg: PreprocessConfig, tokenizer=None, log=None) -> dict:
    """Run the whole conversion; returns a summary dict (``ok`` False when nothing was written)."""
    from megatron_patch.tokenizer import build_tokenizer
    from megatron_patch.tokenizer.fast import make_batch_encoder

    log = log or sys.stderr
    t0 = time.time()
    cpu0 = _cpu_seconds()
    files = list_input_files(cfg.input, INPUT_EXTS)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model,
                                    vocab_file=cfg.vocab_file, merge_file=cfg.merge_file)
    dtype = token_dtype(tokenizer.original_vocab_size)
    sample = _sample_texts(files, cfg.json_keys[0])
    encoder = make_batch_encoder(tokenizer, cfg.backend, verify=sample)
    if encoder.fallback_reason:
        print(f"[preprocess] using the reference tokenizer: {encoder.fallback_reason}", file=log)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temporaries(cfg.output_prefix, cfg.json_keys, log)
    report = BadRecords(keep=50)
    totals: Counter = Counter()
    progress = _Progress(cfg.log_interval, log)
    parts = max(1, min(int(cfg.partitions), len(files)))
    if parts == 1:
        outputs = _run_partition(files, cfg.output_prefix, cfg, tokenizer, encoder, dtype, report,
                                 progress, totals)
    else:
        # Megatron-LM's --partitions: contiguous groups of files, each its own dataset, merged
        # in order at the end (the result equals a single partition's).
        groups = [files[i * len(files) // parts:(i + 1) * len(files) // parts]
                  for i in range(parts)]
        part_outputs = []
        for i, group in enumerate(groups):
            part_outputs.append(_run_partition(group, f"{cfg.output_prefix}_partition_{i}", cfg,
                                               tokenizer, encoder, dtype, report, progress,
                                               totals, keep_empty=True))
        outputs = {}
        for key in cfg.json_keys:
            if not totals["docs"]:  # nothing to merge: the partitions go, an old dataset stays
                for po in part_outputs:
                    for ext in (".bin", ".idx"):
                        os.remove(po[key] + ext)
                outputs[key] = f"{cfg.output_prefix}_{key}_document"
                continue
            final = f"{cfg.output_prefix}_{key}_document"
            builder = make_builder(final + ".bin", dtype)
            for po in part_outputs:
                builder.add_index(po[key])
            builder.finalize(final + ".idx")
            for po in part_outputs:
                for ext in (".bin", ".idx"):
                    os.remove(po[key] + ext)
            outputs[key] = final
    progress.update(totals["docs"], totals["bytes"], final=True)
    wall = time.time() - t0
    cpu = _cpu_seconds() - cpu0
    summary = {
        "ok": totals["docs"] > 0,
        "files": len(files),
        "documents": totals["docs"],
        "empty_documents": totals["empty"],
        "bad_records": report.as_dict(),
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "setup_cpu_seconds": round(totals.get("setup_cpu", cpu0) - cpu0, 3),
        "backend": encoder.name,
        "backend_note": encoder.fallback_reason,
        "dtype": np.dtype(dtype).name,
        "outputs": outputs,
        "append_eod": cfg.append_eod,
        "workers": cfg.workers,
    }
    if not totals["docs"]:
        print(f"[preprocess] no documents: nothing written (an existing "
              f"{cfg.output_prefix}_*_document.bin/.idx is left as it was)", file=log)
    print(f"[preprocess] done: {len(files)} files, {totals['docs']:,} documents, "
          f"{totals['tokens']:,} tokens, {totals['empty']} empty, {report.total} bad records, "
          f"{totals['bytes'] / 1e6:.1f} MB in {wall:.1f}s ({totals['bytes'] / 1e6 / max(wall, 1e-9):.2f}"
          f" MB/s), backend {encoder.name}, dtype {summary['dtype']} -> "
          f"{', '.join(v + '.bin/.idx' for v in outputs.values())}", file=log, flush=True)
    for ex in report.examples[:20]:
        print(f"  bad: {ex}", file=log)
    return summary


def _cpu_seconds() -> float:
    import resource

    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
