"""megatron_patch.rlhf.config: ChatLearn-style RLHF YAML (main file + per-model files).

Fast: YAML files in tmp_path, no model is built (the Megatron keys are parsed by the fine-tuning
entry point's argparse parser only).
"""
import os
import textwrap
from pathlib import Path

import pytest

from megatron_patch.rlhf.config import (IGNORED_MODEL_KEYS, RLHF_KEYS, ROLES, RLHFConfigError,
                                        RLHFSettings, RoleConfig, load_config, megatron_keys,
                                        megatron_parser)

ROOT = Path(__file__).resolve().parents[1]

MAIN = """\
runtime_env:
  platform: DLC
  excludes: ["*pt", logs]
models:
  ppo_policy:
    model_config_file: ppo_policy.yaml
    num_device: 4
    gpu_per_process: 1
    trainable: true
  policy:
    model_config_file: policy_inference.yaml
    num_device: 4
    trainable: false
  reference:
    model_config_file: reference.yaml
    num_device: 4
  reward_train:
    model_config_file: ppo_value.yaml
    num_device: 4
    trainable: true
  reward_forward:
    model_config_file: value_inference.yaml
    num_device: 4
  reward_ref:
    model_config_file: reward_inference.yaml
    num_device: 4
    return_rlhf_data: true
rlhf:
  algorithm: ppo
  colocation: [ppo_policy, policy, reference, reward_train, reward_forward, reward_ref]
  generation_batch_size: 8
  train_micro_batch_size: 4
  train_global_batch_size: 8
  num_ppo_episode: 10
  sample_per_episode: 64
  num_training_epoch: 1
  save_episode_interval: 5
  data_path: /data/prompts.jsonl
"""
BASE = """\
model_family: llama
model_size: tiny
num_layers: 2
tensor_model_parallel_size: 2
seq_length: 256
bf16: true
tokenizer_model: /tok/tokenizer.model
max_new_tokens: 64
position_embedding_type: rope   # an ignored ChatLearn key
"""
MODELS = {
    "ppo_policy.yaml": "includes: [base.yaml]\nload: /ckpt/sft\nsave: /out/policy\nlr: 1e-5\n"
                       "min_lr: 1.0e-6\nclip_range: 0.1\ntemperature: 0.7\n",
    "policy_inference.yaml": "includes: [base.yaml]\nload: /ckpt/sft\ntop_p: 0.9\n",
    "reference.yaml": "includes: [base.yaml]\nload: /ckpt/sft\n",
    "ppo_value.yaml": "includes: [base.yaml]\nload: /ckpt/rm\nlr: 5.0e-6\nclip_range_value: 0.5\n",
    "value_inference.yaml": "includes: [base.yaml]\nload: /ckpt/rm\n",
    "reward_inference.yaml": "includes: [base.yaml]\nload: /ckpt/rm\nload_iteration: 3\n",
}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def make(tmp_path: Path, main: str = MAIN, **files) -> Path:
    """A config folder: MAIN, base.yaml and the per-model files, some replaced by ``files``
    (keys with '.' written as '_', e.g. ppo_policy_yaml=...; None deletes the file)."""
    contents = {"base.yaml": BASE, **MODELS}
    contents.update({k.replace("_yaml", ".yaml"): v for k, v in files.items()})
    for name, text in contents.items():
        if text is not None:
            write(tmp_path, name, text)
    return write(tmp_path, "rlhf.yaml", main)


