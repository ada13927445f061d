"""Cleaning rules, filters, corpus-wide dedup independent of the process count, streaming readers
(JSON arrays across block boundaries, truncated zstd), and the shard step."""
import json
import os

import numpy as np
import pytest
import zstandard

from megatron_patch.data import text_io
from megatron_patch.data._clean import (CleanOptions, SeenHashes, clean_corpus, clean_text,
                                        drop_reason, extract_text, symbol_ratio)
from megatron_patch.data._shard import shard_and_compress


def test_clean_text_rules():
    o = CleanOptions()
    assert clean_text("１２月３１日，ＡＢＣ", o) == "12月31日,ABC"  # NFKC
    assert clean_text("a\x00b\x07c\u200bd\ufeffe", o) == "abcde"  # controls, zero-width
    assert clean_text("see https://x.org/a?b=1 and www.example.com/p now", o) == "see and now"
    assert clean_text("mail me: john.doe+x@mail.example.co.uk!", o) == "mail me: !"
    assert clean_text("a  \t b\u3000\u3000c", o) == "a b c"
    assert clean_text("l1  \r\n  l2\r\rl3\n\n\n\n\nl4  ", o) == "l1\nl2\n\nl3\n\nl4"
    multi = "Привет мир. Ελληνικά. café naïve. 日本語のかな. 한국어. عربي"
    assert clean_text(multi, o) == multi  # every script is kept
    legacy = clean_text(multi + " 中文", CleanOptions(ascii_cjk_only=True))
    assert "Привет" not in legacy and "中文" in legacy and "caf" in legacy


def test_filters():
    o = CleanOptions(min_chars=5, max_symbol_ratio=0.5)
    assert drop_reason("", o) == "empty"
    assert drop_reason("abcd", o) == "too_short"
    assert drop_reason("!!!!!!!!??? a", o) == "symbol_ratio"
    assert drop_reason("人民日报社论。", o) is None
    assert symbol_ratio("ab!!") == 0.5
    assert extract_text({"title": "标题", "content": "正文内容"}, o) == "标题\n正文内容"
    assert extract_text({"title": "标题", "content": "标题 正文"}, o) == "标题 正文"
    assert extract_text({"text": "t"}, o) == "t"
    assert extract_text({"other": 1}, o) is None


def test_seen_hashes():
    s = SeenHashes()
    a = np.array([5, 3, 5, 9], dtype=np.uint64)
    assert s.keep_mask(a).tolist() == [True, True, False, True]
    for k in range(20):  # many runs merge like a binary counter
        s.keep_mask(np.array([100 + k], dtype=np.uint64))
    assert len(s.runs) <= 6 and len(s) == 23
    assert s.keep_mask(np.array([3, 7, 110, 7], dtype=np.uint64)).tolist() == \
        [False, True, False, False]


def test_clean_corpus_dedup_and_process_count(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    docs = [f"文档 {i} 的内容，足够长的一段话。" for i in range(50)]
    json.dump([{"title": "", "content": d} for d in docs[:30]] + [{"content": docs[0]}],
              open(raw / "a.json", "w"), ensure_ascii=False)
    with open(raw / "sub" / "b.jsonl", "w") as f:
        for d in docs[25:] + docs[:2]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        f.write("{bad json\n")
        f.write(json.dumps({"text": "short"}) + "\n")
    (raw / "c.txt").write_text("Plain paragraph one, long enough.\nSecond line.\n\n"
                               "Paragraph two, also long enough.\n", encoding="utf-8")
    outs = {}
    for p in (1, 2):
        out = tmp_path / f"clean{p}"
        s = clean_corpus(str(raw), str(out), processes=p, opts=CleanOptions(min_chars=10))
        outs[p] = {f: (out / f).read_bytes() for f in ("a.jsonl", "sub/b.jsonl", "c.jsonl")}
        assert s["documents_in"] == 31 + 27 + 1 + 2
        assert s["dropped"]["duplicate"] == 1 + 5 + 2
        assert s["dropped"]["too_short"] == 1
        assert s["kept"] == 50 + 2
        assert s["bad_records"]["by_reason"] == {"malformed-json": 1}
        assert any("b.jsonl:28" in e for e in s["bad_records"]["examples"])
        assert json.load(open(out / "clean_summary.json"))["kept"] == 52
    assert outs[1] == outs[2]
    texts = [json.loads(line)["text"] for line in outs[1]["c.jsonl"].splitlines()]
    assert texts == ["Plain paragraph one, long enough.\nSecond line.",
                     "Paragraph two, also long enough."]


def test_json_array_streaming_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_io, "BLOCK", 64)  # force many block boundaries (also mid-UTF-8)
    items = [{"title": f"标题{i}", "content": "内容 " * (i % 7) + "😀", "n": i * 1.5}
             for i in range(200)]
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    rep = text_io.BadRecords()
    got = [obj for _i, obj in text_io.iter_json_array(str(p), rep)]
    assert got == items and not rep
    p.write_text(json.dumps(items, ensure_ascii=False)[:-300], encoding="utf-8")
    got = [obj for _i, obj in text_io.iter_json_array(str(p), rep)]
    assert 0 < len(got) < 200 and got == items[:len(got)] and rep.total == 1


def test_truncated_zstd_lines_are_kept(tmp_path):
    lines = [json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(5000)]
    blob = zstandard.ZstdCompressor().compress(b"".join(lines))
    p = tmp_path / "t.jsonl.zst"
    p.write_bytes(blob[: len(blob) // 2])
    rep = text_io.BadRecords()
    got = list(text_io.iter_jsonl(str(p), rep))
    assert len(got) > 100 and [n for n, _o in got] == list(range(1, len(got) + 1))
    assert rep.counts["truncated-zstd"] == 1


def test_shard_and_compress(tmp_path):
    src = tmp_path / "clean"
    src.mkdir()
    all_lines = []
    for k in range(3):
        lines = [json.dumps({"text": f"doc {k}-{i}"}) for i in range(1234)]
        all_lines += lines
        (src / f"f{k}.jsonl").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "zst"
    s = shard_and_compress(str(src), str(out), lines_per_shard=1000, threads=2)
    assert s["lines"] == 3702 and s["shards"] == 4
    names = sorted(os.listdir(out))
    assert names == [f"shard_{i:05d}.jsonl.zst" for i in range(4)]
    back = []
    for n in names:
        data = zstandard.ZstdDecompressor().decompressobj().decompress((out / n).read_bytes())
        back += data.decode().splitlines()
    assert back == all_lines
    with pytest.raises(ValueError):
        shard_and_compress(str(src), str(out), lines_per_shard=0)
