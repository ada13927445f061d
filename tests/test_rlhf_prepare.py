"""examples/rlhf/sft_rm_model_prepare.sh on tiny fake checkpoint folders (no training):

the four target folders hold the sources' layout as hard links (same inode, same content), the
sources are unchanged; COPY_MODE=copy and the cp -a fallback (a cp that cannot link) give
independent copies; usage on -h / a wrong argument count and every refusal exit 2 with one line,
before anything is written.
"""
import json
import os
import stat
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "rlhf", "sft_rm_model_prepare.sh")
TARGETS = {"sft": ("sft_train", "sft_pred"), "rm": ("rw_train", "rw_pred")}


def fake_checkpoint(root, family, reward=False, release=False):
    """A legacy Megatron checkpoint folder as the training entry points write it."""
    it = "release" if release else "iter_0000001"
    os.makedirs(os.path.join(root, it, "mp_rank_00"))
    torch.save({"iteration": 1, "model": {"w": torch.arange(4.0)}},
               os.path.join(root, it, "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release" if release else "1")
    with open(os.path.join(root, "megatron_patch.json"), "w") as f:
        json.dump({"family": family, "reward_model": reward}, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": family}, f)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write("{}")
    return root


def snapshot(root):
    """{relative path: (bytes, mode)} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), stat.S_IMODE(os.stat(p).st_mode))
    return out


def run(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "COPY_MODE"}
    full.update(env or {})
    return subprocess.run(["bash", SCRIPT, *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=60)


@pytest.fixture
def sources(tmp_path):
    rm = fake_checkpoint(str(tmp_path / "step2" / "rm"), "llama", reward=True)
    sft = fake_checkpoint(str(tmp_path / "step1" / "sft"), "llama", release=True)
    return rm, sft


def check_targets(tmp_path, rm, sft, linked):
    for kind, src in (("rm", rm), ("sft", sft)):
        want = snapshot(src)
        for name in TARGETS[kind]:
            dst = tmp_path / f"target_{kind}" / name
            assert snapshot(str(dst)) == want, dst
            for rel in want:
                same = os.path.samefile(os.path.join(src, rel), os.path.join(dst, rel))
                assert same == linked, (dst, rel)
    ckpt = torch.load(str(tmp_path / "target_sft" / "sft_pred" / "release" / "mp_rank_00"
                          / "model_optim_rng.pt"), weights_only=False)
    assert torch.equal(ckpt["model"]["w"], torch.arange(4.0))


def test_hard_links_of_the_sources(tmp_path, sources):
    rm, sft = sources
    before = snapshot(str(tmp_path / "step1")), snapshot(str(tmp_path / "step2"))
    (tmp_path / "target_sft").mkdir()  # an existing target parent is fine
    (tmp_path / "target_rm" / "rw_pred").mkdir(parents=True)  # and so is an empty target
    r = run(rm, sft, tmp_path / "target_rm", tmp_path / "target_sft")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("hard links to") == 4 and "POLICY_LOAD=" in r.stdout
    check_targets(tmp_path, rm, sft, linked=True)
    assert sorted(os.listdir(tmp_path / "target_sft")) == ["sft_pred", "sft_train"]
    assert sorted(os.listdir(tmp_path / "target_rm")) == ["rw_pred", "rw_train"]
    assert (snapshot(str(tmp_path / "step1")), snapshot(str(tmp_path / "step2"))) == before
    # a second run refuses: the targets are not empty any more
    r = run(rm, sft, tmp_path / "target_rm", tmp_path / "target_sft")
    assert r.returncode == 2 and "already exists and is not empty" in r.stderr


def test_copy_mode_and_fallback_copy(tmp_path, sources):
    rm, sft = sources
    r = run(rm, sft, tmp_path / "target_rm", tmp_path / "target_sft", env={"COPY_MODE": "copy"})
    assert r.returncode == 0, r.stderr
    check_targets(tmp_path, rm, sft, linked=False)
    # a cp that cannot make hard links (as across file systems): cp -a, with a note
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cp").write_text('#!/bin/bash\nfor a in "$@"; do [ "$a" = -al ] && '
                                '{ echo "cp: cannot create hard link: Invalid cross-device link" '
                                '>&2; exit 1; }; done\nexec /bin/cp "$@"\n')
    (bin_dir / "cp").chmod(0o755)
    for kind in TARGETS:
        subprocess.run(["rm", "-rf", str(tmp_path / f"target_{kind}")], check=True)
    r = run(rm, sft, tmp_path / "target_rm", tmp_path / "target_sft",
            env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("note:") == 4 and "copying with cp -a" in r.stderr
    check_targets(tmp_path, rm, sft, linked=False)


def test_usage(tmp_path):
    for args in (["-h"], ["--help"]):
        r = run(*args)
        assert r.returncode == 2 and r.stdout.startswith("usage: sft_rm_model_prepare.sh ")
        assert "SOURCE_RM SOURCE_SFT TARGET_RM TARGET_SFT" in r.stdout
    for args in ([], ["a", "b", "c"], ["a", "b", "c", "d", "e"]):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith(f"error: expected 4 arguments, got "
                                                         f"{len(args)}")


def test_refusals_write_nothing(tmp_path, sources):
    rm, sft = sources
    not_ckpt = tmp_path / "not_ckpt"
    (not_ckpt / "iter_0000001").mkdir(parents=True)
    full = tmp_path / "full"
    (full / "sft_pred").mkdir(parents=True)
    (full / "sft_pred" / "x").write_text("keep me")
    cases = [
        ((not_ckpt, sft, tmp_path / "t_rm", tmp_path / "t_sft"),
         f"SOURCE_RM {not_ckpt} is not a Megatron checkpoint folder"),
        ((rm, tmp_path / "missing", tmp_path / "t_rm", tmp_path / "t_sft"),
         f"SOURCE_SFT {tmp_path / 'missing'} is not a folder"),
        ((rm, sft, tmp_path / "t_rm", full),
         f"target {full / 'sft_pred'} already exists and is not empty"),
        ((rm, sft, rm, tmp_path / "t_sft"), f"target {rm}/rw_train is inside SOURCE_RM"),
        # a target that is a file: refused before the other target's folders are made
        ((rm, sft, tmp_path / "a_file", tmp_path / "t_sft"),
         f"cannot create target {tmp_path / 'a_file' / 'rw_train'}: {tmp_path / 'a_file'} is "
         "not a folder"),
        ((rm, sft, tmp_path / "a_file" / "deeper", tmp_path / "t_sft"),
         f"{tmp_path / 'a_file'} is not a folder"),
        ((rm, sft, tmp_path / "t_rm", tmp_path / "t_sft"), None),
    ]
    (tmp_path / "a_file").write_text("not a folder")
    before = snapshot(str(tmp_path))
    for args, expected in cases[:-1]:
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
        assert snapshot(str(tmp_path)) == before  # nothing written, the sources untouched
        assert not (tmp_path / "t_rm").exists() and not (tmp_path / "t_sft").exists()
    r = run(*cases[-1][0], env={"COPY_MODE": "symlink"})
    assert r.returncode == 2 and "COPY_MODE must be link or copy" in r.stderr