def error(path, env=None) -> str:
    with pytest.raises(RLHFConfigError) as e:
        load_config(str(path), env=env or {})
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_full_example_round_trip(tmp_path):
    path = make(tmp_path)
    cfg = load_config(str(path), env={})
    assert cfg.path == str(path)
    assert cfg.runtime_env == {"platform": "DLC", "excludes": ["*pt", "logs"]}
    assert cfg.rlhf == RLHFSettings(algorithm="ppo", colocation=[list(ROLES)],
                                    generation_batch_size=8, train_micro_batch_size=4,
                                    train_global_batch_size=8, num_ppo_episode=10,
                                    sample_per_episode=64, num_training_epoch=1,
                                    save_episode_interval=5, data_path="/data/prompts.jsonl")
    assert list(cfg.models) == list(ROLES)
    pol = cfg.models["ppo_policy"]
    assert isinstance(pol, RoleConfig)
    assert pol.model_config_file == str(tmp_path / "ppo_policy.yaml")
    assert (pol.num_device, pol.gpu_per_process, pol.trainable) == (4, 1, True)
    assert [m.trainable for m in cfg.models.values()] == [True, False, False, True, False, False]
    assert cfg.models["reward_ref"].return_rlhf_data and not pol.return_rlhf_data
    assert pol.values["num_layers"] == 2 and pol.values["load"] == "/ckpt/sft"  # merged
    assert cfg.models["reward_train"].values["load"] == "/ckpt/rm"
    # RLHF keys: the file's values, defaults for the rest
    rl = pol.rlhf_values()
    assert set(rl) == set(RLHF_KEYS)
    assert (rl["clip_range"], rl["temperature"], rl["max_new_tokens"]) == (0.1, 0.7, 64)
    assert (rl["kl_kind"], rl["gamma"], rl["lam"], rl["load_iteration"]) == ("k1", 1.0, 0.95, None)
    assert cfg.models["reward_ref"].rlhf_values()["load_iteration"] == 3
    assert cfg.models["reward_train"].rlhf_values()["clip_range_value"] == 0.5


def test_megatron_args_types_and_parser_defaults(tmp_path):
    cfg = load_config(str(make(tmp_path)), env={})
    args = cfg.models["ppo_policy"].megatron_args()
    assert args.tensor_model_parallel_size == 2 and args.pipeline_model_parallel_size == 1
    assert args.lr == 1e-5 and isinstance(args.lr, float) and args.min_lr == 1e-6
    assert args.bf16 is True and args.fp16 is False
    assert (args.num_layers, args.seq_length, args.model_family, args.model_size) == \
        (2, 256, "llama", "tiny")
    assert (args.load, args.save, args.tokenizer_model) == ("/ckpt/sft", "/out/policy",
                                                            "/tok/tokenizer.model")
    given = {"tensor_model_parallel_size", "lr", "min_lr", "bf16", "num_layers", "seq_length",
             "model_family", "model_size", "load", "save", "tokenizer_model"}
    defaults = vars(megatron_parser().parse_args([]))
    assert defaults["eval_interval"] is None and defaults["task"] == "sft"  # the finetune parser
    for key, value in vars(args).items():
        if key not in given:
            assert value == defaults[key], key
    assert not hasattr(args, "max_new_tokens") and not hasattr(args, "position_embedding_type")
    assert cfg.models["policy"].megatron_args().lr == defaults["lr"]
    # extra overrides the file; lists become nargs; false leaves a flag off
    args = cfg.models["ppo_policy"].megatron_args(
        {"lr": 2e-6, "micro_batch_size": 4, "data_path": ["0.5", "/a", "0.5", "/b"],
         "train_data": "/t.jsonl", "bf16": False, "use_distributed_optimizer": True})
    assert (args.lr, args.micro_batch_size, args.bf16, args.use_distributed_optimizer) == \
        (2e-6, 4, False, True)
    assert args.data_path == ["0.5", "/a", "0.5", "/b"] and args.train_data == ["/t.jsonl"]
    with pytest.raises(RLHFConfigError,
                       match="unknown key 'micro_batch_sizes'.*did you mean 'micro_batch_size'"):
        cfg.models["ppo_policy"].megatron_args({"micro_batch_sizes": 1})


def test_allowed_keys_are_the_parser_dests():
    keys = set(megatron_keys())
    assert {"tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "load",
            "save", "bf16", "seq_length", "tokenizer_model", "model_family", "model_size", "lr",
            "min_lr", "clip_grad", "task", "train_data", "epochs", "packing"} <= keys
    assert "help" not in keys and "position_embedding_type" not in keys
    assert not keys & set(RLHF_KEYS) and not keys & IGNORED_MODEL_KEYS
    assert not set(RLHF_KEYS) & IGNORED_MODEL_KEYS


