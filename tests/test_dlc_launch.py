"""``ENV=dlc`` of every launch script: two "nodes" on one machine, each a ``bash <script> dlc ...``
started with the variables DLC sets (``WORLD_SIZE`` = 2 nodes, ``RANK`` = node rank,
``MASTER_ADDR``, ``MASTER_PORT`` = one port found free by binding port 0) and one process per node
(``NPROC_PER_NODE=1``), against the single-node ``dsw`` run of 2 processes. The two nodes always
cooperate (TP=2 or DP=2), so the process layout is the same as dsw's and the results are bit-exact:

- pretrain (llama, DP=2 + distributed optimizer): the loss of the step and every saved tensor;
- finetune SFT (qwen2, TP=2 + sequence parallel, from scratch) and the reward model through the
  llama2 tutorial ``step2_reward/llama2_reward.sh`` (``run_finetune_megatron_llama.sh``,
  TASK=reward, DP=2, from the pretrained checkpoint): metrics.jsonl and the saved weights;
- evaluate (qwen2 on the SFT checkpoint, TP=2): evaluation.json;
- text generation (llama on the pretrained checkpoint, resharded to TP=2, sampling): the outputs;
- RLHF (``run_rlhf.sh``, PPO with the llama2 configs, DP=2): the first episode's metrics and the
  trained policy's weights;
- cheap checks of every script that takes ENV: a missing or bad DLC variable is one ``error:`` line
  and exit 2; the torchrun line (a stub ``torchrun`` on PATH) carries the nodes, the node rank, the
  master address and port, and DLC's node-level RANK/WORLD_SIZE do not leak into the job; on CPU
  ``KUBERNETES_CONTAINER_RESOURCE_GPU`` does not choose the process count.

``-m slow`` runs the dlc path of every remaining family script (finetune SFT and reward, evaluate,
text generation) and of the tutorial scripts (step1 SFT, bloom reward, the step-3 PPO scripts).
"""
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from megatron_patch.platform import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
FAMILIES = ["llama", "bloom", "falcon", "glm", "galactica", "qwen2", "mistral"]
SCRIPT_FAMILIES = FAMILIES + ["mixtral"]  # every family's launch scripts (cheap checks)
RLHF = os.path.join(EX, "rlhf")
STEP3 = ["llama2/run_7b_7b.sh", "llama2/run_13b_13b.sh", "llama2/run_70b_70b.sh",
         "bloom/run_7b1_7b1.sh"]
DLC_VARS = ["WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"]
# what the scripts read from the environment: the tests set what they need, nothing leaks in
SCRIPT_ENV = DLC_VARS + [
    "LOCAL_RANK", "KUBERNETES_CONTAINER_RESOURCE_GPU", "NPROC_PER_NODE", "ENV", "TASK",
    "TOKENIZER_PATH", "TOKENIZER_MODEL", "VOCAB_FILE", "GLOBAL_BATCH_SIZE", "PACKING",
    "REWARD_MARGIN", "SAVE_INTERVAL", "EXTRA_ARGS", "MODEL_SIZE", "LOAD_PATH", "DATASET_PATH",
    "VALID_DATASET_PATH", "OUTPUT_DIR", "TP", "PP", "BATCH_SIZE", "EPOCHS", "LR", "MIN_LR",
    "SEQ_LEN", "PAD_LEN", "PR", "AC", "DO", "FL", "SP", "EXTRA_VOCAB_SIZE", "MEGATRON_PATH",
    "MEGATRON_PATCH_PATH", "POLICY_LOAD", "REWARD_LOAD", "REWARD_LOAD_ITERATION", "exp_name",
    "NUM_DEVICE", "BF16", "GENERATION_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE",
    "TRAIN_GLOBAL_BATCH_SIZE", "NUM_PPO_EPISODE", "SAMPLE_PER_EPISODE", "SAVE_EPISODE_INTERVAL",
    "CONFIG_DIR", "TORCHELASTIC_RUN_ID", "EP"]
# per-iteration / per-episode timings differ between any two runs (and time_*_s of RLHF episodes)
TIMINGS = {"iteration_time_s", "tokens_per_s", "tflops_per_gpu"}


def _script(kind, family):
    return os.path.join(EX, family, f"run_{kind}_megatron_{family}.sh")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", MEGATRON_PATCH_DEVICE="cpu",
               TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _bash(argv, cwd, timeout=300, **env):
    return subprocess.run(["bash", *argv], capture_output=True, text=True, cwd=str(cwd),
                          env=_env(**env), timeout=timeout)


