"""MT-Bench evaluation (megatron_patch.evaluation, toolkits/evaluation/mt_bench.py).

Units: ``[[N]]`` score parsing, judge prompts and their hash, retries with backoff on errors and on
replies without a score (FAILED after the last try, never a score), the judgment cache (resume,
torn lines, FAILED re-asked), the table (bold best values, ties, '-', extra categories, turn means),
question-file checks (file:line), the shipped sample file, CLI errors (one line, exit 2).

End to end, against our OpenAI-compatible server (toolkits/serve/openai_server.py) on loopback — a
real HTTP judge, not a mock. The judges are tiny LLaMA checkpoints whose greedy output is fixed
text: every layer's attention output projection and MLP down projection are zero, so each layer is
the identity on the residual stream and the logits depend only on the current token (embedding ->
final RMSNorm -> output layer); embedding rows are basis vectors and output rows are set so that
token A's argmax is token B, a chain from the chat template's last token ``<|assistant|>``:
- "good" judge:      <|assistant|> -> Rating: -> [[7]] -> </s>   (reply "Rating: [[7]]")
- "malformed" judge: <|assistant|> -> I -> refuse. -> </s>       (reply "I refuse.": no score)
The tokenizer is a word-level ``tokenizer.json`` (split on whitespace, unknown words -> [UNK])
with a chat template in ``tokenizer_config.json``. The same checkpoints are the evaluated models
("sft" answers "Rating: [[7]]", "rlhf" answers "I refuse.").
"""
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from data_fixtures import tiny_llama_model, write_legacy_release
from megatron_patch.evaluation import answers as answers_mod
from megatron_patch.evaluation import judge as judge_mod
from megatron_patch.evaluation import mt_bench
from megatron_patch.evaluation.questions import (EvaluationError, Question, attach_references,
                                                 load_questions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "toolkits", "evaluation", "data", "mt_bench_sample.jsonl")
CLI = os.path.join(ROOT, "toolkits", "evaluation", "mt_bench.py")
SERVER = os.path.join(ROOT, "toolkits", "serve", "openai_server.py")

WORDS = ["[UNK]", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "</turn>",
         "Rating:", "[[7]]", "I", "refuse.", "the", "a", "of", "and", "to", "is", "in", "what"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </turn> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GOOD_CHAIN = {"<|assistant|>": "Rating:", "Rating:": "[[7]]", "[[7]]": "</s>"}
BAD_CHAIN = {"<|assistant|>": "I", "I": "refuse.", "refuse.": "</s>"}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               MEGATRON_PATCH_DEVICE="cpu")
    for k in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OPENAI_BASE_URL",
              "OPENAI_API_KEY"):
        env.pop(k, None)
    return env


def _args(argv):
    return mt_bench.build_parser().parse_args(argv)


quiet = lambda *a, **k: None  # noqa: E731


# ===================================================================================== units

def test_parse_score():
    p = judge_mod.parse_score
    assert p("Good answer. Rating: [[7]]") == 7.0
    assert p("[[ 8.5 ]]") == 8.5 and p("[[10]]") == 10.0 and p("[[1]]") == 1.0
    assert p("I first thought [[3]] but on reflection [[9]]") == 9.0  # the last one counts
    assert p("Rating: [6]") == 6.0  # fallback: single brackets
    assert p("[[4]] and a list item [2]") == 4.0  # double brackets win over single
    for bad in (None, "", "no score at all", "[[11]]", "[[0]]", "[[-3]]", "[[seven]]", "7/10",
                "[[ ]]", "[10.5]"):
        assert p(bad) is None, bad


def _q(qid=1, cat="writing", turns=("Q one?", "Q two?"), ref=None):
    return Question(qid, cat, list(turns), list(ref) if ref else None)