def test_env_substitution(tmp_path):
    base = BASE.replace("tensor_model_parallel_size: 2", "tensor_model_parallel_size: ${TP:2}")
    base = base.replace("tokenizer_model: /tok/tokenizer.model",
                        "tokenizer_model: ${TOK_DIR:/tok}/tokenizer-${TOK_NAME}.model")
    base += "pipeline_model_parallel_size: ${PP}\nsave: ${SAVE:}\nbf16: ${BF16:true}\n"
    path = make(tmp_path, base_yaml=base,
                main=MAIN.replace("data_path: /data/prompts.jsonl", "data_path: ${DATASET_PATH}")
                .replace("generation_batch_size: 8", "generation_batch_size: ${GBS:8}"))
    env = {"TOK_NAME": "llama", "PP": "1", "DATASET_PATH": "/d/p.jsonl"}
    cfg = load_config(str(path), env=env)
    ref = cfg.models["reference"]
    assert ref.values["tensor_model_parallel_size"] == 2  # the default, parsed as int
    assert ref.values["pipeline_model_parallel_size"] == 1  # the variable, parsed as int
    assert ref.values["tokenizer_model"] == "/tok/tokenizer-llama.model"  # inside a string
    assert ref.values["save"] is None and ref.values["bf16"] is True
    assert cfg.rlhf.data_path == "/d/p.jsonl" and cfg.rlhf.generation_batch_size == 8
    cfg = load_config(str(path), env={**env, "TP": "4", "TOK_DIR": "/t2", "GBS": "16",
                                      "BF16": "false", "SAVE": "/s"})
    ref = cfg.models["reference"]
    assert ref.megatron_args().tensor_model_parallel_size == 4
    assert ref.values["tokenizer_model"] == "/t2/tokenizer-llama.model"
    assert ref.megatron_args().bf16 is False and ref.values["save"] == "/s"
    assert cfg.rlhf.generation_batch_size == 16
    msg = error(path, {"PP": "1", "DATASET_PATH": "/d"})
    assert "TOK_NAME" in msg and str(tmp_path / "base.yaml") in msg
    msg = error(path, {"TOK_NAME": "x", "PP": "1"})
    assert "DATASET_PATH" in msg and str(tmp_path / "rlhf.yaml") in msg
    # os.environ is the default
    old = dict(os.environ)
    try:
        os.environ.update(env)
        assert load_config(str(path)).rlhf.data_path == "/d/p.jsonl"
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_substitution_edge_cases(tmp_path):
    """Empty variables take the default (as the shell's ${X:-d}, and the step 1/2 scripts);
    zero-padded numbers are decimal (an iteration copied from iter_0001000), not YAML 1.1
    octal; defaults nest and may hold '}' inside a nested reference; $${ is a literal ${."""
    base = BASE.replace("tensor_model_parallel_size: 2", "tensor_model_parallel_size: ${TP:2}")
    base += "save: ${OUT:/out}/policy\nrun_name: ${NAME:${USER_NAME:anon}}-run\n"
    rw = MODELS["reward_inference.yaml"].replace("load_iteration: 3",
                                                 "load_iteration: ${IT:0000900}")
    path = make(tmp_path, base_yaml=base, reward_inference_yaml=rw)
    cfg = load_config(str(path), env={"TP": "", "OUT": "", "IT": "0001000"})
    ref = cfg.models["reference"]
    assert ref.values["tensor_model_parallel_size"] == 2 and ref.values["save"] == "/out/policy"
    assert cfg.models["reward_ref"].rlhf_values()["load_iteration"] == 1000  # not 512
    assert ref.values["run_name"] == "anon-run"
    cfg = load_config(str(path), env={"USER_NAME": "kim"})
    assert cfg.models["reference"].values["run_name"] == "kim-run"
    assert cfg.models["reward_ref"].rlhf_values()["load_iteration"] == 900  # the default
    assert cfg.models["reference"].values["tensor_model_parallel_size"] == 2
    # plain YAML values follow the same rules
    write(tmp_path, "reference.yaml", "includes: [base.yaml]\nload: /x\nload_iteration: 0000012\n"
                                      "lr: 1e-5\nrun_name: 1:30\n")
    ref = load_config(str(path), env={}).models["reference"]
    assert ref.rlhf_values()["load_iteration"] == 12 and ref.values["lr"] == 1e-5
    assert ref.values["run_name"] == "1:30"  # not sexagesimal 90
    # a whole-value reference is a scalar, never YAML: ' #' is not a comment there
    write(tmp_path, "reference.yaml", "includes: [base.yaml]\nload: ${CKPT}\n"
                                      "run_name: cost $$5 $${HOME}\n")
    ref = load_config(str(path), env={"CKPT": "/a #b"}).models["reference"]
    assert ref.values["load"] == "/a #b" and ref.values["run_name"] == "cost $$5 ${HOME}"
    for text, expected in (("${CKPT", "unterminated ${CKPT"),
                           ("${9X}", "'${' not followed by a variable name"),
                           ("${CKPT:${A}", "unterminated ${CKPT")):
        write(tmp_path, "reference.yaml", f"includes: [base.yaml]\nload: '{text}'\n")
        msg = error(path, {"CKPT": "c", "A": "a"})
        assert msg.startswith(f"{tmp_path / 'reference.yaml'}: load: ") and expected in msg, msg


