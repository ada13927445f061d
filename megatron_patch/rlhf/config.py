"""RLHF configuration in the style of ChatLearn: a main YAML plus one YAML per model role.

Main YAML (``load_config(path)``)::

    runtime_env: {...}          # optional mapping (platform, excludes, ...), kept, not interpreted
    models:                     # role -> where it runs; roles: ROLES (trainable: TRAINABLE_ROLES)
      ppo_policy:               # also policy, reference, reward_train, reward_forward, reward_ref
        model_config_file: ppo_policy.yaml  # relative to the file naming it; must exist
        num_device: 8           # default 1; a multiple of gpu_per_process and of TP x PP
        gpu_per_process: 1      # default 1
        trainable: true         # required on TRAINABLE_ROLES, never true on the others
        return_rlhf_data: false # ChatLearn's flag for the reward model (reward_ref)
    rlhf: {...}                 # run settings: the fields of RLHFSettings (all have defaults)

Roles: REQUIRED_ROLES per algorithm, and reward_ref unless a model file sets ``reward_function``.
``rlhf.colocation``: a list of roles sharing devices, or a list of such lists (equal num_device).
Per-model YAML: Megatron arguments with underscores (exactly the argparse dests of
``training.arguments.build_parser`` + ``training.finetune.add_finetune_args``: ``num_layers``,
``tensor_model_parallel_size``, ``load``, ``bf16``, ``lr``, ...), the RLHF keys of RoleRLHFKeys and
IGNORED_MODEL_KEYS. ``RoleConfig.megatron_args()`` parses the Megatron keys with that parser
(true -> flag present, list -> nargs); ``RoleConfig.rlhf_values()`` gives the RLHF keys.

Any file: ``${NAME}`` / ``${NAME:default}`` in values, whole or inside a string (a whole value is
then read as a YAML scalar: ``${TP:2}`` is int 2, ``${X:}`` is null; quote it in [...], {...});
``includes: [a.yaml, ...]`` (relative to the file; included keys are defaults, a later include
overrides an earlier one, the file overrides them all; mappings merge key by key).
Every error is an RLHFConfigError with one line naming the file (and the key, role or variable).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

ROLES = ("ppo_policy", "policy", "reference", "reward_train", "reward_forward", "reward_ref")
TRAINABLE_ROLES = ("ppo_policy", "reward_train")
REQUIRED_ROLES = {"ppo": ("ppo_policy", "policy", "reference", "reward_train"),
                  "grpo": ("ppo_policy", "policy", "reference")}
ROLE_KEYS = {"model_config_file": "str", "num_device": "int", "gpu_per_process": "int",
             "trainable": "bool", "return_rlhf_data": "bool", "free_memory": "bool",
             "offload_weights": "bool"}
# ChatLearn role settings for its own batching: accepted, no effect here.
IGNORED_ROLE_KEYS = frozenset({"batch_generation"})
# ChatLearn/Megatron model keys accepted with no effect here (values not checked): architecture
# fixed by model_family / model_size (bloom is always ALiBi), Megatron switches this project lacks.
IGNORED_MODEL_KEYS = frozenset({
    "position_embedding_type", "swiglu", "normalization", "add_bias_linear", "layernorm_epsilon",
    "use_rotary_position_embeddings", "apply_residual_connection_post_layernorm",
    "distributed_backend", "no_load_args", "no_load_scheduler", "attention_softmax_in_fp32",
    "use_checkpoint_opt_param_scheduler", "no_gradient_accumulation_fusion"})


class RLHFConfigError(ValueError):
    """Any configuration error; the message is one line naming the file."""
    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).splitlines()))


def _check(ok, msg: str) -> None:
    if not ok:
        raise RLHFConfigError(msg)


@dataclass
class RLHFSettings:
    """The ``rlhf:`` section of the main YAML."""
    algorithm: str = "ppo"                  # ppo | grpo
    colocation: List[List[str]] = field(default_factory=list)  # groups of roles sharing devices
    generation_batch_size: int = 8          # prompts per generation call
    train_micro_batch_size: int = 2
    train_global_batch_size: int = 8        # samples per optimizer step
    num_ppo_episode: int = 1
    sample_per_episode: int = 64            # a multiple of the two batch sizes above
    num_training_epoch: int = 1             # passes over each episode's samples
    save_episode_interval: Optional[int] = None  # None: save at the end only
    data_path: Optional[str] = None         # prompts: json/jsonl file or folder
    eval_data_path: Optional[str] = None
    eval_episode_interval: int = 0          # 0: no evaluation
    output_dir: Optional[str] = None        # logs, metrics, tensorboard
    log_interval: int = 1
    seed: int = 1234
    data_shuffle: bool = True
    # idle roles to host memory between phases; null (or "auto"): on a GPU unless per-model
    # offload_weights / free_memory say which roles, off on a CPU (host memory is the device's)
    offload: Optional[bool] = None
    recompute_old_logprobs: bool = False    # GRPO, one mini-batch: score old log-probs anyway


@dataclass
class RoleRLHFKeys:
    """RLHF keys of a per-model YAML and their defaults (``RoleConfig.rlhf_values()``)."""
    max_new_tokens: int = 512               # generation
    temperature: float = 1.0
    top_k: int = 0                          # 0: off
    top_p: float = 1.0                      # 0 or 1: off
    repetition_penalty: float = 1.0
    eval_temperature: float = 0.0           # 0: greedy
    max_prompt_length: Optional[int] = None  # None: seq_length - max_new_tokens
    clip_range: float = 0.2                 # PPO
    clip_range_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    init_kl_coef: float = 0.02
    kl_target: Optional[float] = None       # None: fixed KL coefficient, else adaptive
    kl_horizon: float = 10000.0
    kl_kind: str = "k1"                     # k1 | k2 | k3 | abs
    kl_in_loss: bool = False                # KL term in the loss (GRPO style), not in the rewards
    kl_divide_by_length: bool = False
    clipped_value_only: bool = False
    entropy_coef: float = 0.0
    reward_scale: float = 1.0
    reward_clip: Optional[float] = None     # None: no clipping
    whiten_advantages: bool = True
    reward_function: Optional[str] = None   # "module:function", a rule-based reward
    num_samples_per_prompt: int = 1         # GRPO group size (>= 2 with grpo; read from policy)
    load_iteration: Optional[int] = None    # iteration of `load` to read (None: the latest)


RLHF_KEYS = tuple(f.name for f in dataclasses.fields(RoleRLHFKeys))
# Numbers must be > 0 (ints >= 1) unless listed here; a null (where allowed) is not checked.
_NON_NEGATIVE = {"temperature", "eval_temperature", "top_k", "top_p", "gamma", "lam", "seed",
                 "init_kl_coef", "entropy_coef", "load_iteration", "eval_episode_interval"}
_AT_MOST_ONE = {"top_p", "gamma", "lam"}
_CHOICES = {"kl_kind": ("k1", "k2", "k3", "abs"), "algorithm": ("ppo", "grpo")}
_BASE = {"int": int, "float": float, "bool": bool, "str": str}
_FLT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _typed(value, ftype: str, where: str, key: str):
    """value checked against an annotation (int, float, bool, str, Optional[...]) and the ranges
    above; floats also take ints and strings like 1e-5 (which YAML 1.1 reads as strings)."""
    opt = ftype.startswith("Optional[")
    base = ftype[9:-1] if opt else ftype
    if value is None and opt:
        return value
    if base == "float" and (type(value) is int or isinstance(value, str) and _FLT.fullmatch(value)):
        value = float(value)
    _check(isinstance(value, _BASE[base]) and (base == "bool") == isinstance(value, bool),
           f"{where}: expected {base}{' or null' if opt else ''}, got {value!r}")
    bad = None
    if key in _CHOICES and value not in _CHOICES[key]:
        bad = f"one of {', '.join(_CHOICES[key])}"
    elif key == "reward_function" and not re.fullmatch(r"[\w.]+:\w+", value):
        bad = "module:function"
    elif base in ("int", "float"):
        if value < 0 or (value == 0 and key not in _NON_NEGATIVE):
            bad = ">= 0" if key in _NON_NEGATIVE else "> 0"
        elif key in _AT_MOST_ONE and value > 1:
            bad = "in [0, 1]"
    _check(not bad, f"{where}: must be {bad}, got {value!r}")
    return value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without the YAML 1.1 number surprises: an integer with leading zeros
    is decimal (``0001000`` is 1000, not octal 512: iteration numbers are copied from
    ``iter_0001000``), ``1:30`` is a string (not sexagesimal 90), ``1e-5`` is a float (YAML 1.1
    reads it as a string) and dates stay strings. Booleans are YAML 1.1's (``true``, ``yes``,
    ``on``, ...), as in ChatLearn's configs."""


