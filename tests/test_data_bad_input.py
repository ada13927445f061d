"""Stage 1 on input that used to crash a run, lose documents or leave wrong files behind:
valid JSON no tokenizer takes (a lone surrogate) or too deep to parse, UTF-8 byte-order marks,
invalid UTF-8 inside a JSON array, a rerun that writes nothing, temporaries of a killed run, clean
outputs whose names collide, stale clean outputs and shards of an earlier run, and a truncated
``.zst`` line in the shard step. Fast: tiny files, the shipped LLaMA sentencepiece model.
"""
import json
import os

import pytest
import zstandard

from data_fixtures import llama_model
from megatron_patch.data._clean import clean_corpus
from megatron_patch.data._preprocess import PreprocessConfig, preprocess
from megatron_patch.data._shard import shard_and_compress
from megatron_patch.data.text_io import BadRecords, iter_records, load_records
from megatron_patch.tokenizer import build_tokenizer

TEXTS = [f"document number {i} says hello to the world" for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("auto", llama_model())


def _lines(texts):
    return [json.dumps({"text": t}).encode() for t in texts]


def _dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix + "_text_document")


@pytest.mark.parametrize("workers", [1, 2])
def test_unparseable_valid_json_is_counted_not_fatal(tmp_path, tok, workers):
    """A lone surrogate escape (valid JSON, no UTF-8 form: the tokenizer raised on the whole
    batch) and a line nested 100k deep (RecursionError), in the first file, where the encoder's
    sample is drawn from too; plus a BOM before the first line (its document was lost)."""
    lines = _lines(TEXTS[:10])
    lines[3] = b'{"text": "bad \\ud800 surrogate"}'
    lines[5] = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    lines[7] = b'{"text": "fine", "n": 1, "x": "\\udfff"}'  # the slow path: fine (not a key)
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    prefix = str(tmp_path / "out" / f"w{workers}")
    s = preprocess(PreprocessConfig(input=str(tmp_path / "a.jsonl"), output_prefix=prefix,
                                    append_eod=True, workers=workers), tokenizer=tok)
    assert s["bad_records"]["by_reason"] == {"invalid-unicode": 1, "malformed-json": 1}
    ex = "\n".join(s["bad_records"]["examples"])
    assert "a.jsonl:4: invalid-unicode" in ex and "a.jsonl:6: malformed-json" in ex
    expected = [t for i, t in enumerate(TEXTS[:10]) if i not in (3, 5)]
    expected[expected.index(TEXTS[7])] = "fine"
    ds = _dataset(prefix)
    assert s["documents"] == len(ds) == len(expected)
    assert [ds[i].tolist() for i in range(len(ds))] == \
        [ids + [tok.eod] for ids in tok.encode_batch(expected)]


def test_a_rerun_that_writes_nothing_keeps_the_earlier_dataset(tmp_path, tok):
    (tmp_path / "good.jsonl").write_bytes(b"\n".join(_lines(TEXTS)) + b"\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"title": "no text"}\nnot json\n')
    prefix = str(tmp_path / "out" / "ds")
    preprocess(PreprocessConfig(input=str(tmp_path / "good.jsonl"), output_prefix=prefix,
                                append_eod=True), tokenizer=tok)
    before = {e: open(prefix + "_text_document" + e, "rb").read() for e in (".bin", ".idx")}
    for parts in (1, 2):
        s = preprocess(PreprocessConfig(input=[str(tmp_path / "bad.jsonl")] * parts,
                                        output_prefix=prefix, append_eod=True, partitions=parts),
                       tokenizer=tok)
        assert not s["ok"] and s["documents"] == 0
        assert {e: open(prefix + "_text_document" + e, "rb").read()
                for e in (".bin", ".idx")} == before
        assert sorted(os.listdir(tmp_path / "out")) == ["ds_text_document.bin",
                                                        "ds_text_document.idx"]
    assert len(_dataset(prefix)) == len(TEXTS)


def test_temporaries_of_a_killed_run_are_removed(tmp_path, tok):
    (tmp_path / "good.jsonl").write_bytes(b"\n".join(_lines(TEXTS)) + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    dead = 4_000_000  # above Linux's pid_max default: no process has it
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    stale = [out / f"ds_text_document.bin.tmp-{dead}", out / f"ds_text_document.idx.tmp-{dead}",
             out / f"ds_partition_0_text_document.bin.tmp-{dead}"]
    live = out / f"ds_text_document.bin.tmp-{os.getppid()}"  # a live process's: kept
    for p in stale + [live]:
        p.write_bytes(b"partial")
    preprocess(PreprocessConfig(input=str(tmp_path / "good.jsonl"), output_prefix=str(out / "ds"),
                                append_eod=True), tokenizer=tok)
    assert not any(p.exists() for p in stale) and live.exists()
    assert len(_dataset(str(out / "ds"))) == len(TEXTS)


def test_json_arrays_with_a_bom_bad_bytes_or_deep_nesting(tmp_path):
    arr = json.dumps([{"text": t} for t in TEXTS[:5]]).encode()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + arr)
    records, report = load_records(str(tmp_path / "bom.json"))
    assert [r[2]["text"] for r in records] == TEXTS[:5] and not report
    (tmp_path / "latin1.json").write_bytes(arr.replace(b"number 2", b"caf\xe9 2"))
    report = BadRecords()
    got = [o["text"] for _, o in iter_records(str(tmp_path / "latin1.json"), report)]
    assert got[2] == "document caf\ufffd 2 says hello to the world" and len(got) == 5
    assert report.counts == {"invalid-utf8": 1}  # kept, but counted (it was silent)
    (tmp_path / "deep.json").write_bytes(b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]")
    report = BadRecords()
    assert list(iter_records(str(tmp_path / "deep.json"), report)) == []
    assert report.counts == {"malformed-json": 1} and "nested too deep" in report.examples[0]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(_lines(TEXTS[:3])))
    report = BadRecords()
    assert [o["text"] for _, o in iter_records(str(tmp_path / "bom.jsonl"), report)] == TEXTS[:3]
    assert not report


