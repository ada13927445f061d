"""Review of the training entry points and their launch scripts: bad numbers, checkpoint paths and
optimizer kinds fail with one ``error:`` line before (or instead of) a traceback; SAVE_INTERVAL 0
saves at the end only; --eval-iters 0 means no validation; re-saving an iteration keeps the
tracker on a loadable folder whatever moment the save is killed at."""
import json
import os

import pytest

from megatron_patch.launch import WorkerError, launch_local
from script_helpers import clean_env as _env, run as _run, script as _script

TINY = ["--vocab-size", "256", "--seq-length", "16", "--mock-data", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "2"]


def _pretrain(*flags, nproc=1):
    return launch_local(["-m", "megatron_patch.training.pretrain", *TINY, *flags], nproc,
                        timeout=300)


def _error(argv, nproc=1):
    with pytest.raises(WorkerError) as e:
        launch_local(argv, nproc, timeout=300)
    text = str(e.value)
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0], text


@pytest.mark.parametrize("flags,message", [
    (["--global-batch-size", "0"], "--global-batch-size must be positive, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be positive, got 0"),
    (["--seq-length", "0"], "--seq-length must be positive, got 0"),
    (["--train-iters", "-3"], "--train-iters must be >= 0, got -3"),
])
def test_nonpositive_counts_are_one_error_line(flags, message):
    # before: ZeroDivisionError / megatron-core assertion tracebacks, a SIGFPE (seq 0), or a run
    # that "finished at iteration 0" (negative iterations)
    line, text = _error(["-m", "megatron_patch.training.pretrain", *TINY, *flags])
    assert message in line and "> llama model:" not in text


def test_missing_seq_length_and_zero_epochs_are_one_error_line(tmp_path):
    argv = ["-m", "megatron_patch.training.pretrain", "--vocab-size", "256", "--mock-data",
            "--train-iters", "2"]
    line, _ = _error(argv)  # was a TypeError in resolve_arch
    assert "--seq-length is required" in line
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"query": "q", "response": "r"}) + "\n" for _ in range(4)))
    line, _ = _error(["-m", "megatron_patch.training.finetune", "--vocab-size", "256",
                      "--seq-length", "16", "--train-data", str(data), "--epochs", "0"])
    assert "--epochs must be positive, got 0" in line  # was "give --train-iters or --train-tokens"


def test_save_interval_zero_saves_once_at_the_end(tmp_path):
    ck = tmp_path / "ck"
    _pretrain("--save", str(ck), "--save-interval", "0", "--train-iters", "3")
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert sorted(d for d in os.listdir(ck) if d.startswith("iter_")) == ["iter_0000003"]