_TAG = "tag:yaml.org,2002:"
_Loader.yaml_implicit_resolvers = {
    c: [(t, rx) for t, rx in rs if t not in (_TAG + "int", _TAG + "float", _TAG + "timestamp")]
    for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_TAG + "int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _TAG + "float", re.compile(r"^(?:[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text, 10)
    return yaml.SafeLoader.construct_yaml_int(loader, node)  # an explicit !!int 0x1f


_Loader.add_constructor(_TAG + "int", _construct_int)


def _yaml_load(stream):
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def _scalar(text: str):
    """A substituted whole value as the YAML scalar it spells (int, float, bool, null, or the
    string itself), without parsing it as YAML (no comments, flow collections, anchors, tags)."""
    loader = _Loader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        return text if tag == _TAG + "str" else loader.construct_object(yaml.ScalarNode(tag, text))
    finally:
        loader.dispose()


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(text: str, env: Dict[str, str], where: str, i: int = 0, nested: bool = False):
    """(expanded text, end index, [(start, end)] of its references) of ``text`` from ``i``: ``${NAME}``,
    ``${NAME:default}`` (the default may hold ``}`` inside nested references and is itself
    expanded; a variable set to the empty string takes the default, as the shell's
    ``${NAME:-default}``), ``$${`` for a literal ``${``. With ``nested``, stops at the ``}`` that
    closes the enclosing default."""
    out, spans = [], []
    while i < len(text):
        if text.startswith("$${", i):
            out.append("${")
            i += 3
        elif text.startswith("${", i):
            start = i
            m = _NAME.match(text, i + 2)
            _check(m is not None, f"{where}: '${{' not followed by a variable name in {text!r} "
                                  "(write $${ for a literal ${)")
            name, i = m.group(), m.end()
            default = None
            if text.startswith(":", i):
                default, i, _ = _expand(text, env, where, i + 1, nested=True)
            _check(text.startswith("}", i), f"{where}: unterminated ${{{name} in {text!r}")
            i += 1
            value = env.get(name)
            if not value and default is not None:
                value = default
            _check(value is not None, f"{where}: environment variable {name} is not set "
                                      f"(${{{name}}} has no default)")
            out.append(value)
            spans.append((start, i))
        elif nested and text[i] == "}":
            return "".join(out), i, spans
        else:
            j = text.find("$", i + 1)
            j = len(text) if j < 0 else j
            if nested:
                k = text.find("}", i)
                j = min(j, k) if k >= 0 else j
            out.append(text[i:j])
            i = j
    return "".join(out), i, spans


def _subst(value, env: Dict[str, str], where: str):
    """``value`` with its references expanded; a value that is one reference and nothing else
    becomes the YAML scalar its text spells (``${TP:2}`` -> 2, ``${X:}`` -> null)."""
    if not isinstance(value, str) or "$" not in value:
        return value
    text, _, spans = _expand(value, env, where)
    return _scalar(text) if spans == [(0, len(value))] else text


def _subst_tree(data, origins: dict, env: Dict[str, str], default: str, prefix=()):
    """Substitute every string value of a merged mapping, naming the file that set its key."""
    if isinstance(data, dict):
        return {k: _subst_tree(v, origins, env, default, prefix + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [_subst_tree(v, origins, env, default, prefix) for v in data]
    where = origins.get(prefix, default)
    return _subst(data, env, f"{where}: {'.'.join(map(str, prefix))}" if prefix else where)


def _merge(dst: dict, dorig: dict, src: dict, src_file: str, prefix=()) -> None:
    """Deep-merge src into dst; dorig maps every key path of dst to the file that set it. A key
    with no value (``rlhf:`` followed by nothing, null) over an included mapping keeps it: an
    empty section header is not a request to drop the included settings."""
    for k, v in src.items():
        p = prefix + (k,)
        if v is None and isinstance(dst.get(k), dict):
            continue
        if not (isinstance(v, dict) and isinstance(dst.get(k), dict)):
            for q in [q for q in dorig if q[:len(p)] == p]:
                del dorig[q]
            dst[k] = {} if isinstance(v, dict) else copy.deepcopy(v)
        dorig[p] = src_file
        if isinstance(v, dict):
            _merge(dst[k], dorig, v, src_file, p)


def _read(path: str, env: Dict[str, str]):
    """(merged mapping, {key path: file that set it}) of a YAML file and its includes, with the
    ``${...}`` references expanded after the merge (a variable that only an overridden value
    names need not be set)."""
    data, origins = _read_raw(path, env)
    return _subst_tree(data, origins, env, os.path.abspath(path)), origins


def _read_raw(path: str, env: Dict[str, str], stack=()):
    path = os.path.abspath(path)
    _check(path not in stack, f"{stack[-1] if stack else path}: include cycle: "
           f"{' -> '.join(stack + (path,))}")
    _check(os.path.isfile(path), f"{stack[-1]}: included file {path} does not exist" if stack
           else f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = _yaml_load(f)
    except yaml.YAMLError as e:
        raise RLHFConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise RLHFConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = {} if data is None else data
    _check(isinstance(data, dict), f"{path}: expected a mapping, got {type(data).__name__}")
    includes = data.pop("includes", None) or []
    includes = [includes] if isinstance(includes, str) else includes
    _check(isinstance(includes, list) and all(isinstance(i, str) for i in includes),
           f"{path}: includes must be a list of file names, got {includes!r}")
    includes = [_subst(i, env, f"{path}: includes") for i in includes]
    merged, origins = {}, {}
    for inc in includes:
        sub, sub_origins = _read_raw(os.path.join(os.path.dirname(path), str(inc)), env,
                                     stack + (path,))
        _merge(merged, origins, sub, "")
        origins.update(sub_origins)
    _merge(merged, origins, data, path)
    return merged, origins


def _check_keys(data: dict, allowed, origins: dict, prefix: tuple, default: str, what="key"):
    for k in [k for k in data if k not in allowed][:1]:
        close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
        raise RLHFConfigError(f"{origins.get(prefix + (k,), default)}: unknown {what} '"
                              + ".".join(map(str, prefix + (k,))) + "'"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))


_PARSER: List[argparse.ArgumentParser] = []


def megatron_parser() -> argparse.ArgumentParser:
    """The fine-tuning entry point's parser; its errors raise RLHFConfigError, not SystemExit."""
    if not _PARSER:
        from megatron_patch.training.arguments import build_parser
        from megatron_patch.training.finetune import add_finetune_args

        _PARSER.append(build_parser("megatron_patch RLHF model"))
        add_finetune_args(_PARSER[0])
        _PARSER[0].error = lambda msg: _check(False, msg)
    return _PARSER[0]


def megatron_keys() -> Dict[str, argparse.Action]:
    """The allowed Megatron keys (argparse dests) and their actions."""
    return {a.dest: a for a in megatron_parser()._actions if a.option_strings and a.dest != "help"}


def _argv(values: dict, actions: Dict[str, argparse.Action], where: str) -> List[str]:
    argv = []
    for k, v in values.items():
        a, many = actions[k], actions[k].nargs in ("*", "+")
        if v is None:  # null: the parser's default
            continue
        if a.nargs == 0:
            _check(isinstance(v, bool), f"{where}: {k}: expected true or false, got {v!r}")
            argv += [a.option_strings[0]] if v == a.const else []
        elif isinstance(v, list) or (many and v is not None):
            _check(many, f"{where}: {k}: expected one value, got a list {v!r}")
            argv += [a.option_strings[0]] + [str(x) for x in (v if isinstance(v, list) else [v])]
        elif v is not None:
            argv.append(f"{a.option_strings[0]}={str(v).lower() if isinstance(v, bool) else v}")
    return argv


@dataclass
class RoleConfig:
    """One model role: where it runs (main YAML) and its merged per-model YAML (``values``)."""
    name: str
    model_config_file: str
    num_device: int = 1
    gpu_per_process: int = 1
    trainable: bool = False
    return_rlhf_data: bool = False
    free_memory: bool = False  # idle: weights and (trainable) training state to host memory
    offload_weights: bool = False  # idle: weights to host memory
    values: dict = field(default_factory=dict)
    origins: Dict[tuple, str] = field(default_factory=dict, repr=False, compare=False)

    def megatron_args(self, extra: Optional[dict] = None) -> argparse.Namespace:
        """The Megatron keys of ``values``, overridden by ``extra``, parsed by the fine-tuning
        parser (its defaults and types for all the others)."""
        actions = megatron_keys()
        where = f"{self.model_config_file} (role {self.name})"
        _check_keys(extra or {}, actions, {}, (), f"{where} megatron_args(extra)")
        vals = {**{k: v for k, v in self.values.items() if k in actions}, **(extra or {})}
        argv = _argv(vals, actions, where)  # its errors name the file already
        try:
            return megatron_parser().parse_args(argv)
        except RLHFConfigError as e:
            raise RLHFConfigError(f"{where}: {e}") from None

    def rlhf_values(self) -> dict:
        """Every RLHF key: the file's value or its default (RoleRLHFKeys)."""
        where = lambda k: f"{self.origins.get((k,), self.model_config_file)}: {k}"  # noqa: E731
        return {f.name: _typed(self.values[f.name], f.type, where(f.name), f.name)
                if f.name in self.values else f.default for f in dataclasses.fields(RoleRLHFKeys)}


@dataclass
class RLHFConfig:
    runtime_env: dict
    models: Dict[str, RoleConfig]
    rlhf: RLHFSettings
    path: str


def _settings(raw, origins: dict, path: str) -> RLHFSettings:
    _check(isinstance(raw, dict), f"{path}: rlhf must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(RLHFSettings)}
    _check_keys(raw, fields, origins, ("rlhf",), path)
    out = {}
    for k, v in raw.items():
        where = f"{origins.get(('rlhf', k), path)}: rlhf.{k}"
        if k == "offload" and isinstance(v, str) and v.lower() == "auto":
            v = None  # auto: decided by the device (trainer.offload_plan)
        _check(k != "offload" or v is None or isinstance(v, bool),
               f"{where}: expected true, false or auto, got {v!r}")
        if k != "colocation":
            out[k] = _typed(v, fields[k].type, where, k)
            continue
        v = [v] if isinstance(v, list) and v and all(isinstance(r, str) for r in v) else v
        _check(isinstance(v, list) and all(isinstance(g, list) and g and all(
            isinstance(r, str) for r in g) for g in v),
            f"{where}: expected a list of roles or a list of such lists, got {v!r}")
        out[k] = [list(g) for g in v]
    s = RLHFSettings(**out)
    for a, b in (("sample_per_episode", "generation_batch_size"),
                 ("sample_per_episode", "train_global_batch_size"),
                 ("train_global_batch_size", "train_micro_batch_size")):
        _check(getattr(s, a) % getattr(s, b) == 0, f"{path}: rlhf.{a} ({getattr(s, a)}) is not "
               f"a multiple of rlhf.{b} ({getattr(s, b)})")
    return s


def _role(name: str, spec, origins: dict, path: str, env: Dict[str, str]) -> RoleConfig:
    where = f"{origins.get(('models', name), path)}: models.{name}"
    _check(isinstance(spec, dict), f"{where}: expected a mapping (model_config_file, ...)")
    _check_keys(spec, set(ROLE_KEYS) | IGNORED_ROLE_KEYS, origins, ("models", name), path)
    _check(spec.get("model_config_file"), f"{where}: model_config_file is missing")
    kw = {k: _typed(spec[k], t, f"{where}.{k}", k) for k, t in ROLE_KEYS.items() if k in spec}
    base = os.path.dirname(origins.get(("models", name, "model_config_file"), path))
    kw["model_config_file"] = mcf = os.path.abspath(os.path.join(base, kw["model_config_file"]))
    _check(os.path.isfile(mcf), f"{where}: model_config_file {mcf} does not exist")
    _check((name in TRAINABLE_ROLES) == bool(kw.get("trainable")), f"{where}: " + (
        "a trainable role needs trainable: true" if name in TRAINABLE_ROLES else
        f"trainable: true on an inference-only role (trainable: {', '.join(TRAINABLE_ROLES)})"))
    role = RoleConfig(name, **kw)
    _check(role.num_device % role.gpu_per_process == 0, f"{where}: num_device "
           f"{role.num_device} is not a multiple of gpu_per_process {role.gpu_per_process}")
    role.values, role.origins = _read(mcf, env)
    _check_keys(role.values, set(megatron_keys()) | set(RLHF_KEYS) | IGNORED_MODEL_KEYS,
                role.origins, (), mcf)
    rl, args = role.rlhf_values(), role.megatron_args()
    mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    _check(role.num_device % mp == 0, f"{where}: num_device {role.num_device} is not a multiple "
           f"of TP x PP = {mp} ({mcf})")
    total = (rl["max_prompt_length"] or 0) + rl["max_new_tokens"]
    _check(not (args.seq_length and rl["max_prompt_length"] and total > args.seq_length),
           f"{mcf}: max_prompt_length + max_new_tokens = {total} > seq_length {args.seq_length}")
    return role


def load_config(main_yaml_path: str, env: Optional[Dict[str, str]] = None) -> RLHFConfig:
    """Read and validate a main YAML and its per-model files; ``env`` defaults to os.environ."""
    env = dict(os.environ if env is None else env)
    path = os.path.abspath(main_yaml_path)
    data, origins = _read(path, env)
    _check_keys(data, ("runtime_env", "models", "rlhf"), origins, (), path)
    runtime_env = data.get("runtime_env") or {}
    _check(isinstance(runtime_env, dict), f"{path}: runtime_env must be a mapping")
    settings = _settings(data.get("rlhf") or {}, origins, path)
    raw = data.get("models")
    _check(isinstance(raw, dict) and raw, f"{path}: models must map roles ({', '.join(ROLES)}) "
           f"to their settings")
    _check_keys(raw, ROLES, origins, ("models",), path, what="role")
    models = {name: _role(name, spec, origins, path, env) for name, spec in raw.items()}
    missing = [r for r in REQUIRED_ROLES[settings.algorithm] if r not in models]
    _check(not missing, f"{path}: algorithm {settings.algorithm} needs the role(s) "
           f"{', '.join(missing)} in models")
    _check("reward_ref" in models or any(m.rlhf_values()["reward_function"]
                                         for m in models.values()),
           f"{path}: no reward: add models.reward_ref or set reward_function in a model file")
    seen = set()
    for group in settings.colocation:
        for r in group:
            _check(r in models and r not in seen, f"{path}: rlhf.colocation: role '{r}' " + (
                "is listed twice" if r in seen else f"is not in models ({', '.join(models)})"))
            seen.add(r)
        counts = ", ".join(f"{r}: {models[r].num_device}" for r in group)
        _check(len({models[r].num_device for r in group}) == 1, f"{path}: colocated roles "
               f"{', '.join(group)} have incompatible device counts ({counts})")
    n = models["policy"].rlhf_values()["num_samples_per_prompt"]
    _check(settings.algorithm != "grpo" or (n >= 2 and settings.sample_per_episode % n == 0),
           f"{models['policy'].model_config_file}: grpo needs num_samples_per_prompt >= 2 "
           f"dividing rlhf.sample_per_episode ({settings.sample_per_episode}), got {n}")
    return RLHFConfig(runtime_env=runtime_env, models=models, rlhf=settings, path=path)