def test_judge_prompts_and_hash():
    sys_msg, user = judge_mod.judge_messages(_q(), ["A one.", "A two."], 1)
    assert sys_msg["role"] == "system" and user["role"] == "user"
    assert "Q one?" in user["content"] and "A one." in user["content"]
    assert "[[" in user["content"] and "Q two?" not in user["content"]
    assert "Reference" not in user["content"]
    # turn 2: the whole conversation, the second reply graded
    t2 = judge_mod.judge_messages(_q(), ["A one.", "A two."], 2)[1]["content"]
    for s in ("Q one?", "A one.", "Q two?", "A two.", "SECOND"):
        assert s in t2
    assert t2.index("A one.") < t2.index("Q two?") < t2.index("A two.")
    # references: used for math/reasoning/coding only (case-insensitive category)
    m1 = judge_mod.judge_messages(_q(cat="Math", ref=["R1", "R2"]), ["x", "y"], 1)[1]["content"]
    assert "Reference solution" in m1 and "R1" in m1 and "R2" not in m1
    m2 = judge_mod.judge_messages(_q(cat="math", ref=["R1", "R2"]), ["x", "y"], 2)[1]["content"]
    assert "R1" in m2 and "R2" in m2
    w = judge_mod.judge_messages(_q(cat="writing", ref=["R1", "R2"]), ["x", "y"], 1)[1]["content"]
    assert "R1" not in w
    # the hash follows the prompt: a changed answer is judged again
    h = judge_mod.prompt_hash(judge_mod.judge_messages(_q(), ["A", "B"], 1))
    assert h == judge_mod.prompt_hash(judge_mod.judge_messages(_q(), ["A", "B"], 1))
    assert h != judge_mod.prompt_hash(judge_mod.judge_messages(_q(), ["A!", "B"], 1))
    assert len({judge_mod.cache_key("m", 1, 1, "j", h), judge_mod.cache_key("m", "1", 2, "j", h),
                judge_mod.cache_key("m2", 1, 1, "j", h),
                judge_mod.cache_key("m", 1, 1, "j2", h)}) == 4
    assert judge_mod.cache_key("m", 1, 1, "j", h) == judge_mod.cache_key("m", "1", 1, "j", h)
    assert judge_mod.safe_name("org/model:v1") == "org_model_v1"
    cfg = judge_mod.JudgeConfig("http://h:1/v1/", "j")
    assert cfg.endpoint() == "http://h:1/v1/chat/completions"
    assert judge_mod.JudgeConfig("http://h/v1/chat/completions", "j").endpoint() == \
        "http://h/v1/chat/completions"


def _cfg(**kw):
    kw = dict(dict(base_url="http://127.0.0.1:9/v1", model="judge", retries=3, backoff=0.01,
                   max_backoff=1.0), **kw)
    return judge_mod.JudgeConfig(**kw)


def _scripted(replies):
    """A fake transport returning/raising the scripted items in order (for the retry logic only;
    the real HTTP path is tested end to end below)."""
    it = iter(replies)

    def send(cfg, messages):
        r = next(it)
        if isinstance(r, Exception):
            raise r
        return r

    return send


def test_ask_judge_retries_with_backoff_then_fails():
    sleeps = []
    v = judge_mod.ask_judge(_cfg(), [], sleep=sleeps.append, send=_scripted([
        judge_mod.JudgeError("HTTP 503"), "fine but no score", judge_mod.JudgeError("timeout"),
        "Rating: [[8]]"]))
    assert (v.score, v.tries, v.error) == (8.0, 4, None)
    # exponential: 0.01, 0.02, 0.04 (+ at most 10% jitter)
    assert len(sleeps) == 3 and all(b <= s <= b * 1.1 for s, b in zip(sleeps, [.01, .02, .04]))
    # no parsable score in any reply: FAILED, never a score
    sleeps.clear()
    v = judge_mod.ask_judge(_cfg(retries=2), [], sleep=sleeps.append,
                            send=_scripted(["meh", "[[12]]", "still nothing"]))
    assert v.score is None and v.tries == 3 and "no [[rating]]" in v.error
    assert v.judgment == "still nothing" and len(sleeps) == 2
    # a 401 cannot be fixed by retrying
    v = judge_mod.ask_judge(_cfg(), [], sleep=sleeps.append,
                            send=_scripted([judge_mod.JudgeError("HTTP 401", retryable=False)]))
    assert v.score is None and v.tries == 1 and v.error == "HTTP 401"
    # a Retry-After hint lengthens the wait (capped by max_backoff)
    assert 0.5 <= _cfg().delay(0, hint=0.5) <= 0.55 and _cfg().delay(0, hint=99) <= 1.1
    assert 0.64 <= _cfg(max_backoff=100).delay(6) <= 0.71