def test_eval_iters_zero_means_no_validation(tmp_path):
    log = tmp_path / "log"
    out = "".join(_pretrain("--eval-iters", "0", "--eval-interval", "1", "--log-dir", str(log)))
    assert "validation at iteration" not in out, out[-2000:]
    recs = [json.loads(x) for x in (log / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2] and all("lm_loss" in r for r in recs), recs


def test_checkpoint_paths_checked_before_the_model_is_built(tmp_path):
    missing = str(tmp_path / "nope")
    line, text = _error(["-m", "megatron_patch.training.pretrain", *TINY,
                         "--pretrained-checkpoint", missing])
    assert missing in line and "no such folder" in line and "> llama model:" not in text
    # --finetune takes --load's weights: an empty --load silently trained from random weights
    line, text = _error(["-m", "megatron_patch.training.pretrain", *TINY, "--load", missing,
                         "--finetune"])
    assert "--finetune" in line and missing in line and "> llama model:" not in text
    # a --load that is not the run's own --save and holds nothing: a warning, as Megatron-LM's
    out = "".join(_pretrain("--load", missing))
    assert f"warning: --load {missing} holds no checkpoint" in out
    assert "random weights" in out


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_resume_with_other_optimizer_kind_is_one_error_line(tmp_path, fmt):
    ck = str(tmp_path / "ck")
    _pretrain("--save", ck, "--ckpt-format", fmt)
    # before: "error: optimizer" / "error: state" (legacy), a CheckpointException traceback
    # (torch_dist)
    line, _ = _error(["-m", "megatron_patch.training.pretrain", *TINY, "--train-iters", "3",
                      "--load", ck, "--ckpt-format", fmt, "--use-distributed-optimizer"])
    assert "saved without the distributed optimizer" in line and "--no-load-optim" in line
    out = "".join(_pretrain("--train-iters", "3", "--load", ck, "--ckpt-format", fmt,
                            "--use-distributed-optimizer", "--no-load-optim"))
    assert "training finished at iteration 3" in out


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_resume_with_other_model_shape_is_one_error_line(tmp_path, fmt):
    """--load of a checkpoint saved with other model flags (here --hidden-size): before, torch's
    "size mismatch" list (legacy) or a dist_checkpointing traceback (torch_dist)."""
    ck = str(tmp_path / "ck")
    _pretrain("--save", ck, "--ckpt-format", fmt, "--hidden-size", "32",
              "--num-attention-heads", "4")
    line, _ = _error(["-m", "megatron_patch.training.pretrain", *TINY, "--train-iters", "3",
                      "--load", ck, "--ckpt-format", fmt, "--hidden-size", "64",
                      "--num-attention-heads", "4"])
    assert "does not fit" in line and "are the model flags those it was saved with?" in line
    assert ("size mismatch for" if fmt == "legacy" else "Global shape mismatch") in line, line


RESAVE_WORKER = r"""
import json, os, shutil, sys
import megatron_patch  # noqa: F401
import torch
from megatron_patch.convert import layout
from megatron_patch.training import checkpointing, engine
from megatron_patch.training.arguments import build_parser

out, base = sys.argv[1], sys.argv[2]
args = build_parser().parse_args(["--mock-data", "--vocab-size", "256", "--seq-length", "16",
                                  "--train-iters", "2", "--save", base])
arch = engine.resolve_arch(args)
engine.initialize(args)
model = engine.build_model(args, arch, engine.build_config(args, arch), 256)
opt, sched = engine.build_optimizer(args, model)


def weights():
    return {k: v.clone() for k, v in checkpointing.unwrap(model[0]).state_dict().items()
            if torch.is_tensor(v)}


def dying_rmtree(path, *a, **k):  # deletes the rank files, then the process "dies"
    for d, _, files in os.walk(path):
        for f in files:
            os.unlink(os.path.join(d, f))
    raise KeyboardInterrupt("killed during the save")


real_replace = os.replace


def dying_replace(src, dst):  # the older folder goes aside, then the process "dies"
    if str(src).endswith(".partial"):
        raise KeyboardInterrupt("killed between the renames")
    real_replace(src, dst)


res = {}
for kill in ("rmtree", "replace"):
    root = os.path.join(base, kill)
    checkpointing.save_checkpoint(root, 2, model, opt, sched, {"consumed_train_samples": 2})
    first = weights()
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    new = weights()
    if kill == "rmtree":
        real, checkpointing.shutil.rmtree = checkpointing.shutil.rmtree, dying_rmtree
    else:
        real, checkpointing.os.replace = checkpointing.os.replace, dying_replace
    died = False
    try:  # the same iteration again (a --finetune rerun into its own --save folder)
        checkpointing.save_checkpoint(root, 2, model, opt, sched, {"consumed_train_samples": 2})
    except KeyboardInterrupt:
        died = True
    if kill == "rmtree":
        checkpointing.shutil.rmtree = real
    else:
        checkpointing.os.replace = real
    with torch.no_grad():
        for p in model[0].parameters():
            p.zero_()
    r = {"died": died, "tracker": open(os.path.join(root, layout.TRACKER)).read(),
         "folders": sorted(os.listdir(root))}
    try:
        checkpointing.load_checkpoint(root, model, opt, sched)
        now = weights()
        r["loaded"] = ("new" if all(torch.equal(now[k], v) for k, v in new.items()) else
                       "first" if all(torch.equal(now[k], v) for k, v in first.items()) else "other")
    except Exception as e:
        r["loaded"] = "error: " + str(e)
    r["after"] = sorted(os.listdir(root))
    res[kill] = r
json.dump(res, open(out, "w"))
"""


def test_killed_resave_of_an_iteration_leaves_a_loadable_tracker(tmp_path):
    worker = tmp_path / "resave_worker.py"
    worker.write_text(RESAVE_WORKER)
    out = tmp_path / "r.json"
    launch_local([str(worker), str(out), str(tmp_path / "ck")], 1, timeout=300)
    res = json.loads(out.read_text())
    # killed while deleting the older folder: before, the old folder was deleted in place before
    # the new one was renamed in, so the tracker was left on a half-deleted iter_0000002
    r = res["rmtree"]
    assert r["died"] and r["tracker"] == "2" and r["loaded"] == "new", r
    # killed between the renames: the tracker names iter_0000002, which is aside; the load puts
    # the complete older copy back (before: "... is missing")
    r = res["replace"]
    assert r["died"] and r["tracker"] == "2", r
    assert ".iter_0000002.old" in r["folders"] and "iter_0000002" not in r["folders"], r
    assert r["loaded"] == "first", r
    assert "iter_0000002" in r["after"] and ".iter_0000002.old" not in r["after"], r


def _pretrain_argv(out, **changes):
    names = ["ENV", "MEGATRON_PATH", "MEGATRON_PATCH_PATH", "MODEL_SIZE", "BATCH_SIZE",
             "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN", "EXTRA_VOCAB_SIZE", "PR", "TP", "PP",
             "AC", "DO", "FL", "SP", "SAVE_INTERVAL", "DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
             "TRAIN_TOKENS", "WARMUP_TOKENS", "OUTPUT_BASEPATH"]
    values = ["dsw", "-", "-", "tiny", "2", "4", "1e-3", "1e-4", "32", "0", "fp32", "1", "1",
              "none", "false", "false", "false", "2", "data", "none", "512", "128", str(out)]
    argv = dict(zip(names, values))
    argv.update(changes)
    return [argv[n] for n in names]


def _finetune_argv(out, **changes):
    names = ["ENV", "MEGATRON_PATH", "MEGATRON_PATCH_PATH", "MODEL_SIZE", "BATCH_SIZE", "LR",
             "MIN_LR", "SEQ_LEN", "PAD_LEN", "EXTRA_VOCAB_SIZE", "PR", "TP", "PP", "AC", "DO",
             "FL", "SP", "TRAIN_DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
             "EPOCH", "OUTPUT_BASEPATH"]
    values = ["dsw", "-", "-", "tiny", "2", "1e-3", "1e-4", "64", "64", "0", "fp32", "1", "1",
              "none", "false", "false", "false", "t.jsonl", "none", "none", "1", str(out)]
    argv = dict(zip(names, values))
    argv.update(changes)
    return [argv[n] for n in names]


def test_scripts_reject_bad_numbers_before_launch(tmp_path):
    out = tmp_path / "o"
    cases = [
        ("pretrain", _pretrain_argv(out, GLOBAL_BATCH_SIZE="0"), {},
         "GLOBAL_BATCH_SIZE must be a positive number, got '0'"),
        ("pretrain", _pretrain_argv(out, SEQ_LEN="-32"), {}, "SEQ_LEN must be a positive"),
        ("pretrain", _pretrain_argv(out, TRAIN_TOKENS="1e9"), {}, "TRAIN_TOKENS must be a positive"),
        ("pretrain", _pretrain_argv(out, SAVE_INTERVAL="-1"), {},
         "SAVE_INTERVAL must be a whole number >= 0, got '-1'"),
        ("pretrain", _pretrain_argv(out, WARMUP_TOKENS="x"), {}, "WARMUP_TOKENS must be a whole"),
        ("finetune", _finetune_argv(out, EPOCH="0"), {}, "EPOCH must be a positive number"),
        ("finetune", _finetune_argv(out, PAD_LEN="none"), {}, "PAD_LEN must be a positive"),
        ("finetune", _finetune_argv(out), {"GLOBAL_BATCH_SIZE": "0"},
         "GLOBAL_BATCH_SIZE must be a positive number, got '0'"),
        ("finetune", _finetune_argv(out), {"SAVE_INTERVAL": "x"}, "SAVE_INTERVAL must be a whole"),
    ]
    for kind, argv, env, message in cases:
        r = _run([_script(kind, "llama"), *argv], env=_env(**env), cwd=str(tmp_path))
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], \
            (kind, message, r.stdout + r.stderr)
    assert not out.exists()  # nothing was created or started
    r = _run([_script("pretrain", "llama"), "-h"])
    assert "SAVE_INTERVAL            iterations between checkpoints (0: one checkpoint at the end" \
        in r.stdout


