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
            out.append(tok.detokenize(row))
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
    chat_ids = tok.tokenize(tok.apply_chat_template([{"role": "user", "content":
                                                      "Hello world, this is"}], True))
    assert chat_ids[-3:] == tok.tokenize("<|assistant|>\n")[-3:]  # the default template
    from megatron_patch.generation import SamplingParams, generate

    lm = reference["lm"]
    g = generate(lm.model, [chat_ids[-IN_LEN:]], SamplingParams(max_new_tokens=OUT_LEN, greedy=True,
                                                                stop_token_ids=[tok.eod]),
                 vocab_size=lm.vocab_size)
    row = g.row(0)[:-1] if g.finish_reasons[0] == "stop_token" else g.row(0)
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