def _ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


# ------------------------------------------------------------------------------ running two nodes


def _stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the node's bash, torchrun and its workers
    p.wait()


def _popen(argv, cwd, env):
    return subprocess.Popen(["bash", *argv], cwd=str(cwd), env=_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_all(procs, timeout):
    """Wait for every process; the first failure (or the timeout) stops the rest (a node waits
    for its peers); -> (exit codes, outputs)."""
    outs = [None] * len(procs)

    def read(i):
        outs[i] = procs[i].stdout.read()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                time.sleep(3)  # let the others report their own errors
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            _stop(p)
    for t in readers:
        t.join(10)
    return [p.returncode for p in procs], [o or "" for o in outs]


def run_pair(job, cwd, nodes=2, timeout=600):
    """``job(ENV) -> (argv, env)``: the single-node ``dsw`` run (2 processes) and the ``dlc`` run
    (``nodes`` concurrent ``bash argv``, one process each, with the variables DLC sets), all at
    once; -> {"dsw": output, "dlc": [output of each node]}.

    The nodes share one port, free when it was picked (bound to port 0, then released); if another
    process took it in between (the rendezvous store cannot bind), both runs start again on a new
    port."""
    for _ in range(3):
        port = free_port()
        argv, env = job("dsw")
        procs = [_popen(argv, cwd, dict({"NPROC_PER_NODE": 2}, **env))]
        argv, env = job("dlc")
        for rank in range(nodes):
            procs.append(_popen(argv, cwd, dict({"NPROC_PER_NODE": 1}, **env, WORLD_SIZE=nodes,
                                                RANK=rank, MASTER_ADDR="127.0.0.1",
                                                MASTER_PORT=port)))
        codes, outs = _wait_all(procs, timeout)
        if all(c == 0 for c in codes):
            return {"dsw": outs[0], "dlc": outs[1:]}
        text = "\n".join(f"--- {'dsw' if i == 0 else f'dlc node {i - 1}'} (exit {c}):\n{o[-5000:]}"
                         for i, (c, o) in enumerate(zip(codes, outs)))
        if "EADDRINUSE" not in text and "address already in use" not in text.lower():
            raise AssertionError(f"{argv[0]} failed:\n{text}")
    raise AssertionError(f"{argv[0]}: no free port in 3 tries\n{text}")


# ------------------------------------------------------------------------------ comparisons


def _only(path):
    items = sorted(os.listdir(path))
    assert len(items) == 1, (path, items)
    return os.path.join(path, items[0])


def _records(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if k not in TIMINGS and not k.startswith("time_")} for line in f]