def test_connection_error_is_retried_then_failed(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    sleeps = []
    v = judge_mod.ask_judge(_cfg(base_url=f"http://127.0.0.1:{port}/v1", retries=2, timeout=5),
                            [{"role": "user", "content": "x"}], sleep=sleeps.append)
    assert v.score is None and v.tries == 3 and "connection error" in v.error, v.error


def test_judgment_cache_resume_and_failed_reasked(tmp_path):
    qs = [_q(1), _q(2, "math", ref=["r", "s"])]
    answers = {"1": ["a", "b"], "2": ["c", "d"]}
    tasks = judge_mod.make_tasks("sft", qs, answers, "judge")
    assert [(t.question.question_id, t.turn) for t in tasks] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    path = tmp_path / "judgments" / "judge.jsonl"
    cache = judge_mod.JudgmentCache(str(path))
    asked = []

    def send(cfg, messages):
        asked.append(messages[1]["content"])
        # question 2, turn 1 (its prompt ends with the reply "c") never gets a score
        return "no score here" if messages[1]["content"].endswith("\nc\n### End of reply") \
            else "ok [[6]]"

    counts = judge_mod.run_judgments(_cfg(retries=1), tasks, cache, parallel=2, log=quiet,
                                     send=send, sleep=lambda s: None)
    cache.close()
    assert counts == {"cached": 0, "asked": 4, "scored": 3, "failed": 1}
    assert len(asked) == 5  # the failed one was tried twice
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    failed = [json.loads(x) for x in lines if json.loads(x)["score"] is None]
    assert len(failed) == 1 and failed[0]["tries"] == 2 and "no [[rating]]" in failed[0]["error"]
    # an interrupted write leaves a torn line: ignored, the next record starts on a new line
    with open(path, "a") as f:
        f.write('{"model": "sft", "question_id": 9, "tu')
    cache = judge_mod.JudgmentCache(str(path))
    assert len(cache.records) == 4
    assert sum(cache.done(t.key) is not None for t in tasks) == 3
    asked.clear()
    counts = judge_mod.run_judgments(_cfg(retries=0), tasks, cache, log=quiet,
                                     send=lambda c, m: "now [[5]]", sleep=lambda s: None)
    cache.close()
    assert counts == {"cached": 3, "asked": 1, "scored": 1, "failed": 0}
    recs = [json.loads(x) for x in path.read_text().splitlines()[5:]]
    assert [(r["question_id"], r["turn"], r["score"]) for r in recs] == [(2, 1, 5.0)]
    cache = judge_mod.JudgmentCache(str(path))
    assert all(cache.done(t.key) for t in tasks)
    ms = mt_bench.collect_scores("sft", tasks, cache)
    assert ms.failed == 0 and ms.by_category == {"writing": [6.0, 6.0], "math": [5.0, 6.0]}
    assert ms.by_turn == {1: [6.0, 5.0], 2: [6.0, 6.0]}


def test_table_bold_ties_and_dashes():
    a = mt_bench.ModelScores("sft")
    b = mt_bench.ModelScores("rlhf")
    for cat, turn, s in [("Coding", 1, 8), ("coding", 2, 6), ("Math", 1, 5), ("writing", 1, 9),
                         ("writing", 2, None), ("Poetry", 1, 4)]:
        a.add(cat, turn, s)
    for cat, turn, s in [("coding", 1, 7), ("coding", 2, 7), ("math", 1, 3), ("Writing", 1, 9.0),
                         ("writing", 2, 9.0)]:
        b.add(cat, turn, s)
    table = mt_bench.render_table([a, b], ["Poetry"], 2)
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Model", "Coding", "Extraction", "Humanities", "Math", "Reasoning",
                      "Roleplay", "STEM", "Writing", "Poetry", "Avg", "Turn 1", "Turn 2",
                      "Failed"]
    row = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    # coding: both 7.00 -> both bold; math 5 vs 3; writing 9 vs 9 tie; poetry only sft
    assert row["sft"][1] == "**7.00**" and row["rlhf"][1] == "**7.00**"
    assert row["sft"][2] == "-" and row["rlhf"][2] == "-"  # no extraction questions
    assert row["sft"][4] == "**5.00**" and row["rlhf"][4] == "3.00"
    assert row["sft"][8] == "**9.00**" and row["rlhf"][8] == "**9.00**"
    assert row["sft"][9] == "**4.00**" and row["rlhf"][9] == "-"
    # avg: sft (8+6+5+9+4)/5 = 6.40; rlhf (7+7+3+9+9)/5 = 7.00; turn 1: 6.50 vs 6.33; turn 2: 6 vs 8
    assert row["sft"][10] == "6.40" and row["rlhf"][10] == "**7.00**"
    assert row["sft"][11] == "**6.50**" and row["rlhf"][11] == "6.33"
    assert row["sft"][12] == "6.00" and row["rlhf"][12] == "**8.00**"
    assert row["sft"][13] == "1" and row["rlhf"][13] == "0"  # failed: never bold, never a score
    # one model: nothing to compare, no bold
    assert "**" not in mt_bench.render_table([a])
    assert mt_bench.parse_models(["a=/x", "b"]) == [("a", "/x"), ("b", None)]
    for bad in (["a b=/x"], ["a=/x", "a=/y"], ["a="], ["../x=/y"]):
        with pytest.raises(EvaluationError):
            mt_bench.parse_models(bad)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_question_file_checks(tmp_path):
    ok = {"question_id": 1, "category": "math", "turns": ["a", "b"], "reference": ["r"]}
    p = tmp_path / "q.jsonl"
    qs = load_questions(_write(p, [ok, "", dict(ok, question_id="x2", reference=None)]))
    assert [q.key for q in qs] == ["1", "x2"] and qs[0].reference == ["r"]
    cases = [
        (["{not json"], ":1: not valid JSON"),
        ([ok, "[1, 2]"], ":2: expected a JSON object"),
        ([ok, dict(ok)], ":2: duplicate question_id 1 (first on line 1)"),
        ([dict(ok, question_id=None)], ":1: 'question_id' must be"),
        ([dict(ok, category="")], ":1: 'category' must be a non-empty string"),
        ([dict(ok, turns="a")], ":1: 'turns' must be a list of strings"),
        ([dict(ok, turns=["a", "b", "c"])], ":1: 'turns' has 3 entries (expected 1 to 2)"),
        ([dict(ok, turns=["a", "  "])], ":1: 'turns' has an empty message"),
        ([dict(ok, reference=["r", "s", "t"])], ":1: 'reference' has 3 entries"),
        ([ok, "", dict(ok, question_id=3, turns=[1, 2])], ":3: 'turns' must be a list"),
    ]
    for lines, msg in cases:
        with pytest.raises(EvaluationError) as e:
            load_questions(_write(p, lines))
        assert str(e.value).startswith(str(p)) and msg in str(e.value), (msg, str(e.value))
    with pytest.raises(EvaluationError, match="does not exist"):
        load_questions(str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvaluationError, match="has no questions"):
        load_questions(_write(p, [""]))
    # reference answers from an answer-format file replace the questions' own
    qs = load_questions(_write(p, [ok, dict(ok, question_id=2)]))
    refs = _write(tmp_path / "ref.jsonl", [{"question_id": 2, "choices": [{"turns": ["R1", "R2"]}]},
                                           {"question_id": 99, "turns": ["x"]}])
    assert attach_references(qs, refs) == 1 and qs[1].reference == ["R1", "R2"]


