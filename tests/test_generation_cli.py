"""The batch generation CLI and the 17-argument scripts, end to end on a tiny LLaMA checkpoint written
here in the legacy layout (``release/mp_rank_00/model_optim_rng.pt`` + tracker + megatron_patch.json +
config.json + GPT-2 tokenizer files):
- text input through the llama script at TP=1 with 2 data-parallel replicas (MODEL_SIZE tiny): empty
  and blank lines kept as empty
  completions, an over-long prompt cut from the left with a warning, greedy completions equal to the
  library's on the same token ids;
- jsonl input through the qwen2-named script at TP=2 (one 2-process launch; the TP=1 checkpoint is
  resharded on load; TOKENIZER '-' = the checkpoint's files; MODEL_SIZE auto);
- usage / wrong argument count exit 2 for every family script; a missing input file is a one-line
  error with exit 1 that survives ``| tee``; --chat and --stop in-process.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from data_fixtures import tiny_llama_gpt2_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "bloom", "falcon", "glm", "qwen2", "mistral", "galactica", "mixtral"]
SEQ_LEN, OUT_LEN, IN_LEN = 64, 12, 20
TEXT_PROMPTS = ["Hello world, this is", "", "The quick brown fox " * 8, "   ",
                "Megatron says", "A"]


def _script(family):
    return os.path.join(ROOT, "examples", family, f"run_text_generation_megatron_{family}.sh")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               MEGATRON_PATCH_DEVICE="cpu")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _args(family_ckpt, tokenizer, size, tp, inp, out, top_k=1, top_p=0.0, temp=1.0, pen=1.0,
          bs=2):
    return ["dsw", "-", "-", tokenizer, family_ckpt, size, str(tp), str(bs), str(SEQ_LEN),
            str(top_k), str(IN_LEN), str(OUT_LEN), inp, out, str(top_p), str(temp), str(pen)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LLaMA written by hand in the legacy layout, with GPT-2 BPE tokenizer files."""
    return tiny_llama_gpt2_checkpoint(tmp_path_factory.mktemp("gencli") / "ckpt", 7)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Library greedy completions of the prompts, tokenised and cut as the CLI documents."""
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.loader import load_for_generation, load_tokenizer

    from megatron_patch.generation.cli import decode_response

    tok = load_tokenizer("-", ckpt)
    lm = load_for_generation(ckpt, log=lambda *a: None)

    def complete(texts, **kw):
        out = []
        for t in texts:
            if not t.strip():
                out.append("")
                continue
            ids = tok.tokenize(t)[-IN_LEN:]
            g = generate(lm.model, [ids], SamplingParams(max_new_tokens=OUT_LEN, greedy=True,
                                                         stop_token_ids=[tok.eod]),
                         vocab_size=lm.vocab_size)
            row = g.row(0)
            if g.finish_reasons[0] == "stop_token":
                row = row[:-1]
            out.append(decode_response(tok, ids, row))
        return out

    return {"tok": tok, "lm": lm, "complete": complete}


def _escape(s):
    return s.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def test_usage_and_wrong_count_exit_2():
    for fam in FAMILIES:
        r = subprocess.run(["bash", _script(fam), "-h"], capture_output=True, text=True)
        assert r.returncode == 2 and "usage:" in r.stdout and "REPETITION_PENALTY" in r.stdout
        r = subprocess.run(["bash", _script(fam), "dsw", "-", "-"], capture_output=True, text=True)
        assert r.returncode == 2 and "expected 17 arguments, got 3" in r.stderr, r.stderr


def test_text_file_through_llama_script(ckpt, reference, tmp_path):
    inp, out = tmp_path / "prompts.txt", tmp_path / "out" / "completions.txt"
    inp.write_text("\n".join(TEXT_PROMPTS) + "\n")
    # NPROC_PER_NODE=2 at TP=1: two data-parallel replicas take the batches in turns
    r = subprocess.run(["bash", _script("llama"), *_args(ckpt, ckpt, "tiny", 1, str(inp),
                                                             str(out))],
                       capture_output=True, text=True, env=dict(_env(), NPROC_PER_NODE="2"),
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = out.read_text().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(TEXT_PROMPTS)
    expected = reference["complete"](TEXT_PROMPTS)
    assert lines[:-1] == [_escape(e) for e in expected]
    assert lines[1] == "" and lines[3] == "" and all(lines[i] for i in (0, 2, 4, 5))
    log = r.stdout + r.stderr
    assert "warning: prompt 3 has" in log and f"keeping its last {IN_LEN}" in log
    assert "4 prompts (2 empty)" in log and "--nproc-per-node 2" in log
    assert os.path.isfile(str(out) + ".log")


def test_jsonl_through_qwen2_script_at_tp2_resharded(ckpt, reference, tmp_path):
    queries = ["Once upon a time", "", "In a galaxy far away there was a", "Zebra"]
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "completions.jsonl"
    inp.write_text("".join(json.dumps({"query": q, "id": i}) + "\n" for i, q in enumerate(queries)))
    r = subprocess.run(["bash", _script("qwen2"), *_args(ckpt, "-", "auto", 2, str(inp), str(out),
                                                             bs=3)],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["query"] for x in rows] == queries and [x["id"] for x in rows] == [0, 1, 2, 3]
    assert [x["response"] for x in rows] == reference["complete"](queries)
    assert "resharding" in r.stdout + r.stderr and "TP=2" in r.stdout + r.stderr


def test_missing_input_file_one_line_error_through_tee(ckpt, tmp_path):
    missing = str(tmp_path / "nope.txt")
    r = subprocess.run(["bash", _script("bloom"), *_args(ckpt, "-", "auto", 1, missing,
                                                             str(tmp_path / "o.txt"))],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert errors == [f"error: input file {missing} does not exist"]
    assert not os.path.exists(tmp_path / "o.txt")


def test_chat_and_stop_strings_in_process(ckpt, reference, tmp_path):
    from megatron_patch.generation import cli

    tok = reference["tok"]
    base = reference["complete"](["Hello world, this is"])[0]
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop and stop in base
    inp = tmp_path / "p.txt"
    inp.write_text("Hello world, this is\n")
    common = ["--checkpoint", ckpt, "--seq-length", str(SEQ_LEN), "--input-seq-len", str(IN_LEN),
              "--out-seq-length", str(OUT_LEN), "--top-k", "1", "--input-file", str(inp)]
    quiet = lambda *a, **k: None
    cli.run(cli.build_parser().parse_args(common + ["--output-file", str(tmp_path / "s.txt"),
                                                    "--stop", stop]), log=quiet)
    assert (tmp_path / "s.txt").read_text() == _escape(base[: base.find(stop)]) + "\n"
    cli.run(cli.build_parser().parse_args(common + ["--output-file", str(tmp_path / "c.txt"),
                                                    "--chat"]), log=quiet)
    chat_ids = list(tok.apply_chat_template([{"role": "user", "content": "Hello world, this is"}],
                                            True, tokenize=True))
    assert chat_ids[-3:] == tok.tokenize("<|assistant|>\n")[-3:]  # the default template
    from megatron_patch.generation import SamplingParams, generate

    lm = reference["lm"]
    g = generate(lm.model, [chat_ids[-IN_LEN:]], SamplingParams(max_new_tokens=OUT_LEN, greedy=True,
                                                                stop_token_ids=[tok.eod]),
                 vocab_size=lm.vocab_size)
    row = g.row(0)[:-1] if g.finish_reasons[0] == "stop_token" else g.row(0)
    # a chat response is the assistant's message: decoded alone
    assert (tmp_path / "c.txt").read_text() == _escape(tok.detokenize(row)) + "\n"
    # only empty prompts: nothing is generated, one empty line per input line (tabs, \n escapes)
    (tmp_path / "e.txt").write_text("\n \n\t\n")
    cli.run(cli.build_parser().parse_args(common[:-1] + [str(tmp_path / "e.txt"), "--output-file",
                                                         str(tmp_path / "e.out")]), log=quiet)
    assert (tmp_path / "e.out").read_text() == "\n\n\n"
    with pytest.raises(cli.InputError, match="no room"):
        cli.run(cli.build_parser().parse_args(["--checkpoint", ckpt, "--seq-length", "8",
                                               "--out-seq-length", "8", "--input-file", str(inp),
                                               "--output-file", str(tmp_path / "x")]), log=quiet)


def test_input_parsing_bos_and_truncation_units(tmp_path):
    from megatron_patch.generation import cli

    p = tmp_path / "q.txt"  # jsonl detected from content; CRLF; blank line kept
    p.write_bytes(b'{"query": "a", "k": 1}\r\n\r\n{"query": "b"}\r\n')
    texts, objs = cli.read_prompts(str(p))
    assert texts == ["a", "", "b"] and objs[0] == {"query": "a", "k": 1} and objs[1] == {"query": ""}
    p.write_text('{"query": "a"}\nnot json\n')
    with pytest.raises(cli.InputError, match=":2: not a JSON object"):
        cli.read_prompts(str(p))
    p.write_text("{not a query}\nplain\n")  # looks like JSON but is not: text mode
    assert cli.read_prompts(str(p)) == (["{not a query}", "plain"], None)
    assert cli.escape_line("a\nb\\n\r") == "a\\nb\\\\n\\r"

    class Tok:
        bos, eod, eos = 1, 2, 2
        family = "sentencepiece"

        def tokenize(self, t):
            return [ord(c) for c in t]

    msgs = []
    ids = cli.encode_prompts(Tok(), ["abcdef", "", "xy"], chat=False, add_bos=True, max_prompt=4,
                             warn=msgs.append)
    # BOS + "abcdef" is 7 tokens: BOS and the last 3 are kept
    assert ids == [[1, 100, 101, 102], [], [1, 120, 121]]
    assert len(msgs) == 1 and "prompt 1 has 7 tokens" in msgs[0]
    assert cli.wants_bos(Tok(), "auto") and not cli.wants_bos(Tok(), "no")
    Tok.family = "gpt2bpe"
    assert not cli.wants_bos(Tok(), "auto") and cli.wants_bos(Tok(), "yes")
    assert cli.cut_at_stop("hello ### world ##", ["##", "###"]) == ("hello ", True)
    assert cli.stop_token_ids(Tok(), chat=False) == [2]


def test_input_files_that_used_to_break_the_line_contract(tmp_path):
    """A lone CR inside a line stays in its prompt (the output keeps one line per input line);
    a UTF-8 BOM is not text (jsonl still detected); non-UTF-8 input and unreadable files are
    one-line InputErrors naming the line; a jsonl object without a string 'query' is an error
    naming its keys, not an empty prompt."""
    from megatron_patch.generation import cli

    p = tmp_path / "p.txt"
    p.write_bytes(b"first prompt\rsecond half\nthird\r\n")
    assert cli.read_prompts(str(p)) == (["first prompt\rsecond half", "third"], None)
    p.write_bytes(b'\xef\xbb\xbf{"query": "a"}\n{"query": "b"}\n')
    assert cli.read_prompts(str(p)) == (["a", "b"], [{"query": "a"}, {"query": "b"}])
    q = tmp_path / "q.jsonl"
    q.write_bytes(b'\xef\xbb\xbf{"query": "a"}\n')
    assert cli.read_prompts(str(q))[0] == ["a"]
    p.write_bytes("ok\n\u4f60\u597d\n".encode("utf-8") + "\u4f60\u597d\n".encode("gbk"))
    with pytest.raises(cli.InputError, match=r"p.txt:3: not UTF-8 text"):
        cli.read_prompts(str(p))
    q.write_text('{"query": "a"}\n{"prompt": "b", "id": 2}\n')
    with pytest.raises(cli.InputError, match=r":2: expected an object with a string 'query' "
                                             r"\(its keys: prompt, id\)"):
        cli.read_prompts(str(q))
    if os.geteuid() != 0:  # root reads any file
        p.write_text("x\n")
        p.chmod(0)
        with pytest.raises(cli.InputError, match="cannot be read"):
            cli.read_prompts(str(p))
    # every line break of str.splitlines() is escaped in text output
    text = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i\nj\rk\\"
    assert len(cli.escape_line(text).splitlines()) == 1
    assert cli.escape_line(text) == "a\\x0bb\\x0cc\\x1cd\\x1de\\x1ef\\x85g\\u2028h\\u2029i\\nj\\rk\\\\"


def test_truncation_keeps_bos_alone_and_a_template_bos(tmp_path):
    from megatron_patch.generation import cli

    class Tok:
        bos, eod, eos = 1, 2, 2

        def tokenize(self, t):
            return ([1] if t.startswith("<s>") else []) + [ord(c) for c in t.replace("<s>", "")]

    msgs = []
    # room for BOS only: BOS alone (the whole prompt used to be kept: ids[-0:])
    assert cli.encode_prompts(Tok(), ["abcdef"], chat=False, add_bos=True, max_prompt=1,
                              warn=msgs.append) == [[1]]
    assert "keeping its last 0 after BOS" in msgs[0]
    # a BOS that the text itself starts with (a chat template's {{ bos_token }}) stays in front
    assert cli.encode_prompts(Tok(), ["<s>abcdef"], chat=False, add_bos=False, max_prompt=3,
                              warn=msgs.append) == [[1, 101, 102]]
    assert cli.encode_prompts(Tok(), ["<s>ab"], chat=False, add_bos=True, max_prompt=8,
                              warn=msgs.append) == [[1, 97, 98]]


def test_responses_decode_after_their_prompt(tmp_path):
    """A SentencePiece-style (Metaspace) tokenizer: the response's first word piece keeps its
    space, as it reads after the prompt ("Hello" + " world"), where decoding it alone drops it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatron_patch.generation import cli
    from megatron_patch.tokenizer import build_tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581Hello": 3, "\u2581world": 4, "\u2581": 5,
             "Hello": 6, "world": 7, "\u2581caf\u00e9": 8}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = build_tokenizer("auto", str(tmp_path))
    ids = tok.tokenize("Hello world")
    assert ids == [3, 4] and tok.detokenize(ids[1:]) == "world"  # the defect: no space
    assert cli.decode_response(tok, ids[:1], ids[1:]) == " world"
    assert tok.detokenize(ids[:1]) + cli.decode_response(tok, ids[:1], ids[1:]) == \
        tok.detokenize(ids)
    assert cli.decode_response(tok, [], [4, 8]) == tok.detokenize([4, 8])  # no context
    assert cli.decode_response(tok, [3, 4, 3, 4, 3], []) == ""