def test_load_of_a_weights_only_checkpoint_starts_a_fresh_optimizer(tmp_path):
    """--load of a checkpoint without optimizer state (saved at --train-iters 0, or a converted
    release) was "error: optimizer" (legacy); now the optimizer starts afresh, as Megatron-LM does
    for release checkpoints, and the run equals the one from scratch."""
    def losses(log):
        return [json.loads(x)["lm_loss"] for x in (log / "metrics.jsonl").read_text().splitlines()]

    _pretrain("--log-dir", str(tmp_path / "ref"))
    for fmt in ("legacy", "torch_dist"):
        ck = str(tmp_path / fmt)
        _pretrain("--train-iters", "0", "--save", ck, "--ckpt-format", fmt)
        out = "".join(_pretrain("--load", ck, "--save", ck, "--ckpt-format", fmt,
                                "--log-dir", str(tmp_path / f"log_{fmt}")))
        assert "holds no optimizer state (weights only)" in out, out[-2000:]
        assert losses(tmp_path / f"log_{fmt}") == losses(tmp_path / "ref")


def test_sft_cut_names_pad_len_when_it_is_the_limit(tmp_path):
    """Rows are cut to min(--seq-length, --pad-len): a --pad-len below --seq-length is what cuts,
    and the message says so (it named --seq-length only)."""
    from data_fixtures import llama_model

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"query": "a long question " * 8, "response": "yes"}) + "\n"
                            for _ in range(4)))
    line, _ = _error(["-m", "megatron_patch.training.finetune", "--seq-length", "64",
                      "--pad-len", "8", "--tokenizer-model", llama_model(), "--train-data",
                      str(data), "--epochs", "1", "--micro-batch-size", "1",
                      "--global-batch-size", "1", "--num-layers", "1", "--hidden-size", "16",
                      "--num-attention-heads", "2"])
    assert "within --pad-len 8 (below --seq-length 64)" in line, line