def test_empty_section_header_and_overridden_variables(tmp_path):
    """An included section survives an empty header over it; a variable named only by a value
    that a later file overrides need not be set; the errors name the file that set the key."""
    write(tmp_path, "inc/main.yaml", MAIN.replace("model_config_file: ", "model_config_file: ../"))
    path = write(tmp_path, "rlhf.yaml", "includes: [inc/main.yaml]\nrlhf:\n  # local\n")
    for name, text in {"base.yaml": BASE.replace("/tok/tokenizer.model", "${TOKENIZER_MODEL}"),
                       **{k: v + "tokenizer_model: /my/tok\n" for k, v in MODELS.items()}}.items():
        write(tmp_path, name, text)
    cfg = load_config(str(path), env={})
    assert cfg.rlhf.num_ppo_episode == 10 and cfg.rlhf.data_path == "/data/prompts.jsonl"
    assert cfg.models["reference"].values["tokenizer_model"] == "/my/tok"
    write(tmp_path, "reference.yaml", MODELS["reference.yaml"])  # base.yaml's value is used now
    msg = error(path)
    assert msg.startswith(f"{tmp_path / 'base.yaml'}: tokenizer_model: ") and \
        "TOKENIZER_MODEL is not set" in msg


def test_null_flag_and_non_utf8(tmp_path):
    path = make(tmp_path, base_yaml=BASE.replace("bf16: true", "bf16: ${BF16:}"))
    assert load_config(str(path), env={}).models["reference"].megatron_args().bf16 is False
    write(tmp_path, "base.yaml", BASE.replace("bf16: true", "bf16: [1]"))
    msg = error(path)
    assert msg.count(str(tmp_path / "ppo_policy.yaml")) == 1  # the prefix once
    (tmp_path / "base.yaml").write_bytes(BASE.encode() + "# \u6ce8\u91ca\n".encode("gbk"))
    msg = error(path)
    assert msg.startswith(f"{tmp_path / 'base.yaml'}: not UTF-8 text"), msg


def test_includes_override_order_nested_and_cycles(tmp_path):
    write(tmp_path, "sub/arch.yaml", "num_layers: 4\nseq_length: 128\nlr: 1.0e-3\n")
    write(tmp_path, "sub/mid.yaml", "includes: [arch.yaml]\nnum_layers: 6\nlr: 2.0e-3\n")
    write(tmp_path, "other.yaml", "lr: 3.0e-3\nclip_grad: 0.5\n")
    path = make(tmp_path, reference_yaml="includes: [base.yaml, sub/mid.yaml, other.yaml]\n"
                                         "clip_grad: 0.25\nload: /x\n")
    args = load_config(str(path), env={}).models["reference"].megatron_args()
    assert args.num_layers == 6  # mid.yaml overrides its include and base.yaml (earlier)
    assert args.seq_length == 128  # nested include (arch.yaml, path relative to mid.yaml)
    assert args.lr == 3e-3  # later include wins
    assert args.clip_grad == 0.25  # the including file wins
    assert args.tensor_model_parallel_size == 2  # from base.yaml
    # a cycle, through a nested include
    write(tmp_path, "sub/arch.yaml", "includes: [../reference.yaml]\nnum_layers: 4\n")
    msg = error(path)
    chain = " -> ".join(str(tmp_path / f) for f in ("reference.yaml", "sub/mid.yaml",
                                                     "sub/arch.yaml", "reference.yaml"))
    assert msg == f"{tmp_path / 'sub' / 'arch.yaml'}: include cycle: {chain}"
    write(tmp_path, "sub/arch.yaml", "includes: [missing.yaml]\n")
    msg = error(path)
    assert msg.startswith(f"{tmp_path / 'sub' / 'arch.yaml'}: included file ")
    assert str(tmp_path / "sub" / "missing.yaml") in msg
    # the main file may include too (mappings merge key by key)
    write(tmp_path, "sub/arch.yaml", "num_layers: 4\n")
    write(tmp_path, "defaults.yaml", "rlhf:\n  num_ppo_episode: 3\n  seed: 7\n")
    cfg = load_config(str(write(tmp_path, "rlhf.yaml", "includes: [defaults.yaml]\n" + MAIN)),
                      env={})
    assert (cfg.rlhf.num_ppo_episode, cfg.rlhf.seed, cfg.rlhf.sample_per_episode) == (10, 7, 64)