def test_clean_output_names_never_collide_and_stale_outputs_go(tmp_path):
    raw = tmp_path / "raw"
    for sub, name, texts in (("x", "news.json", TEXTS[:10]), ("x", "news.jsonl", TEXTS[10:20]),
                             ("y", "news.jsonl", TEXTS[20:30])):
        (raw / sub).mkdir(parents=True, exist_ok=True)
        body = json.dumps([{"text": t} for t in texts]) if name.endswith(".json") else \
            "\n".join(json.dumps({"text": t}) for t in texts)
        (raw / sub / name).write_text(body)
    out = tmp_path / "clean"
    s = clean_corpus(str(raw / "x"), str(out), opts=_opts())
    assert s["kept"] == 20 and len(set(s["outputs"])) == 2
    assert sum(len(open(p).read().splitlines()) for p in s["outputs"]) == 20
    s = clean_corpus(str(raw / "*" / "news.jsonl"), str(tmp_path / "clean2"), opts=_opts())
    assert sorted(os.path.relpath(p, tmp_path / "clean2") for p in s["outputs"]) == \
        [os.path.join("x", "news.jsonl"), os.path.join("y", "news.jsonl")]
    assert sum(len(open(p).read().splitlines()) for p in s["outputs"]) == 20
    # a rerun over fewer inputs: the earlier run's own outputs that this one did not write go
    s = clean_corpus(str(raw / "y"), str(out), opts=_opts())
    left = sorted(f for f in os.listdir(out) if f.endswith(".jsonl"))
    assert left == ["news.jsonl"] and s["kept"] == 10 and len(s["stale_outputs_removed"]) == 2


def _opts():
    from megatron_patch.data._clean import CleanOptions

    return CleanOptions(min_chars=1)


def test_shard_reports_a_cut_line_and_removes_stale_shards(tmp_path):
    texts = [f"line {i}: " + " ".join(str(i * k % 9973) for k in range(12)) for i in range(6000)]
    blob = zstandard.ZstdCompressor().compress(b"".join(x + b"\n" for x in _lines(texts)))
    (tmp_path / "in").mkdir()
    # cut inside the second 128 KiB block: the first block ends inside a line
    (tmp_path / "in" / "cut.jsonl.zst").write_bytes(blob[:len(blob) * 3 // 4])
    s = shard_and_compress(str(tmp_path / "in"), str(tmp_path / "z"), lines_per_shard=1000)
    got = b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(
        open(os.path.join(tmp_path / "z", f), "rb").read())
        for f in sorted(os.listdir(tmp_path / "z")))
    whole = [json.loads(x)["text"] for x in got.splitlines()]  # every written line parses
    assert whole == texts[:len(whole)] and 0 < len(whole) < len(texts)
    assert s["bad_records"]["by_reason"] == {"truncated-zstd": 1, "truncated-line": 1}
    assert f"cut.jsonl.zst:{len(whole) + 1}: truncated-line" in s["bad_records"]["examples"][1]
    (tmp_path / "in" / "cut.jsonl.zst").write_bytes(blob)
    shard_and_compress(str(tmp_path / "in"), str(tmp_path / "z"), lines_per_shard=1000)
    assert len(os.listdir(tmp_path / "z")) == 6
    s = shard_and_compress(str(tmp_path / "in"), str(tmp_path / "z"), lines_per_shard=4000)
    assert sorted(os.listdir(tmp_path / "z")) == ["shard_00000.jsonl.zst", "shard_00001.jsonl.zst"]
    assert s["stale_shards_removed"] == 4


def test_several_keys_stay_aligned_document_for_document(tmp_path, tok):
    """With --json-keys text title, document i of both datasets comes from the same record: a
    record with one empty value is left out of both (it was left out of one only)."""
    recs = [{"text": t, "title": t[:12]} for t in TEXTS[:6]]
    recs[2]["title"] = ""
    recs[4]["text"] = ""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    prefix = str(tmp_path / "kv")
    s = preprocess(PreprocessConfig(input=str(tmp_path / "a.jsonl"), output_prefix=prefix,
                                    json_keys=("text", "title"), append_eod=True), tokenizer=tok)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    kept = [r for i, r in enumerate(recs) if i not in (2, 4)]
    for key in ("text", "title"):
        ds = IndexedDataset(f"{prefix}_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == \
            [ids + [tok.eod] for ids in tok.encode_batch([r[key] for r in kept])]
    assert s["empty_documents"] == 2