def test_torch_dist_rng_restore_across_a_data_parallel_change(tmp_path, capsys):
    """A torch_dist checkpoint keeps one RNG file per global rank. Resumed with more data-parallel
    ranks, a new rank number used to find no file and silently kept its fresh seed. It now takes
    the state saved at the same TP and PP ranks (data-parallel ranks share every stream but the
    expert-parallel one, which stays its own), and says so when no saved rank had its TP/PP ranks."""
    import torch
    from megatron.core.tensor_parallel import random as mr

    import megatron_patch  # noqa: F401
    from megatron_patch.convert import layout
    from megatron_patch.training import checkpointing as C

    expert = mr.get_expert_parallel_rng_tracker_name()
    saved_cpu = torch.get_rng_state()
    tracker_before = mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED
    try:
        d = tmp_path / "iter_0000002"
        (d / "rng").mkdir(parents=True)
        mr.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
        torch.rand(5)
        with mr.get_cuda_rng_tracker().fork():
            torch.rand(3)  # the model-parallel stream moved on before the save
        saved = C.rng_state()
        layout.atomic_torch_save(saved, str(d / "rng" / "rank_00000_tp0_pp0.pt"))

        # rank 1 of the resumed run (data-parallel rank 1, expert-parallel rank 1)
        mr.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=1, etp_rank=0, force_reset_rng=True)
        own_expert = mr.get_cuda_rng_tracker().get_states()[expert].clone()
        used = C._restore_rng(str(d), rank=1, tp_rank=0, pp_rank=0, dp_rank=1)
        assert used == str(d / "rng" / "rank_00000_tp0_pp0.pt")
        now = mr.get_cuda_rng_tracker().get_states()
        assert torch.equal(now["model-parallel-rng"], saved["tracker"]["model-parallel-rng"])
        assert torch.equal(now["data-parallel-rng"], saved["tracker"]["data-parallel-rng"])
        assert torch.equal(torch.get_rng_state(), saved["torch"])
        assert torch.equal(now[expert], own_expert)
        assert not torch.equal(own_expert, saved["tracker"][expert])

        # its own file wins over rank 0's
        layout.atomic_torch_save(C.rng_state(), str(d / "rng" / "rank_00001_tp0_pp0.pt"))
        assert C._rng_file(str(d), 1, 0, 0).endswith("rank_00001_tp0_pp0.pt")
        # no saved rank at TP rank 1: a message (once per TP/PP pair), the seed stays
        capsys.readouterr()
        assert C._restore_rng(str(d), rank=3, tp_rank=1, pp_rank=0, dp_rank=0) is None
        assert "no RNG state for TP rank 1, PP rank 0" in capsys.readouterr().out
        assert C._restore_rng(str(d), rank=5, tp_rank=1, pp_rank=0, dp_rank=1) is None
        assert capsys.readouterr().out == ""
        # a checkpoint without RNG files (converted from HF): nothing to say
        (tmp_path / "converted").mkdir()
        assert C._restore_rng(str(tmp_path / "converted"), 0, 0, 0, 0) is None
        assert capsys.readouterr().out == ""
    finally:
        mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker_before
        torch.set_rng_state(saved_cpu)