def test_sample_question_file():
    qs = load_questions(SAMPLE)
    assert len(qs) == 16 and len({q.key for q in qs}) == 16
    cats = {}
    for q in qs:
        cats.setdefault(q.category_key, []).append(q)
        assert len(q.turns) == 2
        assert (q.reference is not None) == (q.category_key in ("math", "reasoning", "coding"))
        if q.reference:
            assert len(q.reference) == 2
    assert sorted(cats) == sorted(mt_bench.CATEGORIES) and all(len(v) == 2 for v in cats.values())


def test_run_input_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    q = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "math", "turns": ["a"]}])
    base = ["--question-file", q, "--out", str(tmp_path / "o")]
    judge = ["--judge-base-url", "http://127.0.0.1:1/v1", "--judge-model", "j"]
    cases = [
        (base + ["--model", "m=" + str(tmp_path / "nockpt")] + judge,
         f"model m: checkpoint folder {tmp_path / 'nockpt'} does not exist"),
        (["--question-file", str(tmp_path / "none.jsonl"), "--out", "o"] + judge,
         "does not exist"),
        (base + ["--model", "m"] + ["--judge-model", "j"], "no judge endpoint"),
        (base + ["--model", "m", "--judge-base-url", "http://x/v1"], "no judge model"),
        (base + ["--model", "m"] + judge, "model m: no answers in"),
        (base + judge, "no --model given and no answer files"),
        (base + ["--model", "m", "--category-temperature", "math"] + judge,
         "--category-temperature 'math'"),
        (base + ["--mode", "answer", "--model", "m"], "--mode answer needs --model NAME=CKPT"),
        (base + ["--mode", "answer", "--model", f"m={tmp_path}", "--tp", "2"],
         "1 processes for TP=2 x PP=1: run under torchrun --nproc-per-node 2"),
    ]
    for argv, msg in cases:
        with pytest.raises(EvaluationError) as e:
            mt_bench.run(_args(argv), log=quiet)
        assert msg in str(e.value), (msg, str(e.value))


