"""Raw text -> clean -> shard+zstd -> .bin/.idx on real corpora (People's Daily as WuDao JSON arrays,
chatterbot English dialogs as jsonl) with real tokenizers; megatron-core reads the result and every
document equals the tokenizer's own ids + eod. Output bytes do not depend on workers, partitions or
compression; bad input is reported and never fatal unless everything is bad."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from data_fixtures import chatterbot_dialogs, gpt2_folder, llama_model, peoples_daily, qwen_tiktoken
from megatron_patch.data._clean import clean_corpus
from megatron_patch.data._preprocess import PreprocessConfig, preprocess
from megatron_patch.data._shard import shard_and_compress
from megatron_patch.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "toolkits", "pretrain_data_preprocessing")


def _read_jsonl_texts(paths):
    texts = []
    for p in paths:
        data = open(p, "rb").read()
        if p.endswith(".zst"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        texts += [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
    return texts


def _bytes(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """raw/ (4 WuDao arrays + 1 jsonl) -> clean/ -> zst/; returns the folders and cleaned texts."""
    root = tmp_path_factory.mktemp("pipeline")
    raw = root / "raw"
    raw.mkdir()
    paras = peoples_daily(6000)
    n = len(paras) // 4
    for i in range(4):
        part = paras[i * n:(i + 1) * n]
        arr = [{"id": j, "title": p[:8], "content": p, "dataType": "news"} for j, p in enumerate(part)]
        arr.append({"id": -1, "title": "", "content": part[0]})  # a duplicate across the corpus
        (raw / f"wudao_{i}.json").write_text(json.dumps(arr, ensure_ascii=False), encoding="utf-8")
    with open(raw / "dialogs.jsonl", "w", encoding="utf-8") as f:
        for q, a in chatterbot_dialogs():
            f.write(json.dumps({"text": f"{q}\n{a}  see https://example.com/x or mail a.b@c.org"})
                    + "\n")
    clean = root / "clean"
    summary = clean_corpus(str(raw), str(clean), processes=2)
    zst = root / "zst"
    shard = shard_and_compress(str(clean), str(zst), lines_per_shard=1000, threads=2)
    shards = sorted(glob.glob(str(zst / "*.jsonl.zst")))
    texts = _read_jsonl_texts(shards)
    return {"root": root, "raw": raw, "clean": clean, "zst": zst, "texts": texts,
            "summary": summary, "shard": shard, "shards": shards}


def _check_dataset(prefix, tok, texts):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts)
    ref = tok.encode_batch(texts)
    for i in range(len(ds)):
        assert ds[i].tolist() == ref[i] + [tok.eod], f"document {i}: {texts[i][:50]!r}"
    return ds


def test_clean_and_shard_summary(corpus):
    s = corpus["summary"]
    assert s["files"] == 5 and s["bad_records"]["total"] == 0
    assert s["kept"] == len(corpus["texts"]) == corpus["shard"]["lines"]
    assert s["documents_in"] == s["kept"] + sum(s["dropped"].values())
    assert s["dropped"]["duplicate"] >= 4
    assert json.load(open(corpus["clean"] / "clean_summary.json"))["kept"] == s["kept"]
    assert len(corpus["shards"]) == -(-s["kept"] // 1000)
    texts = corpus["texts"]
    assert len(set(texts)) == len(texts)
    assert not any("https://" in t or "@c.org" in t for t in texts)
    assert any("\n" in t for t in texts)  # newlines kept
    assert any("中共中央" in t for t in texts)


@pytest.mark.parametrize("family", ["sentencepiece", "gpt2bpe", "tiktoken"])
def test_preprocess_real_tokenizers(corpus, family, tmp_path):
    path = {"sentencepiece": llama_model, "tiktoken": qwen_tiktoken,
            "gpt2bpe": lambda: gpt2_folder(tmp_path)}[family]()
    tok = build_tokenizer(family, path)
    texts = corpus["texts"]
    shards = corpus["shards"] if family == "sentencepiece" else corpus["shards"][:3]
    if family != "sentencepiece":
        texts = _read_jsonl_texts(shards)
    prefix = str(tmp_path / "out" / "wudao")
    summary = preprocess(PreprocessConfig(input=shards, output_prefix=prefix, append_eod=True,
                                          tokenizer_type=family, tokenizer_model=path, workers=1))
    assert summary["ok"] and summary["documents"] == len(texts)
    assert summary["dtype"] == ("uint16" if tok.original_vocab_size <= 65536 else "int32")
    _check_dataset(prefix + "_text_document", tok, texts)


def test_gpt_dataset_over_output(corpus, tmp_path):
    """megatron-core's GPTDataset builds over the output with our tokenizer."""
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = build_tokenizer("auto", llama_model())
    prefix = str(tmp_path / "wd")
    preprocess(PreprocessConfig(input=str(corpus["zst"]), output_prefix=prefix, append_eod=True,
                                tokenizer_model=llama_model()), tokenizer=tok)
    cfg = GPTDatasetConfig(random_seed=1234, sequence_length=64,
                           blend=([prefix + "_text_document"], None), split="98,2,0",
                           path_to_cache=str(tmp_path / "cache"), tokenizer=tok,
                           reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False)
    train, _valid, _test = BlendedMegatronDatasetBuilder(GPTDataset, [50, 5, None], lambda: True,
                                                         cfg).build()
    sample = train[0]
    assert sample["tokens"].shape[0] == 64 and int(sample["tokens"].max()) < tok.vocab_size