def _world_of_one_env():
    """The environment of a process started alone: without the rendezvous variables that this
    pytest process set for its own world of one (its store holds that MASTER_PORT)."""
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    return {k: v for k, v in _env().items() if k not in rendezvous}


TIMEOUT_WORKER = r"""
import torch
from megatron.core import parallel_state as ps

import megatron_patch  # noqa: F401
from megatron_patch.rlhf.layouts import Layouts
from megatron_patch.training import engine
from megatron_patch.training.arguments import build_parser


def minutes(group):
    return int(group._get_backend(torch.device("cpu")).options._timeout.total_seconds() // 60)


args = build_parser().parse_args(["--seq-length", "8", "--micro-batch-size", "1",
                                  "--train-iters", "1", "--mock-data",
                                  "--distributed-timeout-minutes", "7"])
engine.initialize(args)
seen = [minutes(torch.distributed.distributed_c10d._get_default_group()),
        minutes(ps.get_tensor_model_parallel_group()), minutes(ps.get_data_parallel_group()),
        minutes(ps.get_pipeline_model_parallel_group())]
layouts = Layouts("first", timeout_minutes=9)  # an RLHF role's second layout
layouts.add(Layouts.key(1, 1))
with layouts.use(Layouts.key(1, 1)):
    seen.append(minutes(ps.get_tensor_model_parallel_group()))
print("TIMEOUTS", seen)
"""


def test_distributed_timeout_minutes_reaches_every_process_group(tmp_path):
    """``--distributed-timeout-minutes`` (Megatron-LM's flag; ours defaults to 30): the world's
    group, megatron-core's TP/DP/PP groups and the RLHF layouts' groups time out after it; a
    non-positive value is an argparse error."""
    import subprocess
    import sys

    from megatron_patch.training.arguments import build_parser

    worker = tmp_path / "worker.py"
    worker.write_text(TIMEOUT_WORKER)
    r = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=300,
                       env=_world_of_one_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TIMEOUTS [7, 7, 7, 7, 9]" in r.stdout, r.stdout
    assert build_parser().parse_args(["--seq-length", "8"]).distributed_timeout_minutes == 30
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--seq-length", "8", "--distributed-timeout-minutes", "0"])