def _assert_same_tree(a, b, where):
    """Recursively equal: tensors bit for bit, containers key by key, other values ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max abs diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)),
                                                          sorted(map(str, b)))
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float, str, bool, type(None))):
        assert a == b, (where, a, b)


def assert_same_checkpoint(dsw_ckpt, dlc_ckpt):
    """The same iteration and, per rank file, the same weights and optimizer state (the saved
    arguments hold the run's own paths and are left out)."""
    tracker = "latest_checkpointed_iteration.txt"
    it = open(os.path.join(dsw_ckpt, tracker)).read().strip()
    assert open(os.path.join(dlc_ckpt, tracker)).read().strip() == it
    sub = "release" if it == "release" else f"iter_{int(it):07d}"
    files = sorted(os.path.relpath(os.path.join(d, f), os.path.join(dsw_ckpt, sub))
                   for d, _, fs in os.walk(os.path.join(dsw_ckpt, sub)) for f in fs)
    files_dlc = sorted(os.path.relpath(os.path.join(d, f), os.path.join(dlc_ckpt, sub))
                       for d, _, fs in os.walk(os.path.join(dlc_ckpt, sub)) for f in fs)
    assert files == files_dlc and files, (files, files_dlc)  # every rank saved once, no extra
    for rel in files:
        if not rel.endswith(".pt"):
            continue
        a = torch.load(os.path.join(dsw_ckpt, sub, rel), map_location="cpu", weights_only=False)
        b = torch.load(os.path.join(dlc_ckpt, sub, rel), map_location="cpu", weights_only=False)
        if isinstance(a, dict):
            assert "model" in a or "model0" in a or "optimizer" in a, (rel, list(a))
            a = {k: v for k, v in a.items() if k not in ("args", "checkpoint_version")}
            b = {k: v for k, v in b.items() if k not in ("args", "checkpoint_version")}
        _assert_same_tree(a, b, rel)


def assert_same_metrics(dsw_log_dir, dlc_log_dir, loss_key):
    a = _records(os.path.join(dsw_log_dir, "metrics.jsonl"))
    b = _records(os.path.join(dlc_log_dir, "metrics.jsonl"))
    assert a and any(loss_key in r for r in a), a
    assert a == b  # loss, grad norm, lr, ... bit for bit; one record per iteration, not per node


# ------------------------------------------------------------------------------ data and runs


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One tiny data set of each kind and a byte-level BPE (2000 tokens: tiny embeddings)."""
    from megatron_patch.data._preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("dlc")
    pairs = [(q, a) for q, a in chatterbot_dialogs("english") if len(q) + len(a) < 120]
    random.Random(0).shuffle(pairs)
    texts = [q + " " + a for q, a in pairs]
    tok = train_bpe_folder(str(root / "tok"), texts, vocab_size=2000)

    def write(name, rows):
        with open(root / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return str(root / name)

    write("corpus.jsonl", [{"text": t} for t in texts[:400]])
    preprocess(PreprocessConfig(input=str(root / "corpus.jsonl"), output_prefix=str(root / "pt"),
                                append_eod=True, tokenizer_model=tok), log=open(os.devnull, "w"))
    answers = [a for _, a in pairs]
    return {
        "root": root, "tok": tok, "pretrain": str(root / "pt_text_document"),
        "sft": write("sft.jsonl", [{"query": q, "response": a} for q, a in pairs[:8]]),
        "reward": write("reward.jsonl", [{"prompt": q, "chosen": a, "rejected": answers[-1 - i]}
                                         for i, (q, a) in enumerate(pairs[8:16])]),
        "prompts": write("prompts.jsonl", [{"prompt": q} for q, _ in pairs[16:24]]),
        "gen_in": write("gen_in.jsonl", [{"query": q} for q, _ in pairs[24:28]]),
    }


def _pretrain_args(env, ws, out):
    # DP=2 (TP=1: one process per node), the distributed optimizer, one step of a global batch of 2
    return [_script("pretrain", "llama"), env, "-", "-", "tiny", "1", "2", "1e-3", "1e-4", "32",
            "0", "fp32", "1", "1", "none", "true", "false", "false", "1", ws["pretrain"], "none",
            "64", "0", str(out)]


@pytest.fixture(scope="module")
def pretrain(ws):
    """The llama pretrain script, dsw (2 processes) and dlc (2 nodes x 1 process)."""
    root = ws["root"]
    run_pair(lambda env: (_pretrain_args(env, ws, root / f"pt_{env}"),
                          dict(TOKENIZER_PATH=ws["tok"])), root)
    return {k: _only(root / f"pt_{k}" / "checkpoint") for k in ("dsw", "dlc")}


def test_pretrain_dlc_equals_dsw(pretrain):
    dsw, dlc = pretrain["dsw"], pretrain["dlc"]
    assert os.path.basename(dsw) == os.path.basename(dlc)  # the same run name
    logs = [d.replace(os.sep + "checkpoint" + os.sep, os.sep + "log" + os.sep) for d in (dsw, dlc)]
    assert_same_metrics(*logs, "lm_loss")
    assert [r["iteration"] for r in _records(os.path.join(logs[1], "metrics.jsonl"))] == [1]
    assert_same_checkpoint(dsw, dlc)
    # both nodes append to the one console.log (shared storage): the job's lines once, not per node
    console = open(os.path.join(logs[1], "console.log")).read()
    assert console.count("iteration        1/       1") == 1, console[-3000:]
    assert console.count("saved checkpoint at iteration 1") == 1, console[-3000:]


def _finetune_args(env, family, ws, data, ckpt, out, tp, sp="false", size="tiny"):
    return [_script("finetune", family), env, "-", "-", size, "2", "1e-3", "1e-4", "128", "128",
            "0", "fp32", str(tp), "1", "none", "false", "false", sp, data, "none", ckpt, "1",
            str(out)]


def _dsw_dlc_finetune(ws, family, name, tp, ckpt="none", sp="false", task="sft", size="tiny",
                      data=None):
    """A finetune script at dsw (2 processes) and at dlc (2 nodes); -> the two output folders."""
    root = ws["root"]
    data = data or (ws["reward"] if task == "reward" else ws["sft"])
    env = dict(TOKENIZER_PATH=ws[f"tok_{family}"] if f"tok_{family}" in ws else ws["tok"],
               TASK=task, GLOBAL_BATCH_SIZE=4)
    outs = {k: root / f"{name}_{k}" for k in ("dsw", "dlc")}
    run_pair(lambda e: (_finetune_args(e, family, ws, data, ckpt, outs[e], tp, sp, size), env),
             root)
    return outs


def _assert_finetune_same(outs, loss_key, iterations):
    ck = {k: _only(v / "checkpoint") for k, v in outs.items()}
    assert os.path.basename(ck["dsw"]) == os.path.basename(ck["dlc"])
    logs = {k: _only(v / "log") for k, v in outs.items()}
    assert_same_metrics(logs["dsw"], logs["dlc"], loss_key)
    recs = [r for r in _records(os.path.join(logs["dlc"], "metrics.jsonl")) if loss_key in r]
    assert [r["iteration"] for r in recs] == list(range(1, iterations + 1))
    assert_same_checkpoint(ck["dsw"], ck["dlc"])
    return ck["dsw"]


@pytest.fixture(scope="module")
def sft(ws):
    """qwen2 SFT from scratch at TP=2, sequence parallel: 8 records, global batch 4 -> 2 steps."""
    outs = _dsw_dlc_finetune(ws, "qwen2", "sft", tp=2, sp="true")
    return outs


def test_finetune_sft_dlc_equals_dsw(sft):
    ck = _assert_finetune_same(sft, "lm_loss", 2)
    assert os.path.basename(ck).endswith("-gbs-4-seqlen-128-padlen-128-pr-fp32-tp-2-pp-1-ac-none-"
                                         "do-false-sp-true-ep-1")
    assert sorted(os.listdir(os.path.join(ck, "iter_0000002"))) == ["mp_rank_00", "mp_rank_01"]


@pytest.fixture(scope="module")
def reward(ws, pretrain):
    """The llama2 reward tutorial (run_finetune_megatron_llama.sh, TASK=reward) from the pretrained
    checkpoint, DP=2: 8 pairs, global batch 4 -> 2 steps."""
    root = ws["root"]
    v = dict(LOAD_PATH=pretrain["dsw"], TOKENIZER_MODEL=ws["tok"], DATASET_PATH=ws["reward"],
             SEQ_LEN=128, BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, AC="none", DO="false", FL="false")
    run_pair(lambda env: ([os.path.join(RLHF, "step2_reward", "llama2_reward.sh")],
                          dict(v, ENV=env, OUTPUT_DIR=root / f"rm_{env}")), root)
    return {env: root / f"rm_{env}" / "step2_reward" for env in ("dsw", "dlc")}


def test_reward_tutorial_dlc_equals_dsw(reward):
    ck = _assert_finetune_same(reward, "rm_loss", 2)
    assert json.load(open(os.path.join(ck, "megatron_patch.json")))["reward_model"] is True


def _evaluate_args(env, family, data, ckpt, out, tp):
    return [_script("evaluate", family), env, "-", "-", "auto", "2", "128", "128", "0", "fp32",
            str(tp), "1", data, ckpt, str(out)]


def _dsw_dlc_evaluate(ws, family, name, data, ckpt, tp, task="sft"):
    root = ws["root"]
    run_pair(lambda env: (_evaluate_args(env, family, data, ckpt, root / f"{name}_{env}", tp),
                          dict(TASK=task)), root)
    res = {env: json.load(open(os.path.join(_only(_only(root / f"{name}_{env}" / "log")),
                                            "evaluation.json"))) for env in ("dsw", "dlc")}
    assert res["dsw"] == res["dlc"]
    return res["dsw"]


def test_evaluate_dlc_equals_dsw(ws, sft):
    """qwen2 on the SFT checkpoint at its own TP=2: one process on each node."""
    ck = _only(sft["dsw"] / "checkpoint")
    res = _dsw_dlc_evaluate(ws, "qwen2", "eval", ws["sft"], ck, tp=2)
    assert res["samples"] == 8 and res["lm loss"] > 1.0


def _generation_args(env, family, ckpt, inp, out, tp):
    # sampling (top-p 0.9, the CLI's default seed): the same tokens need the same random stream
    return [_script("text_generation", family), env, "-", "-", "-", ckpt, "auto", str(tp), "2",
            "48", "0", "16", "8", inp, str(out), "0.9", "1.0", "1.0"]


def _dsw_dlc_generation(ws, family, name, ckpt, tp):
    root = ws["root"]
    path = {env: root / name / env / "out.jsonl" for env in ("dsw", "dlc")}
    run_pair(lambda env: (_generation_args(env, family, ckpt, ws["gen_in"], path[env], tp), {}),
             root)
    out = {env: open(path[env], encoding="utf-8").read() for env in ("dsw", "dlc")}
    assert out["dsw"] == out["dlc"]
    rows = [json.loads(x) for x in out["dlc"].splitlines()]
    assert len(rows) == 4 and all(r["response"] for r in rows), rows
    # each node tees its own console: node 1's does not overwrite node 0's
    assert sorted(os.listdir(root / name / "dlc")) == ["out.jsonl", "out.jsonl.log",
                                                       "out.jsonl.node1.log"]
    return rows


def test_text_generation_dlc_equals_dsw(ws, pretrain):
    """llama on the pretrained (TP=1) checkpoint resharded to TP=2 across the two nodes."""
    _dsw_dlc_generation(ws, "llama", "gen", pretrain["dsw"], tp=2)


ROLE_FILES = {"ppo_policy": "ppo_policy.yaml", "policy": "policy_inference.yaml",
              "reference": "reference.yaml", "reward_train": "ppo_value.yaml",
              "reward_forward": "value_inference.yaml", "reward_ref": "reward_inference.yaml"}


def _tiny_llama2_configs(folder):
    """examples/rlhf/configs/llama2 with short prompts and responses (each role's file includes
    the example's and tiny.yaml)."""
    import yaml

    os.makedirs(folder, exist_ok=True)
    llama2 = os.path.join(RLHF, "configs", "llama2")
    files = {"rlhf.yaml": {"includes": [os.path.join(llama2, "rlhf.yaml")],
                           "models": {r: {"model_config_file": f} for r, f in ROLE_FILES.items()}},
             "tiny.yaml": {"max_new_tokens": 12, "max_prompt_length": 32}}
    files.update({f: {"includes": [os.path.join(llama2, f), "tiny.yaml"]}
                  for f in ROLE_FILES.values()})
    for name, data in files.items():
        with open(os.path.join(folder, name), "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
    return folder


def test_rlhf_dlc_equals_dsw(ws, pretrain, reward):
    """PPO with the llama2 configs: DEVICES=0 on each of 2 nodes = the 2 devices of dsw's 0,1."""
    root = ws["root"]
    rm = _only(reward["dsw"] / "checkpoint")
    v = dict(POLICY_LOAD=pretrain["dsw"], REWARD_LOAD=rm, TOKENIZER_MODEL=ws["tok"],
             DATASET_PATH=ws["prompts"], MODEL_SIZE="auto", TP=1, SEQ_LEN=128,
             GENERATION_BATCH_SIZE=2, TRAIN_MICRO_BATCH_SIZE=1, TRAIN_GLOBAL_BATCH_SIZE=2,
             SAMPLE_PER_EPISODE=4, NUM_PPO_EPISODE=1,
             CONFIG_DIR=_tiny_llama2_configs(str(root / "rlhf_cfg")))
    script = os.path.join(RLHF, "run_rlhf.sh")
    outs = run_pair(lambda env: ([script, "0,1" if env == "dsw" else "0"],
                                 dict(v, ENV=env, OUTPUT_DIR=root / f"ppo_{env}", exp_name="ppo")),
                    root)
    assert all("(2 process(es) in all)" in o for o in [outs["dsw"], *outs["dlc"]])
    d = {k: root / f"ppo_{k}" / "step3_rlhf" / "ppo" for k in ("dsw", "dlc")}
    a = _records(os.path.join(d["dsw"], "log", "metrics.jsonl"))
    b = _records(os.path.join(d["dlc"], "log", "metrics.jsonl"))
    assert [r["iteration"] for r in b] == [1] and "reward_mean" in b[0] and "policy_loss" in b[0]
    assert a == b
    for role in ("ppo_policy", "ppo_value"):
        assert_same_checkpoint(os.path.join(d["dsw"], role), os.path.join(d["dlc"], role))


# ------------------------------------------------------------------------------ cheap checks


def _all_env_scripts(tmp):
    """(name, argv, env) of every script under examples/ that takes ENV, with valid settings."""
    out = str(tmp / "out")
    ft = ["-", "-", "tiny", "1", "1e-3", "1e-4", "32", "32", "0", "fp32", "1", "1", "none",
          "false", "false", "false", "t.jsonl", "none", "none", "1", out]
    ev = ["-", "-", "auto", "1", "32", "32", "0", "fp32", "1", "1", "d.jsonl", "ck", out]
    tg = ["-", "-", "-", "ck", "auto", "1", "1", "32", "1", "0", "4", "in.txt", out + "/o.txt",
          "0", "1.0", "1.0"]
    pt = ["-", "-", "tiny", "1", "2", "1e-3", "1e-4", "32", "0", "fp32", "1", "1", "none",
          "false", "false", "false", "1", "data", "none", "64", "0", out]
    cases = []
    for fam in SCRIPT_FAMILIES:
        cases += [(f"pretrain {fam}", [_script("pretrain", fam), "dlc", *pt], {}),
                  (f"finetune {fam}", [_script("finetune", fam), "dlc", *ft], {}),
                  (f"evaluate {fam}", [_script("evaluate", fam), "dlc", *ev], {}),
                  (f"text_generation {fam}", [_script("text_generation", fam), "dlc", *tg], {})]
    tut = dict(ENV="dlc", MODEL_SIZE="tiny", LOAD_PATH="none", TOKENIZER_MODEL="tok",
               TOKENIZER_PATH="tok", DATASET_PATH="d.jsonl", OUTPUT_DIR=out)
    for name in ("step1_sft/llama2_sft.sh", "step1_sft/bloom_sft.sh",
                 "step2_reward/llama2_reward.sh", "step2_reward/bloom_reward.sh"):
        cases.append((name, [os.path.join(RLHF, name)], tut))
    step3 = dict(ENV="dlc", POLICY_LOAD="p", REWARD_LOAD="r", TOKENIZER_MODEL="t", VOCAB_FILE="t",
                 DATASET_PATH="d", exp_name="x", OUTPUT_DIR=out)
    for name in STEP3:
        cases.append((name, [os.path.join(RLHF, "step3_rlhf", "run_scripts", name), "0"], step3))
    cases.append(("run_rlhf.sh", [os.path.join(RLHF, "run_rlhf.sh"), "0"], dict(step3)))
    return cases


def test_every_env_script_is_listed():
    """The cases below cover every script under examples/ that reads ENV (positional or not)."""
    found = set()
    for d, _, files in os.walk(EX):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith(".sh") and "common" not in os.path.basename(d) and f != "common.sh":
                text = open(p).read()
                if any(w in text for w in ("mp_pretrain", "mp_finetune", "mp_evaluate",
                                           "mp_text_generation", "mp_launcher", "rlhf_run ",
                                           "rlhf3_run ")):
                    found.add(os.path.relpath(p, EX))
    listed = {os.path.relpath(c[1][0], EX) for c in _all_env_scripts(Path("/x"))}
    assert found == listed, (found - listed, listed - found)


def test_dlc_missing_or_bad_variable_is_one_line_exit_2(tmp_path):
    full = dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    bad = [("WORLD_SIZE", "two"), ("RANK", "2"), ("RANK", "-1"), ("MASTER_PORT", "http")]
    for name, argv, env in _all_env_scripts(tmp_path):
        for missing in DLC_VARS:
            r = _bash(argv, tmp_path, timeout=60, **env,
                      **{k: v for k, v in full.items() if k != missing})
            errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:") \
                and missing in errors[0], (name, missing, r.returncode, r.stderr[-2000:])
            assert "unbound variable" not in r.stderr
        for var, value in bad if name.startswith(("pretrain", "finetune llama")) else bad[:1]:
            r = _bash(argv, tmp_path, timeout=60, **env, **dict(full, **{var: value}))
            errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.returncode == 2 and len(errors) == 1 and var in errors[0], (name, var,
                                                                                 r.stderr)
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


STUB = """#!/usr/bin/env bash
# records the torchrun line and the environment it was started with
{ printf '%s\\n' "$*"; echo "RANK=${RANK-unset} WORLD_SIZE=${WORLD_SIZE-unset} \
LOCAL_RANK=${LOCAL_RANK-unset}"; } >> "$TORCHRUN_STUB_LOG"
"""


def test_dlc_torchrun_line(tmp_path):
    """Every script's dlc torchrun line (stub torchrun): DLC's nodes, node rank, master address and
    port; the process count from NPROC_PER_NODE or TP x PP on CPU, never from DLC's GPU count;
    DLC's node-level RANK/WORLD_SIZE not passed on (torchrun sets the process-level ones)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text(STUB)
    (bindir / "torchrun").chmod(stat.S_IRWXU)
    log = tmp_path / "torchrun.log"
    dlc = dict(WORLD_SIZE="4", RANK="3", MASTER_ADDR="10.1.2.3", MASTER_PORT="23456",
               KUBERNETES_CONTAINER_RESOURCE_GPU="8", LOCAL_RANK="0", TORCHRUN_STUB_LOG=log)
    path = str(bindir) + os.pathsep + _env()["PATH"]
    for name, argv, env in _all_env_scripts(tmp_path):
        if name == "run_rlhf.sh" or name.startswith("llama2/") or name.startswith("bloom/"):
            continue  # these check the whole RLHF config in Python first: run for real above
        for nproc in (None, "3"):
            log.unlink(missing_ok=True)
            extra = dict(env, **dlc, PATH=path)
            if nproc:
                extra["NPROC_PER_NODE"] = nproc
            r = _bash(argv, tmp_path, timeout=60, **extra)
            assert r.returncode == 0, (name, r.stdout[-2000:] + r.stderr[-2000:])
            line, child = open(log).read().splitlines()
            assert line.startswith("--nnodes 4 --node-rank 3 --master-addr 10.1.2.3 "
                                   f"--master-port 23456 --nproc-per-node {nproc or 1} -m "), \
                (name, line)
            assert child == "RANK=unset WORLD_SIZE=unset LOCAL_RANK=unset", (name, child)
            if name.startswith(("finetune", "step")):  # global batch: micro batch x (nodes x procs)
                gbs = line.split("--global-batch-size ")[1].split()[0]
                micro = line.split("--micro-batch-size ")[1].split()[0]
                assert int(gbs) == int(micro) * 4 * int(nproc or 1), (name, line)


# ------------------------------------------------------------------------------ slow: every family


@pytest.fixture(scope="module")
def family_tokenizers(ws):
    texts = [json.loads(x)["text"] for x in open(ws["root"] / "corpus.jsonl")]
    ws["tok_glm"] = train_bpe_folder(str(ws["root"] / "tok_glm"), texts, family="glm",
                                     vocab_size=2000)
    return ws


SLOW = [(kind, fam) for fam in FAMILIES for kind in ("finetune", "reward", "evaluate",
                                                      "text_generation")
        if (kind, fam) not in {("finetune", "qwen2"), ("evaluate", "qwen2"),
                               ("text_generation", "llama")}]


@pytest.mark.slow
@pytest.mark.parametrize("kind,family", SLOW)
def test_family_script_dlc_equals_dsw(family_tokenizers, kind, family):
    ws = family_tokenizers
    if kind in ("finetune", "reward"):
        task = "sft" if kind == "finetune" else "reward"
        tp = 2 if kind == "finetune" else 1  # the two nodes share the TP group, or are 2 replicas
        outs = _dsw_dlc_finetune(ws, family, f"{kind}_{family}", tp=tp, task=task)
        _assert_finetune_same(outs, "lm_loss" if task == "sft" else "rm_loss", 2)
        return
    # a checkpoint of this family: SFT from scratch at TP=1 (dsw, 2 replicas)
    root = ws["root"]
    out = root / f"base_{family}"
    if not os.path.isdir(out / "checkpoint"):
        env = dict(TOKENIZER_PATH=ws.get(f"tok_{family}", ws["tok"]), GLOBAL_BATCH_SIZE=4)
        _ok(_bash(_finetune_args("dsw", family, ws, ws["sft"], "none", out, 1), root,
                  NPROC_PER_NODE=2, **env))
    ck = _only(out / "checkpoint")
    if kind == "evaluate":
        res = _dsw_dlc_evaluate(ws, family, f"eval_{family}", ws["sft"], ck, tp=1)
        assert res["samples"] == 8
    else:
        _dsw_dlc_generation(ws, family, f"gen_{family}", ck, tp=2)


def _tutorial_pair(ws, script, name, step, loss, v):
    """A step-1/step-2 tutorial script, dsw (2 processes) vs 2 nodes; -> the dsw checkpoint."""
    root = ws["root"]
    run_pair(lambda env: ([os.path.join(RLHF, script)],
                          dict(v, ENV=env, OUTPUT_DIR=root / f"{name}_{env}")), root)
    return _assert_finetune_same({env: root / f"{name}_{env}" / step for env in ("dsw", "dlc")},
                                 loss, 2)


@pytest.fixture(scope="module")
def tutorials(family_tokenizers):
    """step1_sft/llama2_sft.sh and bloom_sft.sh from scratch, then bloom_reward.sh from the bloom
    SFT checkpoint, each dsw vs 2 nodes at DP=2 (the distributed optimizer: the tutorials'
    default); -> the bloom SFT and reward checkpoints of the dsw runs."""
    ws = family_tokenizers
    base = dict(MODEL_SIZE="tiny", LOAD_PATH="none", DATASET_PATH=ws["sft"], SEQ_LEN=128,
                BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, EPOCHS=1, AC="none", DO="true", FL="false")
    _tutorial_pair(ws, "step1_sft/llama2_sft.sh", "tut_llama", "step1_sft", "lm_loss",
                   dict(base, TOKENIZER_MODEL=ws["tok"]))
    sft = _tutorial_pair(ws, "step1_sft/bloom_sft.sh", "tut_bloom", "step1_sft", "lm_loss",
                         dict(base, TOKENIZER_PATH=ws["tok"]))
    rm = _tutorial_pair(ws, "step2_reward/bloom_reward.sh", "tut_bloom_rm", "step2_reward",
                        "rm_loss", dict(base, TOKENIZER_PATH=ws["tok"], LOAD_PATH=sft,
                                        MODEL_SIZE="auto", DATASET_PATH=ws["reward"]))
    return {"bloom_sft": sft, "bloom_rm": rm}


@pytest.mark.slow
def test_tutorial_sft_and_reward_scripts_dlc_equal_dsw(tutorials):
    meta = json.load(open(os.path.join(tutorials["bloom_rm"], "megatron_patch.json")))
    assert meta["family"] == "bloom" and meta["reward_model"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP3)
def test_step3_scripts_dlc_equal_dsw(ws, pretrain, reward, tutorials, name):
    """The step-3 PPO tutorial scripts with the example configs (sizes overridden to tiny; the
    configs' own 1024 + 512 prompt and response tokens), dsw "0,1" vs DEVICES "0" on 2 nodes."""
    root = ws["root"]
    if name.startswith("bloom/"):
        models = dict(POLICY_LOAD=tutorials["bloom_sft"], REWARD_LOAD=tutorials["bloom_rm"],
                      VOCAB_FILE=ws["tok"])
    else:
        models = dict(POLICY_LOAD=pretrain["dsw"], REWARD_LOAD=_only(reward["dsw"] / "checkpoint"),
                      TOKENIZER_MODEL=ws["tok"])
    v = dict(models, DATASET_PATH=ws["prompts"], MODEL_SIZE="auto", TP=1, PP=1,
             GENERATION_BATCH_SIZE=2, TRAIN_MICRO_BATCH_SIZE=1, TRAIN_GLOBAL_BATCH_SIZE=2,
             SAMPLE_PER_EPISODE=4, NUM_PPO_EPISODE=1, exp_name="s3")
    script = os.path.join(RLHF, "step3_rlhf", "run_scripts", name)
    tag = name.replace("/", "_").replace(".sh", "")
    run_pair(lambda env: ([script, "0,1" if env == "dsw" else "0"],
                          dict(v, ENV=env, OUTPUT_DIR=root / f"{tag}_{env}")), root)
    d = {k: root / f"{tag}_{k}" / "step3_rlhf" / "s3" for k in ("dsw", "dlc")}
    recs = _records(os.path.join(d["dlc"], "log", "metrics.jsonl"))
    assert [r["iteration"] for r in recs] == [1]
    assert _records(os.path.join(d["dsw"], "log", "metrics.jsonl")) == recs
    for role in ("ppo_policy", "ppo_value"):
        assert_same_checkpoint(os.path.join(d["dsw"], role), os.path.join(d["dlc"], role))