def test_workers_partitions_and_compression_do_not_change_bytes(corpus, tmp_path):
    tok = build_tokenizer("auto", llama_model())
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in corpus["shards"]:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(open(p, "rb").read())
        (plain / os.path.basename(p)[:-4]).write_bytes(data)
    outs = {}
    for name, inp, workers, parts in (("w1", str(corpus["zst"]), 1, 1),
                                      ("w2", str(corpus["zst"]), 2, 1),
                                      ("jsonl", str(plain), 1, 1),
                                      ("parts", str(corpus["zst"]), 2, 3),
                                      ("ref", str(corpus["zst"]), 1, 1)):
        prefix = str(tmp_path / name / "wd")
        s = preprocess(PreprocessConfig(input=inp, output_prefix=prefix, append_eod=True,
                                        tokenizer_model=llama_model(), workers=workers,
                                        partitions=parts,
                                        backend="reference" if name == "ref" else "auto"),
                       tokenizer=tok)
        assert s["ok"]
        outs[name] = _bytes(prefix + "_text_document")
    for name in ("w2", "jsonl", "parts", "ref"):
        assert outs[name] == outs["w1"], name
    # the lean index writer writes exactly what megatron-core's own finalize writes
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    ds = IndexedDataset(str(tmp_path / "w1" / "wd_text_document"))
    b = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for i in range(len(ds)):
        b.add_document(ds[i], [len(ds[i])])
    b.finalize(str(tmp_path / "mc.idx"))
    assert _bytes(str(tmp_path / "mc")) == outs["w1"]


