"""Command line over the conversion engine; the toolkits' shell and Python entry points call this.

    python -m megatron_patch.convert.cli auto SOURCE TARGET TP PP MG2HF      (the 6-argument form)
    python -m megatron_patch.convert.cli hf2mg --load-dir HF --save-dir MG [--tp --pp --ep ...]
    python -m megatron_patch.convert.cli mg2hf --load-dir MG --save-dir HF [--dtype bf16]
    python -m megatron_patch.convert.cli reshard --load-dir MG --save-dir MG2 --target-tp 2 --target-pp 1

``auto`` with MG2HF=false converts HF -> Megatron, or reshards when SOURCE already is a Megatron
checkpoint; MG2HF=true converts Megatron -> HF (TP/PP are read from the checkpoint and ignored).
Environment: ``EXTRA_VOCAB_SIZE`` (HF -> Megatron), ``EP`` (expert parallel size),
``CONVERT_DTYPE`` (fp32/fp16/bf16 of the written weights), ``FAMILY`` (force a family).
Exit status: 0 on success, 1 on a conversion error (message on stderr), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _is_megatron(path: str) -> bool:
    from megatron_patch.convert import layout

    return layout.has_checkpoint(path)


def _bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "mg2hf"):
        return True
    if v in ("false", "0", "no", "hf2mg"):
        return False
    raise argparse.ArgumentTypeError(f"MG2HF must be true or false, got {s!r}")


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_patch.convert.cli",
                                description="HF <-> Megatron checkpoint conversion")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("auto", help="the 6-argument form of the shell script")
    a.add_argument("source")
    a.add_argument("target")
    a.add_argument("tp", type=_positive)
    a.add_argument("pp", type=_positive)
    a.add_argument("mg2hf", type=_bool)
    a.add_argument("--reward", action="store_true", help="require a reward model")
    a.add_argument("--family", default=os.environ.get("FAMILY") or None)
    for name in ("hf2mg", "mg2hf", "reshard"):
        s = sub.add_parser(name)
        s.add_argument("--load-dir", "--load_dir", "--load-path", "--load_path", dest="load",
                       required=True)
        s.add_argument("--save-dir", "--save_dir", "--save-path", "--save_path", dest="save",
                       required=True)
        s.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
        s.add_argument("--overwrite", action="store_true")
        if name != "mg2hf":
            s.add_argument("--target-tp", "--tp", "--target-tensor-parallel-size", dest="tp",
                           type=_positive, default=1)
            s.add_argument("--target-pp", "--pp", "--target-pipeline-parallel-size", dest="pp",
                           type=_positive, default=1)
            s.add_argument("--target-ep", "--ep", dest="ep", type=_positive, default=1)
            s.add_argument("--make-vocab-size-divisible-by", dest="divisible_by", type=int,
                           default=None)
        if name == "hf2mg":
            s.add_argument("--extra-vocab-size", dest="extra_vocab_size", type=int, default=0)
            s.add_argument("--family", default=None)
        if name == "mg2hf":
            s.add_argument("--max-shard-size", dest="max_shard", default="2GB")
    return p


def _size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer environment variable, checked (one error line instead of a traceback)."""
    from megatron_patch.convert.rules import ConversionError

    raw = os.environ.get(name, "").strip() or str(default)
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise ConversionError(f"{name} must be an integer >= {minimum}, got {raw!r}")
    return v


def run(args) -> None:
    from megatron_patch.convert import engine

    # an explicit --dtype wins over the environment's CONVERT_DTYPE
    dtype = getattr(args, "dtype", None) or os.environ.get("CONVERT_DTYPE") or None
    if args.cmd == "auto":
        if args.mg2hf:
            if not _is_megatron(args.source):
                raise engine.ConversionError(f"{args.source} is not a Megatron checkpoint (no "
                                             "latest_checkpointed_iteration.txt)")
            res = engine.megatron_to_hf(args.source, args.target, dtype=dtype)
            if args.reward and not res["reward_model"]:
                print("warning: the checkpoint is not a reward model", file=sys.stderr)
        elif _is_megatron(args.source):
            engine.reshard(args.source, args.target, tp=args.tp, pp=args.pp,
                           ep=_env_int("EP", 1, 1), dtype=dtype)
        else:
            if args.reward:
                from megatron_patch.convert import hf_io

                reader = hf_io.HFReader(args.source)
                if engine.detect_reward(hf_io.read_config(args.source), reader.names()) is None:
                    raise engine.ConversionError(
                        f"{args.source} is not a reward model (no score or v_head weights)")
            engine.hf_to_megatron(args.source, args.target, tp=args.tp, pp=args.pp,
                                  ep=_env_int("EP", 1, 1),
                                  extra_vocab_size=_env_int("EXTRA_VOCAB_SIZE", 0, 0),
                                  dtype=dtype, family=args.family)
    elif args.cmd == "hf2mg":
        engine.hf_to_megatron(args.load, args.save, tp=args.tp, pp=args.pp, ep=args.ep,
                              extra_vocab_size=args.extra_vocab_size, dtype=dtype,
                              divisible_by=args.divisible_by or 128, family=args.family,
                              overwrite=args.overwrite)
    elif args.cmd == "mg2hf":
        engine.megatron_to_hf(args.load, args.save, dtype=dtype, overwrite=args.overwrite,
                              max_shard_bytes=_size(args.max_shard))
    else:
        engine.reshard(args.load, args.save, tp=args.tp, pp=args.pp, ep=args.ep, dtype=dtype,
                       divisible_by=args.divisible_by, overwrite=args.overwrite)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_patch.convert.rules import ConversionError

    try:
        run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # unreadable files, corrupt JSON, bad sizes: one line
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
