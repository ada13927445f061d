"""Batch text generation from a legacy Megatron checkpoint: ``python -m megatron_patch.generation.cli``
(run by ``examples/<family>/run_text_generation_megatron_<family>.sh`` under torchrun, TP x PP ranks).

Input: one prompt per line (text), or jsonl with a ``query`` key (chosen for ``*.jsonl`` files, or
when the first non-empty line is a JSON object with ``query``). Output, in input order:
- text in -> one completion per line; newlines inside a completion are written as the two
  characters ``\\n`` (backslash escaped as ``\\\\``) so that output line i belongs to input line i;
- jsonl in -> one JSON object per line: the input object plus ``response``.

Bad input: an empty (or blank) prompt is not sent to the model and gets an empty completion, so the
output always has as many lines as the input. Prompts longer than
``min(INPUT_SEQ_LEN, SEQ_LEN - OUTPUT_SEQ_LEN)`` tokens are cut from the left with a warning. A
missing input file, checkpoint or tokenizer ends the run with a one-line ``error: ...`` and exit 1.

Sampling (Megatron's conventions): ``--top-k 1`` or ``--temperature 0`` is greedy; ``--top-k 0
--top-p 0`` samples from the full (temperature-scaled) distribution; both filters may be set (k
first). Generation of a row stops at the tokenizer's eos, at any ``--stop`` string (the text is cut
before it), or after ``--out-seq-length`` tokens. ``--chat`` wraps each prompt as a user message in
the tokenizer's chat template (with the generation prompt) and also stops at end-of-turn tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

from megatron_patch.generation.text import decode_response  # noqa: F401 (cli.decode_response)

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<|user|>")


class InputError(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron_patch.generation.cli",
                                description="generate completions for a file of prompts")
    p.add_argument("--checkpoint", required=True, help="legacy Megatron checkpoint folder")
    p.add_argument("--tokenizer", default="-",
                   help="tokenizer folder / .model / TOKENIZER_PATH key; - or none: the checkpoint's")
    p.add_argument("--model-family", default=None,
                   help="family of the calling script: used when the checkpoint does not name one")
    p.add_argument("--model-size", default="auto", help="auto (config.json) or a family size preset")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--micro-batch-size", "--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=2048, help="prompt + generation tokens")
    p.add_argument("--input-seq-len", type=int, default=0,
                   help="longest prompt in tokens (0: SEQ_LEN - OUTPUT_SEQ_LEN)")
    p.add_argument("--out-seq-length", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--input-file", required=True)
    p.add_argument("--output-file", required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to prompts (auto: when the tokenizer would add it)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: fp32 on CPU, the checkpoint's dtype on GPU")
    p.add_argument("--flash", action=argparse.BooleanOptionalAction, default=True,
                   help="PyTorch scaled_dot_product_attention core attention where the family "
                        "allows it (default; ALiBi and sliding-window families keep their own)")
    return p


# ----------------------------------------------------------------------------------- input/output

def read_prompts(path: str) -> Tuple[List[str], Optional[List[dict]]]:
    """(prompt texts, the jsonl objects or None for a text file). Raises InputError."""
    if not os.path.isfile(path):
        raise InputError(f"input file {path} does not exist")
    try:
        # newline="": lines end at "\n" only (a CRLF's "\r" is dropped below); a lone "\r" inside
        # a line stays in its prompt instead of splitting it in two. utf-8-sig: a BOM is not text
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"input file {path} cannot be read: {e.strerror}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it is not an extra empty prompt
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    first = next((ln for ln in lines if ln.strip()), "")
    as_json = path.endswith(".jsonl")
    if not as_json and first.lstrip().startswith("{"):
        try:
            as_json = isinstance(json.loads(first), dict) and "query" in json.loads(first)
        except ValueError:
            as_json = False
    if not as_json:
        return lines, None
    objs, prompts = [], []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            objs.append({"query": ""})
            prompts.append("")
            continue
        try:
            o = json.loads(ln)
        except ValueError as e:
            raise InputError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(o, dict) or not isinstance(o.get("query"), str):
            keys = f" (its keys: {', '.join(map(str, o))})" if isinstance(o, dict) else ""
            raise InputError(f"{path}:{n}: expected an object with a string 'query'{keys}")
        objs.append(o)
        prompts.append(o.get("query", ""))
    return prompts, objs


# every character that str.splitlines() ends a line at, other than \n and \r: written as \xNN / \uNNNN
_LINE_BREAKS = {c: f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def escape_line(text: str) -> str:
    """One output line: backslash as \\\\, \n and \r as \\n and \\r, the other line breaks of
    ``str.splitlines`` (vertical tab, form feed, ..., U+2028) as \\xNN / \\uNNNN."""
    text = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
    if any(c in text for c in _LINE_BREAKS):
        text = "".join(_LINE_BREAKS.get(c, c) for c in text)
    return text


def write_outputs(path: str, responses: Sequence[str], objs: Optional[List[dict]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, r in enumerate(responses):
            if objs is None:
                f.write(escape_line(r) + "\n")
            else:
                f.write(json.dumps(dict(objs[i], response=r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- tokenization

def wants_bos(tokenizer, mode: str) -> bool:
    if mode != "auto":
        return mode == "yes"
    bos = getattr(tokenizer, "bos", None)
    if bos is None:
        return False
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode"):
        try:  # does the tokenizer.json post-processor add it?
            ids = backend.encode("a", add_special_tokens=True).ids
            return bool(ids) and ids[0] == bos
        except Exception:  # noqa: BLE001
            return False
    return getattr(tokenizer, "family", "") == "sentencepiece" or \
        type(tokenizer).__name__ == "SentencePieceTokenizer"


def fit_prompt(tokenizer, ids: Sequence[int], *, add_bos: bool, max_prompt: int, warn=print,
               index: int = 0) -> List[int]:
    """``ids`` with BOS in front (added with ``add_bos``, or kept where the ids start with it, a
    chat template's), cut from the left to ``max_prompt`` tokens (BOS stays, alone if nothing
    else fits: ``data.rl.cut_left``, as RL prompts are cut)."""
    from megatron_patch.data.rl import cut_left

    ids = list(ids)
    bos_id = getattr(tokenizer, "bos", None)
    if add_bos and bos_id is not None and not (ids and ids[0] == bos_id):
        ids = [bos_id] + ids
    if len(ids) > max_prompt:
        has_bos = bos_id is not None and ids[0] == bos_id
        room = max(max_prompt - int(has_bos), 0)
        warn(f"warning: prompt {index + 1} has {len(ids)} tokens, more than {max_prompt}: "
             f"keeping its last {room}" + (" after BOS" if has_bos else ""))
        ids = cut_left(ids, max_prompt, bos_id)
    return ids


def encode_prompts(tokenizer, texts: Sequence[str], *, chat: bool, add_bos: bool, max_prompt: int,
                   warn=print) -> List[List[int]]:
    """Token ids per prompt ([] for an empty prompt), cut from the left to ``max_prompt`` tokens
    (BOS, when added, is kept in front). With ``chat`` the ids come from the chat template
    itself (its special tokens are tokens, not their text)."""
    out = []
    for i, t in enumerate(texts):
        if not t.strip():
            out.append([])
            continue
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                add_generation_prompt=True, tokenize=True)
        else:
            ids = tokenizer.tokenize(t)
        out.append(fit_prompt(tokenizer, ids, add_bos=add_bos, max_prompt=max_prompt, warn=warn,
                              index=i))
    return out


def stop_token_ids(tokenizer, chat: bool) -> List[int]:
    ids = set()
    for name in ("eos", "eod"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    if chat:
        vocab = None
        try:
            vocab = tokenizer.vocab
        except Exception:  # noqa: BLE001
            pass
        for tok in END_OF_TURN:
            if vocab and tok in vocab:
                ids.add(int(vocab[tok]))
    return sorted(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ----------------------------------------------------------------------------------- run

def run(args, log=print) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_patch.generation import SamplingParams, generate

    from megatron_patch import platform
    from megatron_patch.generation.loader import (load_for_generation, load_tokenizer,
                                                  resolve_precision)

    if args.out_seq_length < 1:
        raise InputError("OUTPUT_SEQ_LEN must be >= 1")
    max_prompt = args.seq_length - args.out_seq_length
    if max_prompt < 1:
        raise InputError(f"SEQ_LEN {args.seq_length} leaves no room for a prompt before "
                         f"{args.out_seq_length} new tokens")
    if args.input_seq_len > 0:
        max_prompt = min(max_prompt, args.input_seq_len)
    # every check that needs no model before the model is loaded
    for name, value in (("BS (--micro-batch-size)", args.batch_size), ("TP", args.tp),
                        ("PP", args.pp)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if args.top_k < 0:
        raise InputError(f"TOP_K must be >= 0 (0: off, 1: greedy), got {args.top_k}")
    sampling = dict(max_new_tokens=args.out_seq_length, greedy=args.top_k == 1,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, return_logprobs=False)
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise InputError(f"sampling settings: {e}") from None
    if os.path.isdir(args.output_file):
        raise InputError(f"OUTPUT_FILE {args.output_file} is a folder")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    except OSError as e:
        raise InputError(f"OUTPUT_FILE {args.output_file}: cannot create its folder: "
                         f"{e.strerror}") from None
    texts, objs = read_prompts(args.input_file)
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint, args.tp)
    lm = load_for_generation(args.checkpoint, tp=args.tp, pp=args.pp, model_size=args.model_size,
                             family=args.model_family,
                             precision=resolve_precision(args.checkpoint, args.precision),
                             flash=args.flash, log=log)
    rank0 = dist.get_rank() == 0
    say = log if rank0 else (lambda *a, **k: None)
    if lm.max_position_embeddings and args.seq_length > lm.max_position_embeddings:
        say(f"warning: SEQ_LEN {args.seq_length} is above the model's "
            f"max_position_embeddings {lm.max_position_embeddings}")
    prompts = encode_prompts(tokenizer, texts, chat=args.chat,
                             add_bos=wants_bos(tokenizer, args.add_bos), max_prompt=max_prompt,
                             warn=lambda m: say(m, file=sys.stderr))
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]  # shell-friendly escapes
    params = SamplingParams(**sampling, stop_token_ids=stop_token_ids(tokenizer, args.chat))
    stop_ids = set(params.stop_token_ids)
    todo = sorted((i for i, p in enumerate(prompts) if p), key=lambda i: len(prompts[i]))
    responses = [""] * len(prompts)
    t0, n_tok = time.time(), 0
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = []

    for bi, start in enumerate(range(0, len(todo), args.batch_size)):
        if bi % dp != dp_rank:  # data-parallel replicas take turns
            continue
        idx = todo[start:start + args.batch_size]
        mine += idx
        batch = [prompts[i] for i in idx]

        def stop_fn(row, ids, batch=batch):  # the text as it will be written (decode_response)
            return cut_at_stop(decode_response(tokenizer, [] if args.chat else batch[row], ids),
                               stops)[1]

        params.seed = args.seed + bi
        out = generate(lm.model, batch, params, pad_id=int(tokenizer.pad or 0),
                       vocab_size=lm.vocab_size, stop_fn=stop_fn if stops else None)
        for r, i in enumerate(idx):
            ids = out.row(r)
            n_tok += len(ids)
            if ids and ids[-1] in stop_ids and out.finish_reasons[r] == "stop_token":
                ids = ids[:-1]
            # a chat response is the assistant's message (no leading space), a completion
            # continues its prompt's text
            text = decode_response(tokenizer, [] if args.chat else prompts[i], ids)
            responses[i] = cut_at_stop(text, stops)[0] if stops else text
    if dp > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {i: responses[i] for i in mine})
        for part in gathered:
            for i, r in part.items():
                responses[i] = r
        t = torch.tensor([n_tok], dtype=torch.long, device=platform.current_device())
        dist.all_reduce(t)
        n_tok = int(t.item()) // (args.tp * args.pp)  # every rank of a replica counted its rows
    dt = time.time() - t0
    if rank0:
        write_outputs(args.output_file, responses, objs)
    say(f"generated {n_tok} tokens for {len(todo)} prompts ({len(prompts) - len(todo)} empty) in "
        f"{dt:.2f}s ({n_tok / max(dt, 1e-9):.1f} tokens/s) at TP={args.tp} PP={args.pp}; "
        f"wrote {args.output_file}")
    if dist.is_initialized():
        dist.barrier()
    return {"tokens": n_tok, "seconds": dt, "prompts": len(prompts)}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import megatron_patch  # noqa: F401  (patches before megatron is used)
    from megatron_patch.generation.loader import GenerationSetupError

    try:
        run(args)
    except (InputError, GenerationSetupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