def test_bad_input(tmp_path):
    """Malformed JSON, invalid UTF-8, empty documents, a 50 MB line, a truncated .zst."""
    tok = build_tokenizer("auto", llama_model())
    inp = tmp_path / "in"
    inp.mkdir()
    good = peoples_daily(3000)  # the .zst part spans several 128 KiB zstd blocks
    expected = []
    lines = []
    for i, t in enumerate(good[:200]):
        lines.append(json.dumps({"text": t}, ensure_ascii=False).encode())
        expected.append(t)
        if i == 10:
            lines.append(b'{"text": "unterminated')
        if i == 20:
            lines.append(b'{"text": "caf\xe9 latin-1"}')
        if i == 30:
            lines.append(b'{"text": ""}')
        if i == 40:
            lines.append(b'{"title": "no text key"}')
        if i == 50:
            lines.append(b'[1, 2, 3]')
        if i == 60:
            lines.append(b"")
    (inp / "a_bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    unit = "人民日报 People's Daily, 1998年1月。 "
    big = unit * (50 * 1024 * 1024 // len(unit.encode()))
    (inp / "b_big.jsonl").write_text(json.dumps({"text": big}, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    expected.append(big)
    zlines = [json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in good[200:]]
    blob = zstandard.ZstdCompressor().compress(b"".join(zlines))
    cut = blob[: len(blob) * 2 // 3]
    (inp / "c_cut.jsonl.zst").write_bytes(cut)
    got = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    complete = got[: got.rfind(b"\n") + 1].splitlines()
    assert 0 < len(complete) < len(zlines)
    expected += [json.loads(line)["text"] for line in complete]

    prefix = str(tmp_path / "out" / "bad")
    s = preprocess(PreprocessConfig(input=str(inp), output_prefix=prefix, append_eod=True,
                                    tokenizer_model=llama_model(), workers=2), tokenizer=tok)
    assert s["ok"] and s["documents"] == len(expected)
    bad = s["bad_records"]
    assert bad["by_reason"]["malformed-json"] == 1 and bad["by_reason"]["invalid-utf8"] == 1
    assert bad["by_reason"]["missing-key"] == 1 and bad["by_reason"]["not-an-object"] == 1
    assert bad["by_reason"]["truncated-zstd"] == 1
    assert s["empty_documents"] == 1
    ex = "\n".join(bad["examples"])
    assert "a_bad.jsonl:12: malformed-json" in ex and "a_bad.jsonl:23: invalid-utf8" in ex
    assert "c_cut.jsonl.zst" in ex
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == len(expected)
    small = [t for t in expected if t is not big]
    ref = tok.encode_batch(small)
    j = 0
    for i, t in enumerate(expected):
        if t is big:
            assert len(ds[i]) > 1_000_000 and ds[i][-1] == tok.eod
            assert ds[i][:50].tolist() == tok.tokenize(big[:200])[:50]
        else:
            assert ds[i].tolist() == ref[j] + [tok.eod]
            j += 1


def test_failed_rerun_leaves_the_earlier_dataset(tmp_path, monkeypatch):
    """A preprocessing run that dies part way (killed, disk full) over the prefix of an earlier
    dataset leaves that dataset as it was: the .bin/.idx are written as *.tmp-<pid> and renamed
    in by the last step (megatron-core's builder writes both in place, and the new .bin then sat
    beside the old .idx). The rerun that completes replaces the pair and leaves no *.tmp-<pid>."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data import _preprocess

    tok = build_tokenizer("auto", llama_model())
    texts = peoples_daily(400)
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                   encoding="utf-8")
    prefix = str(tmp_path / "out" / "pd")
    cfg = PreprocessConfig(input=str(src), output_prefix=prefix, append_eod=True,
                           tokenizer_model=llama_model())
    preprocess(cfg, tokenizer=tok)
    before = _bytes(prefix + "_text_document")
    n_before = len(IndexedDataset(prefix + "_text_document"))

    src.write_text("".join(json.dumps({"text": t + " again"}, ensure_ascii=False) + "\n"
                           for t in texts * 3), encoding="utf-8")  # a bigger new corpus
    make = _preprocess.make_builder

    def dying(path, dtype):
        b = make(path, dtype)
        add = b.add_batch

        def add_batch(ids, lengths):
            add(ids, lengths)
            if len(b.sequence_lengths) > 500:
                raise OSError("No space left on device")

        b.add_batch = add_batch
        return b

    monkeypatch.setattr(_preprocess, "make_builder", dying)
    with pytest.raises(OSError, match="No space left"):
        preprocess(cfg, tokenizer=tok)
    assert _bytes(prefix + "_text_document") == before
    assert len(IndexedDataset(prefix + "_text_document")) == n_before
    monkeypatch.setattr(_preprocess, "make_builder", make)
    s = preprocess(cfg, tokenizer=tok)
    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == s["documents"] == 3 * len(texts)
    assert ds[0].tolist() == tok.encode_batch([texts[0] + " again"])[0] + [tok.eod]
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def _load_cli(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_exit_codes(tmp_path, capsys):
    cli = _load_cli("preprocess_data")
    (tmp_path / "allbad.jsonl").write_bytes(b"not json\n{broken\n\xff\xfe\n")
    rc = cli.main(["--input", str(tmp_path / "allbad.jsonl"), "--output-prefix",
                   str(tmp_path / "o" / "x"), "--tokenizer-model", llama_model(), "--append-eod"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "allbad.jsonl:1: malformed-json" in err and "allbad.jsonl:3: invalid-utf8" in err
    (tmp_path / "ok.jsonl").write_text('{"text": "hello"}\nbroken\n')
    rc = cli.main(["--input", str(tmp_path / "ok.jsonl"), "--output-prefix",
                   str(tmp_path / "o" / "y"), "--tokenizer-model", llama_model(), "--append-eod",
                   "--json-keys", "text"])
    assert rc == 0
    assert os.path.isfile(tmp_path / "o" / "y_text_document.idx")


def test_run_make_pretraining_dataset_script(corpus, tmp_path):
    script = os.path.join(TOOLS, "run_make_pretraining_dataset.sh")
    r = subprocess.run(["bash", script, "-h"], capture_output=True, text=True)
    assert r.returncode == 2 and "MEGATRON_PATH" in r.stdout
    r = subprocess.run(["bash", script, "a", "b"], capture_output=True, text=True)
    assert r.returncode == 2
    tokroot = tmp_path / "tokenizers" / "llamabpe"
    tokroot.mkdir(parents=True)
    build_tokenizer("auto", llama_model()).save_pretrained(str(tokroot))
    out = tmp_path / "out dir"  # a space: paths are quoted
    env = dict(os.environ, TOKENIZER_PATH=str(tmp_path / "tokenizers"), WORKERS="2",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", script, "-", "-", str(corpus["zst"]), "llamabpe", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[preprocess] done" in r.stderr and "docs/s" in r.stderr and "MB/s" in r.stderr
    tok = build_tokenizer("auto", llama_model())
    _check_dataset(str(out / "wudao_llamabpe_text_document"), tok, corpus["texts"])
    # a tokenizer folder keeps its whole name (Qwen2.5-7B and Qwen2.5-3B were both wudao_Qwen2)
    dotted = tmp_path / "tokenizers" / "Llama2.5-7B"
    build_tokenizer("auto", llama_model()).save_pretrained(str(dotted))
    r = subprocess.run(["bash", script, "-", "-", str(corpus["zst"]), str(dotted), str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_dataset(str(out / "wudao_Llama2.5-7B_text_document"), tok, corpus["texts"])


def test_json_array_and_multiple_keys(tmp_path):
    """WuDao-style .json arrays are read as input too; several --json-keys give several outputs."""
    tok = build_tokenizer("auto", llama_model())
    paras = peoples_daily(400)
    recs = [{"text": p, "title": p[:6]} for p in paras]
    (tmp_path / "arr.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    with open(tmp_path / "lines.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    a = preprocess(PreprocessConfig(input=str(tmp_path / "arr.json"), output_prefix=str(tmp_path / "a"),
                                    json_keys=("text", "title"), append_eod=True,
                                    tokenizer_model=llama_model()), tokenizer=tok)
    b = preprocess(PreprocessConfig(input=str(tmp_path / "lines.jsonl"),
                                    output_prefix=str(tmp_path / "b"), json_keys=("text", "title"),
                                    append_eod=True, tokenizer_model=llama_model(), workers=2),
                   tokenizer=tok)
    assert a["documents"] == b["documents"] == 800
    for key, texts in (("text", paras), ("title", [p[:6] for p in paras])):
        assert _bytes(str(tmp_path / f"a_{key}_document")) == \
            _bytes(str(tmp_path / f"b_{key}_document"))
        _check_dataset(str(tmp_path / f"a_{key}_document"), tok, texts)
