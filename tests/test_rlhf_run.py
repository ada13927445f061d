"""RLHF from the YAML configs: ``python -m megatron_patch.rlhf.run`` and the launch scripts, on CPU.

A tiny LLaMA policy (BPE trained here on chatterbot dialogs) and a tiny reward model trained from it
for a few iterations on {prompt, chosen, rejected} pairs (``finetune --task reward``):
- the llama2 tutorial script ``run_7b_7b.sh`` at tiny scale (env overrides of the real example
  configs): one metrics record per episode with reward/KL/losses, the ppo_policy and ppo_value
  checkpoints; the policy checkpoint generates through ``run_text_generation_megatron_llama.sh``
  and converts to HF (``transformers`` loads it); the same command with one more episode resumes;
- GRPO through a YAML folder (rule-based ``reward_function``, no value roles);
- bad configurations: one ``error:`` line and exit 2 before any model is built (in-process for
  speed, and once through the script);
- ``ppo_config_from``: which file wins, defaults shared with the CLI.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from megatron_patch.launch import launch_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2 = os.path.join(ROOT, "examples", "rlhf", "configs", "llama2")
STEP3 = os.path.join(ROOT, "examples", "rlhf", "step3_rlhf", "run_scripts")
RUN_RLHF = os.path.join(ROOT, "examples", "rlhf", "run_rlhf.sh")
# variables the configs and scripts read: the tests set what they need, nothing leaks in
SCRIPT_ENV = ["POLICY_LOAD", "REWARD_LOAD", "REWARD_LOAD_ITERATION", "TOKENIZER_MODEL",
              "VOCAB_FILE", "DATASET_PATH", "exp_name", "OUTPUT_DIR", "TP", "PP", "NUM_DEVICE",
              "MODEL_SIZE", "SEQ_LEN", "BF16", "GENERATION_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE",
              "TRAIN_GLOBAL_BATCH_SIZE", "NUM_PPO_EPISODE", "SAMPLE_PER_EPISODE",
              "SAVE_EPISODE_INTERVAL", "CONFIG_DIR", "ENV", "NPROC_PER_NODE", "MEGATRON_PATH",
              "MEGATRON_PATCH_PATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "EXTRA_ARGS"]
TINY = dict(MODEL_SIZE="auto", TP="1", GENERATION_BATCH_SIZE="2", TRAIN_MICRO_BATCH_SIZE="1",
            TRAIN_GLOBAL_BATCH_SIZE="2", SAMPLE_PER_EPISODE="2", NUM_PPO_EPISODE="2")


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("rlhf_run"))
    pairs = [(q, a) for q, a in chatterbot_dialogs("english") if len(q) + len(a) < 100]
    random.Random(0).shuffle(pairs)
    tok = train_bpe_folder(os.path.join(tmp, "tok"), [q + " " + a for q, a in pairs] +
                           [(q + " " + a).upper() for q, a in pairs], vocab_size=1000)
    prompts = _write(os.path.join(tmp, "prompts.jsonl"), [{"prompt": q} for q, _ in pairs[:64]])
    rm_data = _write(os.path.join(tmp, "rm.jsonl"), [
        {"prompt": f"Human: {q}\n\nAssistant: ", "chosen": a, "rejected": a.upper()}
        for q, a in pairs[64:128] if a.upper() != a])
    init, rm = os.path.join(tmp, "sft"), os.path.join(tmp, "rm")
    launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model", tok,
                  "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", "0", "--save", init], 1)
    launch_local(["-m", "megatron_patch.training.finetune", "--task", "reward",
                  "--tokenizer-model", tok, "--seq-length", "64", "--lr", "1e-3",
                  "--train-data", rm_data, "--train-iters", "3", "--micro-batch-size", "4",
                  "--global-batch-size", "4", "--pretrained-checkpoint", init, "--save", rm,
                  "--seed", "5"], 1)
    assert json.load(open(os.path.join(rm, "megatron_patch.json")))["reward_model"] is True
    return dict(tmp=tmp, tok=tok, prompts=prompts, init=init, rm=rm)


def _vars(ws, **extra):
    v = dict(POLICY_LOAD=ws["init"], REWARD_LOAD=ws["rm"], TOKENIZER_MODEL=ws["tok"],
             DATASET_PATH=ws["prompts"], OUTPUT_DIR=os.path.join(ws["tmp"], "output"))
    v.update(extra)
    return v


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", MEGATRON_PATCH_DEVICE="cpu")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.path.join(HERE, "workers") + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _bash(script, *args, cwd, **env):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(**env), timeout=600)


def _episodes(path):
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            assert rec["iteration"] not in out, "one record per episode"
            out[rec["iteration"]] = rec
    return [out[k] for k in sorted(out)]


def _tracker(ckpt):
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


def test_ppo_through_the_llama2_tutorial_script(ws):
    env = dict(_vars(ws, exp_name="tiny_ppo"), **TINY)
    r = _bash(os.path.join(STEP3, "llama2", "run_7b_7b.sh"), "0", cwd=ws["tmp"], **env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = os.path.join(ws["tmp"], "output", "step3_rlhf", "tiny_ppo")
    episodes = _episodes(os.path.join(out, "log", "metrics.jsonl"))
    assert [e["iteration"] for e in episodes] == [1, 2]
    for e in episodes:
        for k in ("reward_mean", "kl", "policy_loss", "value_loss", "response_length"):
            assert isinstance(e[k], float) and e[k] == e[k], (k, e)
    assert episodes[0]["kl"] == 0.0  # the policy starts as the reference
    assert 0 < episodes[0]["response_length"] <= 512  # the config's max_new_tokens
    assert _tracker(os.path.join(out, "ppo_policy")) == "2"
    assert _tracker(os.path.join(out, "ppo_value")) == "2"
    assert json.load(open(os.path.join(out, "ppo_value", "megatron_patch.json")))["reward_model"]
    assert json.load(open(os.path.join(out, "rlhf_state.json")))["episode"] == 2
    assert "episode     2/    2" in open(os.path.join(out, "log", "console.log")).read()
    ws["ppo_out"] = out

    # the trained policy generates through the generation script ...
    inp = os.path.join(ws["tmp"], "gen_in.txt")
    with open(inp, "w") as f:
        f.write("Hello, how are you?\nWhat is your name?\n")
    gen_out = os.path.join(ws["tmp"], "gen_out.txt")
    g = _bash(os.path.join(ROOT, "examples", "llama", "run_text_generation_megatron_llama.sh"),
              "dsw", "-", "-", "-", os.path.join(out, "ppo_policy"), "auto", "1", "2", "64", "1",
              "0", "8", inp, gen_out, "0", "1.0", "1.0", cwd=ws["tmp"])
    assert g.returncode == 0, g.stdout[-3000:] + g.stderr[-3000:]
    lines = open(gen_out).read().split("\n")
    assert len([x for x in lines[:2]]) == 2 and lines[2:] in ([], [""]), lines

    # ... and converts to HF
    import torch
    import transformers

    from megatron_patch.convert import engine

    hf = os.path.join(ws["tmp"], "policy_hf")
    engine.megatron_to_hf(os.path.join(out, "ppo_policy"), hf, log=lambda *a: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, 1000) and torch.isfinite(logits).all()

    # the same command with one more episode resumes at episode 3
    env["NUM_PPO_EPISODE"] = "3"
    r = _bash(os.path.join(STEP3, "llama2", "run_7b_7b.sh"), "0", cwd=ws["tmp"], **env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    again = _episodes(os.path.join(out, "log", "metrics.jsonl"))
    assert [e["iteration"] for e in again] == [1, 2, 3]
    assert again[:2] == episodes
    assert _tracker(os.path.join(out, "ppo_policy")) == "3"


def _folder(path, main: dict, files: dict) -> str:
    """A config folder: rlhf.yaml (``main``) and model files ({name: mapping})."""
    os.makedirs(path, exist_ok=True)
    for name, data in {"rlhf.yaml": main, **files}.items():
        with open(os.path.join(path, name), "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
    return path


def _grpo_run(ws, name, nproc=1, ppo_policy=None):
    """GRPO with the rule reward through a YAML folder of three roles (ppo_policy, its inference
    twin policy, reference) including the llama2 example files; ``ppo_policy``: keys for its
    file. Returns (the script's result, the run's output folder)."""
    tiny = {"reward_function": "rlhf_rewards:low_ids", "num_samples_per_prompt": 2,
            "max_new_tokens": 12, "max_prompt_length": 24}
    files = {f"{n}.yaml": {"includes": [os.path.join(LLAMA2, f"{src}.yaml"), "tiny.yaml"], **extra}
             for n, src, extra in (("ppo_policy", "ppo_policy", ppo_policy or {}),
                                   ("policy", "policy_inference", {}),
                                   ("reference", "reference", {}))}
    main = {"models": {"ppo_policy": {"model_config_file": "ppo_policy.yaml", "trainable": True,
                                      "num_device": nproc},
                       "policy": {"model_config_file": "policy.yaml", "num_device": nproc},
                       "reference": {"model_config_file": "reference.yaml", "num_device": nproc}},
            "rlhf": {"algorithm": "grpo", "colocation": ["ppo_policy", "policy", "reference"],
                     "generation_batch_size": 4, "train_micro_batch_size": 2,
                     "train_global_batch_size": 4, "sample_per_episode": 8, "num_ppo_episode": 2,
                     "data_path": "${DATASET_PATH}",
                     "output_dir": "${OUTPUT_DIR}/step3_rlhf/${exp_name}"}}
    cfg = _folder(os.path.join(ws["tmp"], f"{name}_cfg"), main, dict(files, **{"tiny.yaml": tiny}))
    r = _bash(RUN_RLHF, ",".join(str(d) for d in range(nproc)), cwd=ws["tmp"], CONFIG_DIR=cfg,
              TP="1", MODEL_SIZE="auto", **_vars(ws, exp_name=name, NUM_DEVICE=str(nproc)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r, os.path.join(ws["tmp"], "output", "step3_rlhf", name)


def test_grpo_through_a_yaml_folder(ws):
    r, out = _grpo_run(ws, "tiny_grpo")
    assert "warning: " not in r.stdout + r.stderr, r.stderr  # every file agrees
    episodes = _episodes(os.path.join(out, "log", "metrics.jsonl"))
    assert [e["iteration"] for e in episodes] == [1, 2]
    for e in episodes:
        assert "value_loss" not in e and "ref_kl" in e
        assert 0 < e["response_length"] <= 12
        assert 0 <= e["reward_mean"] <= 1  # low_ids: a share of the tokens
    assert _tracker(os.path.join(out, "ppo_policy")) == "2"
    assert not os.path.exists(os.path.join(out, "ppo_value"))


def test_generation_twin_in_its_own_layout_through_yaml(ws):
    """ppo_policy trained at TP=2 on 2 processes while its inference twin (policy) generates at
    TP=1 in 2 data-parallel replicas: the trained weights are resharded into the twin after every
    episode (time_weight_sync_s)."""
    r, out = _grpo_run(ws, "tiny_twin", nproc=2, ppo_policy={"tensor_model_parallel_size": 2})
    assert "TP=2 PP=1" in r.stdout + r.stderr and "generation: llama, frozen, TP=1" in \
        r.stdout + r.stderr, r.stdout[-3000:]
    episodes = _episodes(os.path.join(out, "log", "metrics.jsonl"))
    assert [e["iteration"] for e in episodes] == [1, 2]
    assert all(e["time_weight_sync_s"] > 0 and 0 <= e["reward_mean"] <= 1 for e in episodes)
    meta = json.load(open(os.path.join(out, "ppo_policy", "megatron_patch.json")))
    assert meta["tensor_model_parallel_size"] == 2


# ------------------------------------------------------------------------- bad configurations


@pytest.fixture
def bad_rewards(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(
        "def boom(prompts, responses, response_ids=None):\n"
        "    raise KeyError('needs a reference answer')\n\n"
        "def scalar(prompts, responses, response_ids=None):\n"
        "    return 0.5\n\n"
        "def words(prompts, responses, response_ids=None):\n"
        "    return ['high' for _ in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def _override(tmp, role, src, **keys):
    """A model file that includes the example's and sets keys."""
    name = f"{role}_override.yaml"
    with open(os.path.join(tmp, name), "w") as f:
        yaml.safe_dump({"includes": [os.path.join(LLAMA2, src)], **keys}, f)
    return name