def test_unknown_keys_name_key_file_and_suggestion(tmp_path):
    path = make(tmp_path, ppo_policy_yaml=MODELS["ppo_policy.yaml"] + "num_layer: 2\n")
    msg = error(path)
    assert str(tmp_path / "ppo_policy.yaml") in msg
    assert "unknown key 'num_layer'" in msg and "did you mean 'num_layers'" in msg
    path = make(tmp_path, base_yaml=BASE + "kl_coeff: 0.1\n")  # in an included file
    msg = error(path)
    assert str(tmp_path / "base.yaml") in msg and "unknown key 'kl_coeff'" in msg
    path = make(tmp_path, main=MAIN.replace("generation_batch_size", "generaton_batch_size"))
    msg = error(path)
    assert str(tmp_path / "rlhf.yaml") in msg and "unknown key 'rlhf.generaton_batch_size'" in msg
    assert "did you mean 'generation_batch_size'" in msg
    path = make(tmp_path, main=MAIN.replace("  reference:", "  refrence:"))
    msg = error(path)
    assert "unknown role 'models.refrence'" in msg and "did you mean 'reference'" in msg
    path = make(tmp_path, main=MAIN.replace("    num_device: 4\n    trainable: false",
                                            "    num_devices: 4\n    trainable: false", 1))
    assert "'models.policy.num_devices'" in error(path)
    assert "unknown key 'rhlf'" in error(make(tmp_path, main=MAIN.replace("rlhf:", "rhlf:")))


def test_missing_model_file_and_missing_key(tmp_path):
    msg = error(make(tmp_path, reference_yaml=None))
    assert "models.reference" in msg and str(tmp_path / "reference.yaml") in msg
    assert "does not exist" in msg
    msg = error(make(tmp_path, main=MAIN.replace("    model_config_file: reference.yaml\n", "")))
    assert "models.reference: model_config_file is missing" in msg


def test_colocated_device_counts_must_match(tmp_path):
    main = MAIN.replace("model_config_file: policy_inference.yaml\n    num_device: 4",
                        "model_config_file: policy_inference.yaml\n    num_device: 2")
    msg = error(make(tmp_path, main=main))
    assert "colocated roles ppo_policy, policy, reference" in msg
    assert "incompatible device counts" in msg and "policy: 2" in msg and "ppo_policy: 4" in msg
    # in separate groups they may differ
    main2 = main.replace(
        "[ppo_policy, policy, reference, reward_train, reward_forward, reward_ref]",
        "[[policy], [ppo_policy, reference], [reward_train, reward_forward, reward_ref]]")
    assert load_config(str(make(tmp_path, main=main2)), env={}).rlhf.colocation[0] == ["policy"]
    msg = error(make(tmp_path, main=MAIN.replace(
        "[ppo_policy, policy, reference,", "[[ppo_policy, reference], [reference, policy], [")
        .replace("reward_ref]", "reward_ref]]")))
    assert "role 'reference' is listed twice" in msg


@pytest.mark.parametrize("edit, expected", [
    (("trainable: false", "trainable: true"),
     "models.policy: trainable: true on an inference-only"),
    (("    gpu_per_process: 1\n    trainable: true\n", "    gpu_per_process: 1\n"),
     "models.ppo_policy: a trainable role needs trainable: true"),
    (("sample_per_episode: 64", "sample_per_episode: 60"),
     "rlhf.sample_per_episode (60) is not a multiple of rlhf.generation_batch_size (8)"),
    (("train_micro_batch_size: 4", "train_micro_batch_size: 3"),
     "rlhf.train_global_batch_size (8) is not a multiple of rlhf.train_micro_batch_size (3)"),
    (("algorithm: ppo", "algorithm: dpo"), "rlhf.algorithm: must be one of ppo, grpo"),
    (("num_ppo_episode: 10", "num_ppo_episode: ten"), "rlhf.num_ppo_episode: expected int"),
    (("num_ppo_episode: 10", "num_ppo_episode: 0"), "rlhf.num_ppo_episode: must be > 0"),
    (("model_config_file: ppo_policy.yaml\n    num_device: 4",
      "model_config_file: ppo_policy.yaml\n    num_device: 3"),
     "models.ppo_policy: num_device 3 is not a multiple of TP x PP = 2"),
    (("colocation: [ppo_policy,", "colocation: [ghost, ppo_policy,"),
     "rlhf.colocation: role 'ghost' is not in models"),
])
def test_main_file_validation(tmp_path, edit, expected):
    assert expected in error(make(tmp_path, main=MAIN.replace(*edit, 1)))


