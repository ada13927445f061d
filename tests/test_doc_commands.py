"""The documented commands run as documented, so the docs cannot rot.

- The tutorials ``docs/tutorials/llama2.md`` and ``docs/tutorials/bloom.md``: every fenced ``bash``
  block is extracted and run in order, in one shell session's worth of state (variables set by a
  block are seen by the next ones), from the repository root. The block marked
  ``<!-- settings -->`` (real 7B / 7.1B models on GPUs) is replaced by the page's own block marked
  ``<!-- tiny-settings -->`` (the tiny preset, CPU, fp32, a few steps). Each block must exit 0 and
  produce every path listed on the ``Produces:`` line that follows it. The inputs the tiny settings
  name are built here (``make_tiny``): a tiny HF checkpoint from a ``transformers`` config
  (``LlamaForCausalLM`` with the LLaMA sentencepiece model of ``mistral-common``;
  ``BloomForCausalLM`` with a byte-level BPE trained on chatterbot dialogues) and HH-RLHF-style
  records from the ``chatterbot-corpus`` package. ``python tests/test_doc_commands.py --make-tiny
  llama2|bloom DIR`` builds them for a manual run of a tutorial.
- Every command line of ``README*.md`` and ``docs/**/*.md`` (fenced blocks and inline code) that
  calls ``bash examples/...``, ``bash toolkits/...``, ``python toolkits/...`` or
  ``python -m megatron_patch...`` names a script or module that exists; a bash script gets as many
  positional arguments as its usage line names; a toolkit's ``--flags`` are ones its ``--help``
  lists.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
TUTORIALS = os.path.join(ROOT, "docs", "tutorials")
# variables the scripts read from the environment: the tests set what they need, nothing leaks in
SCRIPT_ENV = ["TASK", "TOKENIZER_PATH", "TOKENIZER_MODEL", "VOCAB_FILE", "GLOBAL_BATCH_SIZE",
              "PACKING", "REWARD_MARGIN", "SAVE_INTERVAL", "NPROC_PER_NODE", "EXTRA_ARGS",
              "MODEL_SIZE", "LOAD_PATH", "DATASET_PATH", "VALID_DATASET_PATH", "OUTPUT_DIR", "ENV",
              "TP", "PP", "BATCH_SIZE", "EPOCHS", "LR", "MIN_LR", "SEQ_LEN", "PAD_LEN", "PR", "AC",
              "DO", "FL", "SP", "EXTRA_VOCAB_SIZE", "MEGATRON_PATH", "MEGATRON_PATCH_PATH",
              "POLICY_LOAD", "REWARD_LOAD", "REWARD_LOAD_ITERATION", "exp_name", "NUM_DEVICE",
              "BF16", "GENERATION_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE", "TRAIN_GLOBAL_BATCH_SIZE",
              "NUM_PPO_EPISODE", "SAMPLE_PER_EPISODE", "SAVE_EPISODE_INTERVAL", "CONFIG_DIR",
              "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TINY", "WORK",
              "HF_DIR", "RAW_DATA", "DEVICES"]


# ------------------------------------------------------------------------------ tiny inputs


def _hh_records(n: int = 96) -> List[dict]:
    """HH-RLHF-style records from chatterbot's English dialogues; rejected = the answer shouted."""
    from megatron_patch import assets

    pairs = [(q, a) for q, a in assets.chatterbot_dialogs("english")
             if len(q) + len(a) < 100 and a.upper() != a]
    random.Random(0).shuffle(pairs)
    return [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
             "rejected": f"\n\nHuman: {q}\n\nAssistant: {a.upper()}"} for q, a in pairs[:n]]


def make_tiny(family: str, dest: str) -> Dict[str, str]:
    """The inputs the tutorials' tiny settings name: ``dest/<family>-hf`` and ``dest/hh.jsonl``."""
    import torch
    import transformers as T

    from megatron_patch.models.registry import get_family

    os.makedirs(dest, exist_ok=True)
    records = _hh_records()
    raw = os.path.join(dest, "hh.jsonl")
    with open(raw, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    hf = os.path.join(dest, f"{family}-hf")
    os.makedirs(hf, exist_ok=True)
    if family == "llama2":
        from megatron_patch import assets
        from megatron_patch.tokenizer import build_tokenizer

        build_tokenizer("auto", assets.llama_sentencepiece()).save_pretrained(hf)
        cfg = get_family("llama").preset("tiny")
    elif family == "bloom":
        from data_fixtures import train_bpe_folder

        texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
        train_bpe_folder(hf, texts, family="bloom", vocab_size=1000)
        vocab = len(json.load(open(os.path.join(hf, "tokenizer.json")))["model"]["vocab"])
        cfg = dict(get_family("bloom").preset("tiny"), vocab_size=vocab)
    else:
        raise ValueError(f"no tiny inputs for {family!r} (llama2, bloom)")
    cfg = {k: v for k, v in cfg.items() if k != "architectures"}
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**cfg))
    model.save_pretrained(hf)
    return {"hf": hf, "raw": raw}