BAD = {
    "missing model file": ({"models": {"reference": {"model_config_file": "nope.yaml"}}}, {},
                           "model_config_file", "does not exist"),
    "colocated device counts": ({"models": {"policy": {"num_device": 2}}}, {},
                                "incompatible device counts", "policy: 2"),
    "num_device vs processes": ({}, {"NUM_DEVICE": "8"}, "num_device is 8",
                                "this job has 1 process"),
    "reward function import": (("ppo_policy", "ppo_policy.yaml",
                                {"reward_function": "no_such_module_xyz:score"}), {},
                               "no_such_module_xyz:score cannot be imported",
                               "No module named 'no_such_module_xyz'"),
    "reward function raises": (("ppo_policy", "ppo_policy.yaml",
                                {"reward_function": "bad_rewards:boom"}), {},
                               "raised KeyError", "needs a reference answer"),
    "reward function returns a scalar": (("policy", "policy_inference.yaml",
                                          {"reward_function": "bad_rewards:scalar"}), {},
                                         "returned 0.5", "one number per response"),
    "reward function returns words": (("policy", "policy_inference.yaml",
                                       {"reward_function": "bad_rewards:words"}), {},
                                      "returned ['high']", "one number per response"),
    "layout larger than the job": (("reward_ref", "reward_inference.yaml",
                                    {"tensor_model_parallel_size": 2}), {},
                                   "models.reward_ref",
                                   "num_device 1 is not a multiple of TP x PP = 2"),
    "missing checkpoint": ({}, {"POLICY_LOAD": "/nonexistent/sft"}, "/nonexistent/sft",
                           "not a checkpoint folder"),
    "missing load_iteration": ({}, {"REWARD_LOAD_ITERATION": "7"}, "(role reward_ref)",
                               "load_iteration 7", "has no iter_0000007 (it has iter_0000003)"),
    "evaluation interval without prompts": ({"rlhf": {"eval_episode_interval": 2}}, {},
                                            "rlhf.eval_data_path and rlhf.eval_episode_interval "
                                            "go together", "held-out prompts"),
    "missing eval prompts": ({"rlhf": {"eval_episode_interval": 2,
                                       "eval_data_path": "/nonexistent/eval.jsonl"}}, {},
                             "rlhf.eval_data_path", "/nonexistent/eval.jsonl"),
    "missing prompts": ({}, {"DATASET_PATH": "/nonexistent/prompts.jsonl"},
                        "rlhf.data_path", "/nonexistent/prompts.jsonl"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_exit_2_before_building(ws, case, tmp_path, monkeypatch, capsys,
                                                       bad_rewards):
    from megatron_patch.rlhf import run

    change, env, *want = BAD[case]
    main = {"includes": [os.path.join(LLAMA2, "rlhf.yaml")]}
    if isinstance(change, tuple):  # (role, example file, keys): that role reads an override file
        role, src, keys = change
        main["models"] = {role: {"model_config_file": _override(str(tmp_path), role, src, **keys)}}
    else:
        main.update(change)
    with open(tmp_path / "rlhf.yaml", "w") as f:
        yaml.safe_dump(main, f)
    for k in SCRIPT_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in {**_vars(ws, exp_name="bad", NUM_DEVICE="1", TP="1"), **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    assert run.main([str(tmp_path / "rlhf.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and all(w in err[-1] for w in want), err
    assert not any(x.startswith("error") for x in err[:-1]), err
    assert not os.path.exists(tmp_path / "output"), "nothing built, nothing written"


def test_twins_in_their_own_layouts_reach_the_trainer(ws, tmp_path, monkeypatch):
    """policy (generation) and reward_forward (values) in layouts of their own: the plan hands the
    trainer both twins' arguments (the trainer side: test_rlhf.py's per-role layouts test), and the
    per-model offload keys for the trainer roles they map to."""
    from megatron_patch.rlhf import run

    main = {"includes": [os.path.join(LLAMA2, "rlhf.yaml")], "models": {
        role: {"model_config_file": _override(str(tmp_path), role, src,
                                              tensor_model_parallel_size=2)}
        for role, src in (("policy", "policy_inference.yaml"),
                          ("reward_forward", "value_inference.yaml"))}}
    # ChatLearn's per-model memory keys, each for the trainer role that the YAML role becomes
    main["models"]["policy"]["offload_weights"] = True  # -> the generation twin
    main["models"]["reward_forward"]["free_memory"] = True  # -> the value twin
    main["models"]["reference"] = {"offload_weights": True}
    main["models"]["reward_train"] = {"free_memory": True}
    with open(tmp_path / "rlhf.yaml", "w") as f:
        yaml.safe_dump(main, f)
    for k in SCRIPT_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in _vars(ws, exp_name="twins", NUM_DEVICE="2", TP="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    plan = run.prepare(str(tmp_path / "rlhf.yaml"), 2, lambda m: None)
    try:
        a = plan.args
        assert a["policy"].tensor_model_parallel_size == a["value"].tensor_model_parallel_size == 1
        assert a["generation"].tensor_model_parallel_size == 2
        assert a["value_forward"].tensor_model_parallel_size == 2
        assert a["generation"].load == a["policy"].load
        assert plan.offload == {"generation": "weights", "value_forward": "all",
                                "reference": "weights", "value": "all"}
    finally:
        plan.cleanup()


def test_batches_that_do_not_split_over_a_role_are_refused_before_building(ws, tmp_path,
                                                                           monkeypatch):
    """The policy at TP=2 (one replica) beside a reward model at TP=1 (two replicas on 2
    processes): 3 samples an episode cannot be split between the reward model's replicas. The
    pre-flight says so (the trainer used to find out after loading policy and reference)."""
    from megatron_patch.rlhf import run

    main = {"includes": [os.path.join(LLAMA2, "rlhf.yaml")], "models": {
        role: {"model_config_file": _override(str(tmp_path), role, src,
                                              tensor_model_parallel_size=2)}
        for role, src in (("ppo_policy", "ppo_policy.yaml"), ("policy", "policy_inference.yaml"),
                          ("reference", "reference.yaml"))}}
    with open(tmp_path / "rlhf.yaml", "w") as f:
        yaml.safe_dump(main, f)
    for k in SCRIPT_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in _vars(ws, exp_name="split", NUM_DEVICE="2", TP="1", GENERATION_BATCH_SIZE="1",
                      TRAIN_MICRO_BATCH_SIZE="1", TRAIN_GLOBAL_BATCH_SIZE="3",
                      SAMPLE_PER_EPISODE="3").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(run.RLHFConfigError) as e:
        run.prepare(str(tmp_path / "rlhf.yaml"), 2, lambda m: None)
    assert str(e.value).startswith(f"{tmp_path / 'rlhf.yaml'}: rlhf: sample_per_episode 3 must "
                                   "split into the 2 data-parallel replicas of the reward role")
    monkeypatch.setenv("SAMPLE_PER_EPISODE", "6")  # 6 splits, a step of 3 on 2 value replicas not
    with pytest.raises(run.RLHFConfigError) as e:
        run.prepare(str(tmp_path / "rlhf.yaml"), 2, lambda m: None)
    assert "train_global_batch_size 3 must be a multiple of train_micro_batch_size x the value " \
           "role's data-parallel size (1 x 2" in str(e.value)
    monkeypatch.setenv("TRAIN_GLOBAL_BATCH_SIZE", "6")
    run.prepare(str(tmp_path / "rlhf.yaml"), 2, lambda m: None).cleanup()


def test_bad_config_through_the_script_and_usage(ws, tmp_path):
    script = os.path.join(STEP3, "llama2", "run_7b_7b.sh")
    env = dict(_vars(ws, exp_name="bad"), **TINY)
    r = _bash(script, "0", cwd=str(tmp_path), **dict(env, POLICY_LOAD=str(tmp_path / "none")))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "not a checkpoint folder" in r.stderr and "torchrun" not in r.stdout + r.stderr
    assert not os.path.exists(tmp_path / "output")
    for var in ("POLICY_LOAD", "REWARD_LOAD", "TOKENIZER_MODEL", "DATASET_PATH", "exp_name"):
        r = _bash(script, cwd=str(tmp_path), **{k: v for k, v in env.items() if k != var})
        assert r.returncode == 2 and r.stderr.strip() == \
            f"error: {var} is not set (run with -h for the variables)", r.stderr
    r = _bash(os.path.join(STEP3, "bloom", "run_7b1_7b1.sh"), cwd=str(tmp_path), **env)
    assert r.returncode == 2 and "VOCAB_FILE is not set" in r.stderr
    for s in ("llama2/run_7b_7b.sh", "llama2/run_13b_13b.sh", "llama2/run_70b_70b.sh",
              "bloom/run_7b1_7b1.sh"):
        r = _bash(os.path.join(STEP3, s), "-h", cwd=str(tmp_path))
        assert r.returncode == 2 and "usage:" in r.stdout and "exp_name" in r.stdout
        r = _bash(os.path.join(STEP3, s), "0", "1", cwd=str(tmp_path), **env)
        assert r.returncode == 2 and "at most 1 argument" in r.stderr
    # NUM_DEVICE (every role's num_device) other than the processes started: the pre-flight
    # checks the real process count, before torchrun
    r = _bash(RUN_RLHF, "0", LLAMA2, cwd=str(tmp_path), **dict(env, NUM_DEVICE="8"))
    assert r.returncode == 2 and "num_device is 8 but this job has 1 process" in r.stderr, r.stderr
    assert "torchrun" not in r.stdout + r.stderr and not os.path.exists(tmp_path / "output")
    for args in ((), ("-h",), ("0", "x", "y"), ("gpu0",), ("0", str(tmp_path)),
                 ("0,1,0", LLAMA2)):
        r = _bash(RUN_RLHF, *args, cwd=str(tmp_path))
        assert r.returncode == 2, (args, r.stderr)
        assert "usage:" in r.stdout + r.stderr or "error: " in r.stderr, (args, r.stderr)


# ----------------------------------------------------------------------------- settings source


def test_ppo_config_from_the_example_and_cli_defaults(ws):
    from megatron_patch.rlhf.config import RLHFSettings, RoleRLHFKeys, load_config
    from megatron_patch.rlhf.trainer import PPOConfig, build_cli, ppo_config_from

    env = _vars(ws, exp_name="x", SEQ_LEN="2048")
    cfg = load_config(os.path.join(LLAMA2, "rlhf.yaml"), env=env)
    notes = []
    ppo = ppo_config_from(cfg, notes.append)
    assert notes == []
    assert (ppo.algorithm, ppo.num_episodes, ppo.sample_per_episode) == ("ppo", 10, 64)
    assert (ppo.max_new_tokens, ppo.max_prompt_length, ppo.top_p) == (512, 1024, 0.9)
    assert (ppo.init_kl_coef, ppo.save_episode_interval, ppo.data_shuffle) == (0.02, 5, True)
    # the policy role (generation) wins for temperature, the value model for clip_range_value
    files = {"policy_inference.yaml": {"temperature": 0.7},
             "ppo_value.yaml": {"clip_range_value": 0.5}, "ppo_policy.yaml": {"gamma": 0.9}}
    roles = {"ppo_policy": "ppo_policy.yaml", "policy": "policy_inference.yaml",
             "reference": "reference.yaml", "reward_train": "ppo_value.yaml",
             "reward_forward": "value_inference.yaml", "reward_ref": "reward_inference.yaml"}
    d = _folder(os.path.join(ws["tmp"], "owners"), {
        "includes": [os.path.join(LLAMA2, "rlhf.yaml")],
        "models": {r: {"model_config_file": f} for r, f in roles.items()}},
        {f: {"includes": [os.path.join(LLAMA2, f)], **files.get(f, {})} for f in roles.values()})
    notes = []
    ppo = ppo_config_from(load_config(os.path.join(d, "rlhf.yaml"), env=env), notes.append)
    assert (ppo.temperature, ppo.clip_range_value, ppo.gamma) == (0.7, 0.5, 0.9)
    assert notes == []  # the other files do not set these keys themselves
    with open(os.path.join(d, "reference.yaml"), "a") as f:
        f.write("temperature: 0.3\n")
    ppo = ppo_config_from(load_config(os.path.join(d, "rlhf.yaml"), env=env), notes.append)
    assert ppo.temperature == 0.7 and len(notes) == 1 and "reference.yaml: temperature" in notes[0]
    # one source of defaults: the CLI's are the YAML schema's
    cli = build_cli().parse_args(["--policy", "p", "--prompts", "x"])
    s, k = RLHFSettings(), RoleRLHFKeys()
    assert cli.num_episodes == s.num_ppo_episode and cli.top_p == k.top_p
    assert cli.init_kl_coef == k.init_kl_coef == PPOConfig().init_kl_coef
    assert cli.num_samples_per_prompt == k.num_samples_per_prompt
    assert isinstance(PPOConfig().kl_horizon, float)


def test_load_iteration_reads_that_iteration(tmp_path):
    """load_iteration other than the tracker's: a folder of links whose tracker names it."""
    from megatron_patch.rlhf.config import RoleConfig
    from megatron_patch.rlhf.run import Plan, _checkpoint

    src = tmp_path / "rm"
    for it in (1, 3):
        (src / f"iter_{it:07d}" / "mp_rank_00").mkdir(parents=True)
        (src / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt").write_text(str(it))
    (src / "latest_checkpointed_iteration.txt").write_text("3")
    (src / "megatron_patch.json").write_text("{}")
    role = RoleConfig("reward_ref", "reward.yaml", values={"load_iteration": 1})
    args, views = type("A", (), {"load": str(src), "pretrained_checkpoint": None})(), []
    _checkpoint(role, args, views)
    assert views == [args.load] and args.load != str(src)
    assert open(os.path.join(args.load, "latest_checkpointed_iteration.txt")).read() == "1"
    assert open(os.path.join(args.load, "iter_0000001/mp_rank_00/model_optim_rng.pt")).read() == "1"
    assert os.path.isfile(os.path.join(args.load, "megatron_patch.json"))
    assert (src / "latest_checkpointed_iteration.txt").read_text() == "3"  # the source untouched
    role.values["load_iteration"] = 3  # the latest: the folder itself
    args.load = str(src)
    _checkpoint(role, args, views)
    assert args.load == str(src) and len(views) == 1
    Plan.cleanup(type("P", (), {"views": views})())
    assert not os.path.exists(views[0])