def test_offload_auto_true_false(tmp_path):
    """rlhf.offload: omitted, null or auto -> None (decided by the device); a bool as it is;
    anything else a one-line error. None resolves (trainer.offload_plan) to every role on a GPU
    unless per-model keys name the roles, and to the per-model keys only on a CPU."""
    from megatron_patch.rlhf.trainer import offload_plan

    main = MAIN.replace("  data_path:", "  offload: {}\n  data_path:")
    assert load_config(str(make(tmp_path)), env={}).rlhf.offload is None
    for text, value in (("auto", None), ("AUTO", None), ("null", None), ("true", True),
                        ("false", False), ("${OFFLOAD:auto}", None)):
        cfg = load_config(str(make(tmp_path, main=main.format(text))), env={})
        assert cfg.rlhf.offload is value, text
    assert "rlhf.offload: expected true, false or auto, got 'sometimes'" in error(
        make(tmp_path, main=main.format("sometimes")))
    roles = ["policy", "reference", "reward", "value"]
    every = {r: "all" for r in roles}
    some = {"reference": "weights", "value": "all"}
    assert offload_plan(roles, None, None, cuda=True) == every
    assert offload_plan(roles, None, some, cuda=True) == some
    assert offload_plan(roles, None, None, cuda=False) == {}
    assert offload_plan(roles, None, some, cuda=False) == some
    assert offload_plan(roles, True, some, cuda=False) == every
    assert offload_plan(roles, False, some, cuda=True) == some
    assert offload_plan(roles, False, None, cuda=True) == {}


def test_algorithms_and_roles(tmp_path):
    no_value = MAIN.split("  reward_train:")[0] + "  reward_ref:" + MAIN.split("  reward_ref:")[1]
    no_value = no_value.replace(", reward_train, reward_forward", "")
    assert "algorithm ppo needs the role(s) reward_train" in error(make(tmp_path, main=no_value))
    grpo = no_value.replace("algorithm: ppo", "algorithm: grpo")
    msg = error(make(tmp_path, main=grpo))
    assert "grpo needs num_samples_per_prompt >= 2" in msg and "policy_inference.yaml" in msg
    path = make(tmp_path, main=grpo, policy_inference_yaml="includes: [base.yaml]\n"
                                                          "num_samples_per_prompt: 8\n"
                                                          "kl_in_loss: true\nkl_kind: k3\n")
    cfg = load_config(str(path), env={})
    assert cfg.rlhf.algorithm == "grpo" and "reward_train" not in cfg.models
    assert cfg.models["policy"].rlhf_values()["num_samples_per_prompt"] == 8
    no_reward = grpo.split("  reward_ref:")[0] + "rlhf:" + grpo.split("rlhf:")[1]
    no_reward = no_reward.replace(", reward_ref]", "]")
    assert "no reward" in error(make(tmp_path, main=no_reward, policy_inference_yaml=(
        "includes: [base.yaml]\nnum_samples_per_prompt: 8\n")))
    cfg = load_config(str(make(tmp_path, main=no_reward, policy_inference_yaml=(
        "includes: [base.yaml]\nnum_samples_per_prompt: 8\nreward_function: my.rewards:math\n"))),
        env={})
    assert cfg.models["policy"].rlhf_values()["reward_function"] == "my.rewards:math"


