"""Cleaning raw pretraining text (WuDao JSON arrays, jsonl, plain text) into ``{"text": ...}`` jsonl.

Per document: Unicode NFKC, line ends to ``\\n``, control / zero-width characters removed, URLs and
e-mail addresses removed, runs of horizontal whitespace collapsed to one space, spaces around
newlines and 3+ newlines trimmed. Newlines and every script are kept; PAI's old whitelist that keeps
only CJK + ASCII (it silently deletes Cyrillic, accents, Japanese kana, ...) is available as
``ascii_cjk_only=True`` for reproducing old corpora.

Filters: ``min_chars`` (after cleaning), ``max_symbol_ratio`` (share of non-space characters that are
neither letters, digits nor ``_``), and exact duplicates across the whole corpus: a 64-bit blake2b
hash per kept document, held in sorted numpy runs (8 bytes per unique document, e.g. 800 MB for
10^8 documents; collision chance for 10^8 documents ~3e-4 of losing one document).

Files are cleaned in a process pool; duplicates are decided in the parent in input-file order, so
the output does not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np

from megatron_patch.data.text_io import BadRecords, BigWriter, iter_records, list_input_files

RAW_EXTS = (".json", ".jsonl", ".txt", ".json.zst", ".jsonl.zst", ".txt.zst")

_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e"
                         "\u2060-\u2064\ufeff\ud800-\udfff]")
_URL_RE = re.compile(r"(?:https?|ftp)://[^\s<>\"'\u3000-\u303f\uff00-\uffef]+|www\.[a-zA-Z0-9-]+"
                     r"(?:\.[a-zA-Z0-9-]+)+[^\s<>\"'\u3000-\u303f\uff00-\uffef]*")
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_HSPACE_RE = re.compile(r"[^\S\n]+")
_NL_SPACE_RE = re.compile(r" ?\n ?")
_MANY_NL_RE = re.compile(r"\n{3,}")
_SYMBOL_RE = re.compile(r"[^\w\s]")
_SPACE_RE = re.compile(r"\s")
# PAI's legacy whitelist: CJK unified ideographs, CJK punctuation, full-width forms and ASCII
_NOT_ASCII_CJK_RE = re.compile("[^\u4e00-\u9fff\u3000-\u303f\uff00-\uffef\x09\x0a\x20-\x7e]")


@dataclass
class CleanOptions:
    min_chars: int = 10
    max_symbol_ratio: float = 0.5
    dedup: bool = True
    ascii_cjk_only: bool = False
    remove_urls: bool = True
    remove_emails: bool = True
    text_keys: Sequence[str] = ("text", "content")
    title_key: str = "title"
    text_mode: str = "blank"  # plain text: paragraphs split by blank lines, or "line"


def clean_text(text: str, opts: CleanOptions = CleanOptions()) -> str:
    """Normalise one document (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    if opts.remove_urls:
        text = _URL_RE.sub("", text)
    if opts.remove_emails:
        text = _EMAIL_RE.sub("", text)
    if opts.ascii_cjk_only:
        text = _NOT_ASCII_CJK_RE.sub("", text)
    text = _HSPACE_RE.sub(" ", text)
    text = _NL_SPACE_RE.sub("\n", text)
    text = _MANY_NL_RE.sub("\n\n", text)
    return text.strip()


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are not word characters (letters, digits, ``_``)."""
    non_space = len(text) - len(_SPACE_RE.findall(text))
    if non_space <= 0:
        return 0.0
    return len(_SYMBOL_RE.findall(text)) / non_space


def drop_reason(text: str, opts: CleanOptions) -> Optional[str]:
    if not text:
        return "empty"
    if len(text) < opts.min_chars:
        return "too_short"
    if symbol_ratio(text) > opts.max_symbol_ratio:
        return "symbol_ratio"
    return None


def extract_text(rec, opts: CleanOptions) -> Optional[str]:
    """The document text of a record: WuDao ``title`` + ``content``, ``text``, or a plain string."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    for key in opts.text_keys:
        val = rec.get(key)
        if isinstance(val, str):
            title = rec.get(opts.title_key)
            if key != "text" and isinstance(title, str) and title.strip() \
                    and not val.lstrip().startswith(title.strip()):
                return title.strip() + "\n" + val
            return val
    return None


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class SeenHashes:
    """A set of 64-bit hashes as sorted numpy runs merged like a binary counter (LSM): 8 bytes per
    entry, vectorised membership tests, no Python object per document."""

    def __init__(self) -> None:
        self.runs: List[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, h: np.ndarray) -> np.ndarray:
        found = np.zeros(len(h), dtype=bool)
        for run in self.runs:
            if len(run) == 0:
                continue
            idx = np.searchsorted(run, h)
            idx[idx >= len(run)] = len(run) - 1
            found |= run[idx] == h
        return found

    def add_unique(self, h: np.ndarray) -> None:
        """Add hashes known to be new and distinct."""
        run = np.sort(h)
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.union1d(self.runs.pop(), run)
        self.runs.append(run)

    def keep_mask(self, h: np.ndarray) -> np.ndarray:
        """True for the first occurrence of each hash not seen before; records them as seen."""
        keep = np.zeros(len(h), dtype=bool)
        if len(h) == 0:
            return keep
        _, first = np.unique(h, return_index=True)
        keep[first] = True
        keep &= ~self.contains(h)
        self.add_unique(h[keep])
        return keep


def _output_name(path: str, root: Optional[str]) -> str:
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    for ext in (".zst", ".jsonl", ".json", ".txt"):
        if rel.endswith(ext):
            rel = rel[: -len(ext)]
    return rel + ".jsonl"


def clean_file(path: str, tmp_path: str, opts: CleanOptions) -> dict:
    """Clean one raw file into ``tmp_path`` (before deduplication); returns counts and hashes."""
    report = BadRecords()
    dropped: Counter = Counter()
    hashes = array("Q")
    docs_in = 0
    with BigWriter(tmp_path) as out:
        for n, rec in iter_records(path, report, opts.text_mode):
            text = extract_text(rec, opts)
            if text is None:
                report.add(path, n, "no-text-field")
                continue
            docs_in += 1
            text = clean_text(text, opts)
            why = drop_reason(text, opts)
            if why:
                dropped[why] += 1
                continue
            out.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8"))
            out.write(b"\n")
            hashes.append(doc_hash(text))
    return {"path": path, "docs_in": docs_in, "dropped": dict(dropped),
            "bad": report.as_dict(), "hashes": hashes.tobytes()}


def _filter_file(tmp_path: str, out_path: str, keep: Optional[bytes]) -> int:
    """Copy the lines of ``tmp_path`` whose ``keep`` flag is set to ``out_path``; remove tmp."""
    if keep is None:
        os.replace(tmp_path, out_path)
        with open(out_path, "rb") as f:
            return sum(blob.count(b"\n") for blob in iter(lambda: f.read(1 << 22), b""))
    flags = np.frombuffer(keep, dtype=bool)
    n = 0
    part = out_path + ".part"  # renamed into place when whole: no half-written output
    with open(tmp_path, "rb") as src, BigWriter(part) as dst:
        for i, line in enumerate(src):
            if flags[i]:
                dst.write(line)
                n += 1
    os.replace(part, out_path)
    os.remove(tmp_path)
    return n


def _previous_outputs(output_dir: str) -> List[str]:
    """The outputs an earlier run's ``clean_summary.json`` in ``output_dir`` lists (inside it)."""
    try:
        with open(os.path.join(output_dir, "clean_summary.json"), encoding="utf-8") as f:
            outs = json.load(f).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    root = os.path.abspath(output_dir) + os.sep
    return [os.path.abspath(o) for o in outs
            if isinstance(o, str) and os.path.abspath(o).startswith(root)]


def _clean_task(args):
    path, tmp_path, opts = args
    return clean_file(path, tmp_path, opts)


def _filter_task(args):
    return _filter_file(*args)


def clean_corpus(inputs, output_dir: str, processes: int = 1, opts: CleanOptions = CleanOptions(),
                 log=None) -> dict:
    """Clean every raw file of ``inputs`` (file, folder or glob) into ``output_dir`` (one
    ``.jsonl`` per input file), deduplicate across all of them, print and return a summary (also
    written to ``output_dir/clean_summary.json``)."""
    log = log or sys.stderr
    t0 = time.time()
    files = list_input_files(inputs, RAW_EXTS)
    if isinstance(inputs, str) and os.path.isdir(inputs):
        root = inputs
    else:  # files and globs: names relative to their common folder, so x/a and y/a both live
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        files = [os.path.abspath(f) for f in files]
    os.makedirs(output_dir, exist_ok=True)
    names = [_output_name(f, root) for f in files]
    seen_names = Counter(names)
    # a.json and a.jsonl would both be a.jsonl: those keep their whole name (a.json.jsonl)
    names = [n if seen_names[n] == 1 else os.path.relpath(f, root) + ".jsonl"
             for n, f in zip(names, files)]
    jobs = []
    for f, name in zip(files, names):
        out = os.path.join(output_dir, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        jobs.append((f, out + ".tmp", opts))
    previous = _previous_outputs(output_dir)
    seen = SeenHashes()
    bad = BadRecords()
    dropped: Counter = Counter()
    docs_in = kept = 0
    outputs = []
    processes = max(1, int(processes))
    ctx = mp.get_context("fork")
    pool = ctx.Pool(min(processes, len(jobs))) if processes > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_clean_task, jobs) if pool else map(_clean_task, jobs)
        pending = []
        for k, res in enumerate(results):
            docs_in += res["docs_in"]
            dropped.update(res["dropped"])
            bad.merge_dict(res["bad"]["by_reason"], res["bad"]["examples"])
            keep = None
            if opts.dedup:
                h = np.frombuffer(res["hashes"], dtype=np.uint64)
                mask = seen.keep_mask(h)
                dropped["duplicate"] += int(len(h) - mask.sum())
                keep = None if mask.all() else mask.tobytes()
            tmp, out = jobs[k][1], jobs[k][1][:-4]
            outputs.append(out)
            task = (tmp, out, keep)
            pending.append(pool.apply_async(_filter_task, (task,)) if pool else _filter_task(task))
            print(f"[clean {k + 1}/{len(jobs)}] {res['path']}: {res['docs_in']} documents",
                  file=log, flush=True)
        for p in pending:
            kept += p.get() if pool else p
    finally:
        if pool:
            pool.close()
            pool.join()
    summary = {
        "files": len(files),
        "documents_in": docs_in,
        "kept": kept,
        "dropped": {k: dropped.get(k, 0) for k in ("empty", "too_short", "symbol_ratio",
                                                    "duplicate")},
        "bad_records": bad.as_dict(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "outputs": outputs,
        "seconds": round(time.time() - t0, 3),
    }
    # outputs of an earlier run into this folder that this run did not write would be read by the
    # next step as data: they go (only files the earlier summary lists as its own outputs)
    stale = sorted(set(previous) - {os.path.abspath(o) for o in outputs})
    for path in stale:
        if os.path.isfile(path):
            os.remove(path)
    summary["stale_outputs_removed"] = stale
    path = os.path.join(output_dir, "clean_summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    d = summary["dropped"]
    print(f"clean: {len(files)} files, documents in {docs_in}, kept {kept}, dropped "
          f"empty={d['empty']} too_short={d['too_short']} symbol_ratio={d['symbol_ratio']} "
          f"duplicate={d['duplicate']}, bad lines {bad.total}"
          + (f" ({dict(bad.counts)})" if bad.total else ""), file=log, flush=True)
    for ex in bad.examples[:10]:
        print(f"  bad: {ex}", file=log)
    return summary