# ------------------------------------------------------------------------------ markdown


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(md_path: str) -> List[dict]:
    """Fenced blocks in order: ``lang``, ``code``, ``marker`` (the HTML comment right before it:
    ``settings`` / ``tiny-settings`` / None), ``produces`` (the backticked paths of the first
    ``Produces:`` line between this block and the next)."""
    text = open(md_path, encoding="utf-8").read()
    found = list(FENCE.finditer(text))
    out = []
    for k, m in enumerate(found):
        before = text[:m.start()].rstrip()
        mk = re.search(r"<!--\s*([\w-]+)\s*-->$", before)
        after = text[m.end():found[k + 1].start() if k + 1 < len(found) else len(text)]
        prod = re.search(r"^Produces:(.*)$", after, re.M)
        out.append(dict(lang=m.group(1).strip(), code=m.group(2), marker=mk.group(1) if mk else None,
                        produces=re.findall(r"`([^`]+)`", prod.group(1)) if prod else []))
    return out


def tutorial_steps(md_path: str) -> List[dict]:
    """The bash blocks to run, the settings block replaced by the tiny one."""
    bs = [b for b in blocks(md_path) if b["lang"] == "bash"]
    tiny = [b for b in bs if b["marker"] == "tiny-settings"]
    assert len(tiny) == 1, f"{md_path}: one <!-- tiny-settings --> bash block expected"
    assert sum(b["marker"] == "settings" for b in bs) == 1, f"{md_path}: one <!-- settings --> block"
    steps = []
    for b in bs:
        if b["marker"] == "tiny-settings":
            continue
        steps.append(tiny[0] if b["marker"] == "settings" else b)
    return steps


def _expand(path: str, env: Dict[str, str]) -> str:
    def var(m):
        name = m.group(1) or m.group(2)
        assert name in env, f"{path}: ${name} is not set"
        return env[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, path)