def test_cli_one_line_error_exit_2(tmp_path):
    bad = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "x", "turns": ["a"]},
                                        "oops"])
    r = subprocess.run([sys.executable, CLI, "--question-file", bad, "--out", str(tmp_path),
                        "--model", "m", "--judge-base-url", "http://127.0.0.1:1/v1",
                        "--judge-model", "j"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: not valid JSON")
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == \
        [r.stderr.strip().splitlines()[-1]]


# ===================================================================================== end to end

def _chain_checkpoint(root, chain):
    """A tiny LLaMA (legacy layout) whose greedy continuation of token A is chain[A] (see the
    module docstring), with the word-level tokenizer and its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_patch.models.llama.config import PRESETS

    os.makedirs(root, exist_ok=True)
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>", "<pad>"])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "[UNK]", "bos_token": None,
        "chat_template": TEMPLATE}))
    hf = dict(PRESETS["tiny"], vocab_size=len(WORDS), bos_token_id=None, eos_token_id=1,
              max_position_embeddings=1024)
    sd = tiny_llama_model(hf, 128, seed=7).state_dict()
    h = sd["embedding.word_embeddings.weight"].shape[1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith(("linear_proj.weight", "linear_fc2.weight")):
                v.zero_()  # every layer is the identity on the residual stream
        emb, out = sd["embedding.word_embeddings.weight"], sd["output_layer.weight"]
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.01)
        out.zero_()
        sd["decoder.final_layernorm.weight"].fill_(1.0)
        for n, (a, b) in enumerate(chain.items()):
            assert n < h
            emb[vocab[a]] = 0
            emb[vocab[a], n] = 1.0  # RMSNorm -> sqrt(h) e_n
            out[vocab[b], n] = 10.0  # logit 10 sqrt(h) for b, ~0 for every other token
    return write_legacy_release(root, sd, hf, 128)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("mtbench")
    return {"good": _chain_checkpoint(base / "good", GOOD_CHAIN),
            "bad": _chain_checkpoint(base / "bad", BAD_CHAIN)}


class _Server:
    """toolkits/serve/openai_server.py on a free loopback port."""

    def __init__(self, ckpt, name, tmp):
        assert os.path.isfile(SERVER), f"{SERVER} is missing"
        self.port_file = os.path.join(tmp, f"{name}.port")
        self.log = open(os.path.join(tmp, f"{name}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--checkpoint", ckpt, "--port", "0", "--port-file",
             self.port_file, "--served-model-name", name, "--max-batch-size", "4", "--quiet"],
            stdout=self.log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp)
        deadline = time.time() + 180
        while not os.path.isfile(self.port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                self.stop()
                raise AssertionError("server did not start:\n" + self.log.read()[-3000:])
            time.sleep(0.2)
        port = int(open(self.port_file).read().strip())
        self.url = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert r.status == 200

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def good_judge(ckpts, tmp_path_factory):
    s = _Server(ckpts["good"], "judge-good", str(tmp_path_factory.mktemp("srv_good")))
    yield s
    s.stop()


def _questions(tmp_path, n):
    """The first n sample questions, one per category pair (keeps the run short)."""
    lines = open(SAMPLE).read().splitlines()
    return _write(tmp_path / f"q{n}.jsonl", lines[:n])


def _run_argv(qfile, out, url, judge_model, *extra):
    return ["--question-file", qfile, "--out", str(out), "--judge-base-url", url,
            "--judge-model", judge_model, "--max-new-tokens", "6", "--judge-max-tokens", "8",
            "--judge-backoff", "0.01", "--judge-retries", "2", *extra]


def test_answers_two_turn_chat_batched_and_cached(ckpts, tmp_path, monkeypatch):
    import megatron_patch.generation as gen
    from megatron_patch.generation.loader import load_tokenizer

    tok = load_tokenizer("-", ckpts["good"])
    seen = []
    real = gen.generate

    def spy(model, prompts, params, **kw):
        seen.append(([tok.detokenize(p) for p in prompts], params))
        return real(model, prompts, params, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    qs = load_questions(SAMPLE)
    path = str(tmp_path / "answers" / "sft.jsonl")
    settings = answers_mod.GenerationSettings(batch_size=8, max_new_tokens=6,
                                              category_temperature={"writing": 0.7})
    assert answers_mod.generate_answers("sft", ckpts["good"], qs, path, settings, log=quiet) == 16
    got = answers_mod.load_answers(path)
    assert got == {q.key: ["Rating: [[7]]", "Rating: [[7]]"] for q in qs}
    # batches: writing (2 questions, T=0.7) apart from the 14 greedy ones (8 + 6), 2 turns each
    assert [len(p) for p, _ in seen] == [2, 2, 8, 8, 6, 6]
    assert [prm.is_greedy for _, prm in seen] == [False, False, True, True, True, True]
    # turn 2 sees the conversation so far through the chat template
    q = next(q for q in qs if q.category_key == "writing")
    t2 = tok.detokenize(tok.tokenize(tok.apply_chat_template(
        [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": "Rating: [[7]]"},
         {"role": "user", "content": q.turns[1]}], add_generation_prompt=True)))
    assert seen[1][0][0] == t2 and seen[0][0][0] != t2
    assert t2.endswith("Rating: [[7]] </turn> <|user|> " + " ".join(
        w if w in WORDS else "[UNK]" for w in q.turns[1].split()) + " </turn> <|assistant|>")
    rec = json.loads(open(path).readline())
    assert rec["model_id"] == "sft" and rec["choices"][0]["turns"] == ["Rating: [[7]]"] * 2
    # rerun: nothing to do, the model is not even loaded
    seen.clear()
    assert answers_mod.generate_answers("sft", ckpts["good"], qs, path, settings, log=quiet) == 0
    assert not seen
    # an interrupted file (3 complete records + a torn line): only the rest is generated
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert answers_mod.generate_answers("sft", ckpts["good"], qs, path, settings, log=quiet) == 13
    assert answers_mod.load_answers(path) == got
    assert sum(1 for ln in open(path) if ln.strip()) == 16  # the torn line was cut off


def test_end_to_end_two_models_real_judge_and_resume(ckpts, good_judge, tmp_path):
    out = tmp_path / "run"
    argv = _run_argv(SAMPLE, out, good_judge.url, "judge-good", "--model",
                     f"sft={ckpts['good']}", "--model", f"rlhf={ckpts['bad']}", "--parallel", "4",
                     "--batch-size", "16")
    res = mt_bench.run(_args(argv), log=quiet)
    assert res["counts"] == {"cached": 0, "asked": 64, "scored": 64, "failed": 0}
    assert answers_mod.load_answers(str(out / "answers" / "rlhf.jsonl"))["1"] == ["I refuse."] * 2
    recs = [json.loads(x) for x in open(out / "judgments" / "judge-good.jsonl")]
    assert len(recs) == 64 and {r["score"] for r in recs} == {7.0}
    assert {r["judgment"] for r in recs} == {"Rating: [[7]]"} and {r["tries"] for r in recs} == {1}
    table = (out / mt_bench.TABLE_FILE).read_text()
    assert res["table"] in table and "Judge: judge-good" in table
    for model in ("sft", "rlhf"):  # every column ties at 7.00: all bold
        assert f"| {model} | " + " | ".join(["**7.00**"] * 11) + " | 0 |" in table
    # resume: nothing is asked again; an interrupted judgment file is completed
    res = mt_bench.run(_args(argv), log=quiet)
    assert res["counts"] == {"cached": 64, "asked": 0, "scored": 0, "failed": 0}
    lines = (out / "judgments" / "judge-good.jsonl").read_text().splitlines()
    (out / "judgments" / "judge-good.jsonl").write_text("\n".join(lines[:50]) + "\n" +
                                                        lines[50][:30])
    res = mt_bench.run(_args(argv), log=quiet)
    assert res["counts"] == {"cached": 50, "asked": 14, "scored": 14, "failed": 0}
    # table only, from the cache, with no generation and no request
    res = mt_bench.run(_args(["--question-file", SAMPLE, "--out", str(out), "--judge-model",
                              "judge-good", "--mode", "table"]), log=quiet)
    assert res["table"] == (out / mt_bench.TABLE_FILE).read_text().split("\n\n")[0] + "\n"
    assert [r.model for r in res["rows"]] == ["rlhf", "sft"]


def test_malformed_judge_replies_retried_then_failed(ckpts, tmp_path, tmp_path_factory):
    bad = _Server(ckpts["bad"], "judge-bad", str(tmp_path_factory.mktemp("srv_bad")))
    try:
        out = tmp_path / "run"
        q = _questions(tmp_path, 2)
        argv = _run_argv(q, out, bad.url, "judge-bad", "--model", f"sft={ckpts['good']}",
                         "--parallel", "2")
        res = mt_bench.run(_args(argv), log=quiet)
    finally:
        bad.stop()
    assert res["counts"] == {"cached": 0, "asked": 4, "scored": 0, "failed": 4}
    recs = [json.loads(x) for x in open(out / "judgments" / "judge-bad.jsonl")]
    assert len(recs) == 4
    for r in recs:  # 1 try + 2 retries, the reason kept, never a score
        assert r["score"] is None and r["tries"] == 3 and r["judgment"] == "I refuse."
        assert "no [[rating]]" in r["error"]
    row = res["rows"][0]
    assert row.failed == 4 and row.all_scores == []
    assert "| sft | " + " | ".join(["-"] * 11) + " | 4 |" in res["table"]


def test_judge_503_twice_then_real_server(ckpts, good_judge, tmp_path):
    """A loopback endpoint answers 503 to the first two POSTs, then forwards to the real server."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(time.time())
            if len(hits) <= 2:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            req = urllib.request.Request(good_judge.url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                data = r.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        out = tmp_path / "run"
        q = _write(tmp_path / "q1.jsonl", [{"question_id": "w1", "category": "Writing",
                                           "turns": ["Say hi"]}])
        argv = _run_argv(q, out, f"http://127.0.0.1:{srv.server_address[1]}/v1", "judge-good",
                         "--model", f"sft={ckpts['good']}", "--parallel", "1",
                         "--judge-backoff", "0.3")
        res = mt_bench.run(_args(argv), log=quiet)
    finally:
        srv.shutdown()
        srv.server_close()
    assert res["counts"] == {"cached": 0, "asked": 1, "scored": 1, "failed": 0}
    rec = json.loads(open(out / "judgments" / "judge-good.jsonl").read())
    assert rec["score"] == 7.0 and rec["tries"] == 3 and len(hits) == 3
    # exponential backoff: 0.3 s, then 0.6 s (+ at most 10% jitter, + request time)
    assert 0.3 <= hits[1] - hits[0] < hits[2] - hits[1] and hits[2] - hits[1] >= 0.6
    assert "**" not in res["table"]  # one model: nothing to compare, no bold
    assert "| sft | - | - | - | - | - | - | - | 7.00 | 7.00 | 7.00 | 0 |" in res["table"]


def test_answers_at_tp2_under_torchrun(ckpts, tmp_path):
    """--tp 2 under torchrun (2 CPU processes; the TP=1 checkpoint is resharded on load): the same
    answers as in-process TP=1, written once, by rank 0."""
    out = tmp_path / "run"
    q = _questions(tmp_path, 4)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", CLI, "--question-file", q, "--out", str(out),
                        "--mode", "answer", "--tp", "2", "--max-new-tokens", "6",
                        "--model", f"rlhf={ckpts['bad']}"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (out / "answers" / "rlhf.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert [json.loads(x)["choices"][0]["turns"] for x in lines] == [["I refuse."] * 2] * 4
    assert r.stdout.count("answers: rlhf: 4/4 questions") == 1


def test_answers_with_fewer_turns_than_asked_are_reported(tmp_path):
    """An answer file (another tool's, or edited) whose record has fewer turns than its question:
    the missing turns are judged by no one, so the run says which questions, instead of a mean
    over fewer turns without a word."""
    q = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "math", "turns": ["a", "b"]},
                                      {"question_id": 2, "category": "math", "turns": ["c", "d"]}])
    out = tmp_path / "o"
    (out / "answers").mkdir(parents=True)
    _write(out / "answers" / "m.jsonl", [{"question_id": 1, "turns": ["x"]},
                                         {"question_id": 2, "turns": ["y", "z"]}])
    logged = []
    res = mt_bench.run(_args(["--question-file", q, "--out", str(out), "--model", "m",
                              "--judge-base-url", "http://127.0.0.1:1/v1", "--judge-model", "j",
                              "--mode", "table"]), log=logged.append)
    warn = [m for m in logged if "fewer turns than asked" in m]
    assert len(warn) == 1 and "in 1 questions (ids 1)" in warn[0], logged
    assert res["rows"][0].missing == 3  # the answered turns, none judged yet