@pytest.mark.parametrize("line, expected", [
    ("kl_kind: k4", "kl_kind: must be one of k1, k2, k3, abs"),
    ("temperature: -1", "temperature: must be >= 0"),
    ("top_p: 1.5", "top_p: must be in [0, 1]"),
    ("kl_in_loss: 1", "kl_in_loss: expected bool"),
    ("max_new_tokens: 1.5", "max_new_tokens: expected int"),
    ("reward_function: not a function", "reward_function: must be module:function"),
    ("max_prompt_length: 250", "max_prompt_length + max_new_tokens = 314 > seq_length 256"),
    ("lr_decay_style: sometimes", "argument --lr-decay-style: invalid choice"),
    ("lr: fast", "argument --lr: invalid float value"),
    ("bf16: yes please", "bf16: expected true or false"),
    ("lr: [1, 2]", "lr: expected one value"),
])
def test_model_file_value_errors(tmp_path, line, expected):
    msg = error(make(tmp_path, reference_yaml=MODELS["reference.yaml"] + line + "\n"))
    assert expected in msg and str(tmp_path / "reference.yaml") in msg


def test_yaml_errors_are_one_line(tmp_path):
    msg = error(make(tmp_path, reference_yaml="load: [unclosed\n"))
    assert "invalid YAML" in msg and str(tmp_path / "reference.yaml") in msg
    assert "expected a mapping" in error(make(tmp_path, reference_yaml="- a\n- b\n"))
    assert "no such file" in error(tmp_path / "nope.yaml")
    assert issubclass(RLHFConfigError, ValueError)


EXAMPLE_ENV = {"POLICY_LOAD": "/ckpt/step1_sft", "REWARD_LOAD": "/ckpt/step2_reward",
               "REWARD_LOAD_ITERATION": "1000", "DATASET_PATH": "/data/prompts.jsonl",
               "exp_name": "my_run", "OUTPUT_DIR": "/out", "VOCAB_FILE": "/tok/bloom",
               "TOKENIZER_MODEL": "/tok/tokenizer.model"}


@pytest.mark.parametrize("family", ["llama2", "bloom"])
def test_examples_validate(family):
    main = ROOT / "examples" / "rlhf" / "configs" / family / "rlhf.yaml"
    cfg = load_config(str(main), env=EXAMPLE_ENV)
    assert set(cfg.models) == set(ROLES) and cfg.rlhf.algorithm == "ppo"
    assert cfg.rlhf.data_path == "/data/prompts.jsonl"
    assert cfg.rlhf.output_dir == "/out/step3_rlhf/my_run"
    assert cfg.rlhf.colocation == [list(ROLES)]
    args = {name: role.megatron_args() for name, role in cfg.models.items()}
    for name in ("ppo_policy", "policy", "reference"):
        assert args[name].load == "/ckpt/step1_sft"
        assert cfg.models[name].rlhf_values()["load_iteration"] is None
    for name in ("reward_train", "reward_forward", "reward_ref"):
        assert args[name].load == "/ckpt/step2_reward"
        assert cfg.models[name].rlhf_values()["load_iteration"] == 1000
    assert args["ppo_policy"].save == "/out/step3_rlhf/my_run/ppo_policy"
    assert args["reward_train"].save == "/out/step3_rlhf/my_run/ppo_value"
    assert args["policy"].save is None and args["reward_ref"].save is None
    assert {a.model_family for a in args.values()} == {"llama" if family == "llama2" else "bloom"}
    assert {a.tokenizer_model for a in args.values()} == \
        {"/tok/tokenizer.model" if family == "llama2" else "/tok/bloom"}
    assert {a.tensor_model_parallel_size for a in args.values()} == {4}
    assert args["ppo_policy"].lr < args["policy"].lr  # the trained roles set their own lr
    # TP/PP and the defaults of the optional variables
    env = {k: v for k, v in EXAMPLE_ENV.items() if k not in ("exp_name", "OUTPUT_DIR",
                                                             "REWARD_LOAD_ITERATION")}
    cfg = load_config(str(main), env={**env, "TP": "2", "PP": "2"})
    a = cfg.models["reference"].megatron_args()
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (2, 2)
    assert cfg.rlhf.output_dir.startswith("output/step3_rlhf/")
    assert cfg.models["reward_ref"].rlhf_values()["load_iteration"] is None
    required = "TOKENIZER_MODEL" if family == "llama2" else "VOCAB_FILE"
    for var in ("POLICY_LOAD", "REWARD_LOAD", "DATASET_PATH", required):
        with pytest.raises(RLHFConfigError, match=var):
            load_config(str(main), env={k: v for k, v in env.items() if k != var})