def _base_env(tiny: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", MEGATRON_PATCH_DEVICE="cpu",
               TINY=tiny)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_tutorial(md_path: str, tiny: str, timeout: int = 600) -> Dict[str, str]:
    """Run every step; returns the final environment (the variables the page set)."""
    env = _base_env(tiny)
    state = os.path.join(tiny, ".doc_env")
    for i, step in enumerate(tutorial_steps(md_path)):
        script = f"set -euo pipefail\nset -a\n{step['code']}\nenv -0 > {shlex.quote(state)}\n"
        r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout)
        head = step["code"].strip().splitlines()[0]
        assert r.returncode == 0, (f"{os.path.basename(md_path)} block {i} ({head}) exit "
                                   f"{r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        with open(state, "rb") as f:
            env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
        for p in step["produces"]:
            hits = glob.glob(_expand(p, env))
            assert hits, f"{os.path.basename(md_path)} block {i} ({head}): no {p} ({_expand(p, env)})"
    return env


# ------------------------------------------------------------------------------ the tutorials


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_outputs(env: Dict[str, str], ppo_name: str):
    work = env["WORK"]
    answers = _jsonl(os.path.join(work, "output", "answers_ppo.jsonl"))
    questions = _jsonl(os.path.join(work, "data", "questions.jsonl"))
    assert len(answers) == len(questions) == 16
    assert all(isinstance(a["response"], str) and a["query"] == q["query"]
               for a, q in zip(answers, questions))
    episodes = _jsonl(os.path.join(work, "output", "step3_rlhf", ppo_name, "log", "metrics.jsonl"))
    assert [e["iteration"] for e in episodes] == list(range(1, int(env["NUM_PPO_EPISODE"]) + 1))
    assert all(e["reward_mean"] == e["reward_mean"] for e in episodes)
    rm = json.load(open(os.path.join(env["RM_CKPT"], "megatron_patch.json")))
    assert rm["reward_model"] is True
    sft = _jsonl(glob.glob(os.path.join(work, "output", "step1_sft", "log", "*",
                                        "metrics.jsonl"))[0])
    assert any("valid_lm_loss" in r for r in sft)
    # MT-Bench: both models answered every question (two turns), every turn was judged, and with
    # the tiny SFT model as the judge (no [[N]] in its replies) every judgment is FAILED, not a score
    n_q = len(_jsonl(env["MT_BENCH_QUESTIONS"]))
    for name in ("sft", "rlhf"):
        ans = _jsonl(os.path.join(work, "mt_bench", "answers", f"{name}.jsonl"))
        assert len(ans) == n_q and all(len(a["choices"][0]["turns"]) == 2 for a in ans)
    judged = _jsonl(os.path.join(work, "mt_bench", "judgments", "judge.jsonl"))
    assert len(judged) == 2 * 2 * n_q and all(j["score"] is None for j in judged)
    table = open(os.path.join(work, "mt_bench", "mt_bench_table.md"), encoding="utf-8").read()
    rows = {r.split("|")[1].strip(): r for r in table.splitlines() if r.startswith("| ")}
    for name in ("sft", "rlhf"):
        assert rows[name].rstrip(" |").endswith(str(2 * n_q)), rows  # the Failed column


@pytest.mark.parametrize("name,ppo,arch", [("llama2", "llama2_7b_ppo", "LlamaForCausalLM"),
                                           ("bloom", "bloom_7b1_ppo", "BloomForCausalLM")])
def test_tutorial(tmp_path, name, ppo, arch):
    tiny = str(tmp_path)
    make_tiny(name, tiny)
    env = run_tutorial(os.path.join(TUTORIALS, f"{name}.md"), tiny)
    _check_outputs(env, ppo)
    cfg = json.load(open(os.path.join(env["WORK"], f"{name}-ppo-hf", "config.json")))
    assert cfg["architectures"] == [arch]


def test_tutorials_have_settings_and_evaluation():
    for name in ("llama2.md", "bloom.md"):
        path = os.path.join(TUTORIALS, name)
        steps = tutorial_steps(path)
        assert steps[0]["marker"] == "tiny-settings"
        text = open(path, encoding="utf-8").read()
        tail = text.split("## Evaluation (MT-Bench)", 1)
        assert len(tail) == 2, f"{name}: no '## Evaluation (MT-Bench)' section"


# ------------------------------------------------------------------------------ every doc


def _doc_files() -> List[str]:
    files = sorted(glob.glob(os.path.join(ROOT, "README*.md")))
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return files


def _command_texts(md_path: str) -> List[Tuple[str, str]]:
    """(where, text) of every fenced shell block (continuations joined, heredoc bodies dropped) and
    every inline code span that starts with bash/python (after VAR=value prefixes)."""
    text = open(md_path, encoding="utf-8").read()
    out = []
    rel = os.path.relpath(md_path, ROOT)
    for m in FENCE.finditer(text):
        if m.group(1).strip() not in ("", "bash", "sh", "shell", "console"):
            continue
        line_no = text[:m.start()].count("\n") + 2
        body = m.group(2).replace("\\\n", " ")
        lines, heredoc = [], None
        for ln in body.splitlines():
            if heredoc:
                if ln.strip() == heredoc:
                    heredoc = None
                continue
            hd = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", ln)
            if hd:
                heredoc = hd.group(1)
            lines.append(ln)
        out += [(f"{rel}:{line_no}", ln) for ln in lines]
    prose = FENCE.sub("", text)
    for m in re.finditer(r"`((?:[A-Za-z_]\w*=\S* )*(?:bash|python3?) [^`]+)`", prose):
        out.append((f"{rel} (inline)", m.group(1)))
    return out


def _commands(text: str) -> List[List[str]]:
    """The argv of each bash/python command in a line of shell (after VAR=value prefixes)."""
    text = re.sub(r"(?<!<)<[A-Za-z][^<>\n]*>", "PLACEHOLDER", text)  # <rm run>, <run name>
    text = text.replace("$(", " ; ")  # a command substitution starts a command
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        toks = list(lex)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return []
    cmds, cur = [], []
    for t in toks:
        if t and set(t) <= set(";&|<>()"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    cmds.append(cur)
    out = []
    for c in cmds:
        while c and re.match(r"^[A-Za-z_]\w*=", c[0]):
            c = c[1:]
        if c and c[0] in ("bash", "python", "python3"):
            out.append(c)
    return out


_USAGE_CACHE: Dict[str, Tuple[int, int]] = {}
_HELP_CACHE: Dict[str, str] = {}


def _arg_range(script: str) -> Optional[Tuple[int, int]]:
    """(required, required + optional) positional arguments from the script's usage text."""
    if script not in _USAGE_CACHE:
        r = subprocess.run(["bash", os.path.join(ROOT, script), "-h"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
        name = os.path.basename(script)
        rng = None
        for line in (r.stdout + r.stderr).splitlines():
            toks = line.split()
            idx = [i for i, t in enumerate(toks) if t == name or t.endswith("/" + name)]
            if idx:
                rest = toks[idx[0] + 1:]
                req = sum(1 for t in rest if not t.startswith("["))
                rng = (req, len(rest))
                break
        _USAGE_CACHE[script] = rng
    return _USAGE_CACHE[script]


def _flags(script: str) -> str:
    if script not in _HELP_CACHE:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env=_base_env(ROOT))
        assert r.returncode == 0, f"{script} --help failed: {r.stderr[-2000:]}"
        _HELP_CACHE[script] = r.stdout
    return _HELP_CACHE[script]


def check_commands(md_files: List[str]) -> Tuple[int, List[str]]:
    """(commands checked, problems) for the command lines of ``md_files``."""
    import importlib.util

    checked = 0
    problems = []
    for md in md_files:
        for where, text in _command_texts(md):
            for argv in _commands(text):
                prog, args = argv[0], argv[1:]
                if not args:
                    continue
                if prog == "bash":
                    script = args[0]
                    if not script.startswith(("examples/", "toolkits/")):
                        continue
                    checked += 1
                    if not os.path.isfile(os.path.join(ROOT, script)):
                        problems.append(f"{where}: {script} does not exist")
                        continue
                    rng = _arg_range(script)
                    if rng is None:
                        problems.append(f"{where}: {script} -h prints no usage line")
                    elif not rng[0] <= len(args) - 1 <= rng[1]:
                        problems.append(f"{where}: {script} takes {rng[0]}..{rng[1]} arguments, "
                                        f"the doc gives {len(args) - 1}: {' '.join(args[1:])}")
                elif args[0] == "-m":
                    if len(args) < 2 or not args[1].startswith("megatron_patch"):
                        continue
                    checked += 1
                    if importlib.util.find_spec(args[1]) is None:
                        problems.append(f"{where}: no module {args[1]}")
                elif args[0].startswith("toolkits/"):
                    checked += 1
                    script = args[0]
                    if not os.path.isfile(os.path.join(ROOT, script)):
                        problems.append(f"{where}: {script} does not exist")
                        continue
                    helptext = _flags(script)
                    for a in args[1:]:
                        flag = a.split("=", 1)[0]
                        if flag.startswith("--") and flag not in helptext:
                            problems.append(f"{where}: {script} has no option {flag}")
    return checked, problems


def test_every_documented_command_names_a_real_script():
    checked, problems = check_commands(_doc_files())
    assert not problems, "\n".join(problems)
    assert checked >= 30, checked  # the parser still finds the commands


def test_the_check_finds_rot(tmp_path):
    md = tmp_path / "rot.md"
    md.write_text(
        "```bash\n"
        "bash toolkits/model_checkpoints_convertor/model_convertor_huggingface_megatron.sh - a b 2 1\n"
        "bash examples/llama/run_no_such_script.sh 1 2\n"
        "TP=2 bash examples/rlhf/run_rlhf.sh 0,1 cfg extra\n"
        "python -m megatron_patch.no_such_module --x\n"
        "bash examples/rlhf/step3_rlhf/run_scripts/llama2/run_7b_7b.sh 0,1  # fine\n"
        "```\n"
        "and inline `python toolkits/sft_data_preprocessing/sample_stats.py --input x --no-such-flag`,\n"
        "`TASK=reward bash examples/llama/run_evaluate_megatron_llama.sh dsw - -`\n")
    checked, problems = check_commands([str(md)])
    assert checked == 7, (checked, problems)
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "run_evaluate_megatron_llama.sh takes 14..14 arguments, the doc gives 3" in text
    assert "takes 6..6 arguments, the doc gives 5" in text
    assert "run_no_such_script.sh does not exist" in text
    assert "run_rlhf.sh takes 1..2 arguments, the doc gives 3" in text
    assert "no module megatron_patch.no_such_module" in text
    assert "has no option --no-such-flag" in text


def test_command_parser():
    assert _commands('A=1 B="x y" bash examples/a.sh 1 "2 3" | tee log') == \
        [["bash", "examples/a.sh", "1", "2 3"]]
    assert _commands('export X=$(ls -d "$W"/a-*)') == []
    assert _commands("bash s.sh output/<rm run> b  # comment") == [["bash", "s.sh", "output/PLACEHOLDER", "b"]]
    assert _commands("python - a b <<'PY'") == [["python", "-", "a", "b"]]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make-tiny":
        print(json.dumps(make_tiny(sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: python tests/test_doc_commands.py --make-tiny llama2|bloom DIR")