def test_bad_settings_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    from megatron_patch.generation import cli
    from megatron_patch.generation import loader

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was loaded")
    monkeypatch.setattr(loader, "load_for_generation", no_load)
    monkeypatch.setattr(loader, "load_tokenizer", no_load)
    inp = tmp_path / "p.txt"
    inp.write_text("hi\n")
    base = ["--checkpoint", str(tmp_path / "none"), "--input-file", str(inp),
            "--output-file", str(tmp_path / "o.txt")]
    for extra, expected in ((["--top-p", "1.5"], "top_p must be in [0, 1]"),
                            (["--temperature", "-1"], "temperature must be >= 0"),
                            (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
                            (["--batch-size", "0"], "BS (--micro-batch-size) must be >= 1"),
                            (["--top-k", "-1"], "TOP_K must be >= 0")):
        with pytest.raises(cli.InputError, match=re.escape(expected)):
            cli.run(cli.build_parser().parse_args(base + extra), log=lambda *a, **k: None)
    (tmp_path / "dir").mkdir()
    with pytest.raises(cli.InputError, match="is a folder"):
        cli.run(cli.build_parser().parse_args(base[:-1] + [str(tmp_path / "dir")]),
                log=lambda *a, **k: None)


def test_extra_args_keep_quoted_words_together(ckpt, tmp_path):
    """EXTRA_ARGS is split like a command line: a stop string with a space is one argument (the
    unquoted expansion used to split it and glob-expand '*'); unbalanced quotes are an error."""
    inp, out = tmp_path / "p.txt", tmp_path / "o.txt"
    inp.write_text("Hello world, this is\n")
    (tmp_path / "End").write_text("a file a glob would find")
    args = _args(ckpt, ckpt, "tiny", 1, str(inp), str(out))
    r = subprocess.run(["bash", _script("llama"), *args], capture_output=True, text=True,
                       env=dict(_env(), EXTRA_ARGS="--stop '### End' --stop '*' --seed 3"),
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "'### End'" in r.stderr and "--stop '*'" in r.stderr  # the set -x trace of torchrun
    r = subprocess.run(["bash", _script("llama"), *args], capture_output=True, text=True,
                       env=dict(_env(), EXTRA_ARGS="--stop '### End"), cwd=str(tmp_path),
                       timeout=300)
    assert r.returncode == 2 and "EXTRA_ARGS is not a valid argument list" in r.stderr
    r = subprocess.run(["bash", _script("llama"), *_args(ckpt, ckpt, "tiny", "two", str(inp),
                                                             str(out))],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path))
    assert r.returncode == 2 and "error: TP must be a positive number, got 'two'" in r.stderr