def _schedule(*flags, world=1):
    from megatron_patch.training.arguments import build_parser, validate

    args = build_parser().parse_args(["--seq-length", "16", "--micro-batch-size", "2",
                                      "--global-batch-size", "8", "--mock-data", *flags])
    validate(args, world)
    return args.train_iters, args.lr_warmup_iters, args.lr_decay_iters


def test_sample_based_schedule_and_warmup_fraction():
    """Megatron-LM's sample-based flags and warmup fraction, derived as it derives them
    (samples / global batch; warmup = fraction x decay iterations), beside iterations and tokens;
    two ways of giving one quantity are one error naming both."""
    from megatron_patch.training.arguments import ArgumentError

    assert _schedule("--train-samples", "800") == (100, 0, 100)
    assert _schedule("--train-samples", "804", "--lr-warmup-samples", "80",
                     "--lr-decay-samples", "400") == (100, 10, 50)
    assert _schedule("--train-iters", "100", "--lr-warmup-fraction", "0.05") == (100, 5, 100)
    assert _schedule("--train-iters", "100", "--lr-decay-iters", "60",
                     "--lr-warmup-fraction", "0.1") == (100, 6, 60)
    assert _schedule("--train-tokens", str(8 * 16 * 30), "--lr-warmup-tokens",
                     str(8 * 16 * 3)) == (30, 3, 30)
    assert _schedule("--train-iters", "7", "--lr-warmup-iters", "2") == (7, 2, 7)
    for flags, named in ((["--train-iters", "5", "--train-samples", "40"],
                          "(got --train-iters, --train-samples)"),
                         (["--train-tokens", "999", "--train-samples", "40"],
                          "(got --train-samples, --train-tokens)"),
                         (["--train-iters", "5", "--lr-decay-iters", "4", "--lr-decay-samples", "8"],
                          "(got --lr-decay-iters, --lr-decay-samples)"),
                         (["--train-iters", "5", "--lr-warmup-samples", "8",
                           "--lr-warmup-fraction", "0.1"],
                          "(got --lr-warmup-samples, --lr-warmup-fraction)"),
                         (["--train-iters", "5", "--lr-warmup-iters", "1",
                           "--lr-warmup-fraction", "0.1"], "--lr-warmup-fraction")):
        with pytest.raises(ArgumentError) as e:
            _schedule(*flags)
        assert "give one of" in str(e.value) and named in str(e.value), str(e.value)
    with pytest.raises(ArgumentError, match="--train-iters, --train-samples or --train-tokens"):
        _schedule()


def test_train_samples_must_be_positive(tmp_path):
    line, _ = _error(["-m", "megatron_patch.training.pretrain", *TINY[:-2], "--train-samples",
                      "0"])
    assert line == "error: --train-samples must be positive, got 0"


BUSY_PORT_WORKER = r"""
import os
import socket

import torch.distributed as dist

from megatron_patch import platform

busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
port = busy.getsockname()[1]
platform.free_port = lambda: port  # the race: the port chosen beforehand was taken meanwhile
platform.init_process_group()
assert dist.get_world_size() == 1 and os.environ["MASTER_PORT"] != str(port)
dist.barrier()
print("WORLD OF ONE OK", os.environ["MASTER_PORT"])
"""


def test_world_of_one_never_races_for_its_port(tmp_path):
    """A process started without torchrun (a world of one) chose a free port, released it, then
    let the store bind it: another socket could take it in between (one CI run failed with
    EADDRINUSE). The store now binds port 0 itself; a port taken meanwhile cannot matter."""
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(BUSY_PORT_WORKER)
    r = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=300,
                       env=_world_of_one_env())
    assert r.returncode == 0 and "WORLD OF ONE OK" in r.stdout, r.stderr[-3000:]
