"""An MT-Bench run: answers from Megatron checkpoints -> judgments by an OpenAI-compatible judge ->
a Markdown score table (``toolkits/evaluation/mt_bench.py`` is the command line over ``main``).

Output folder::

    <out>/answers/<model>.jsonl           two-turn answers per question (cached per question id)
    <out>/judgments/<judge_model>.jsonl   one record per judged turn (cached, FAILED ones re-asked)
    <out>/mt_bench_table.md               the table printed at the end

Table: one row per model; the eight MT-Bench categories (Coding, Extraction, Humanities, Math,
Reasoning, Roleplay, STEM, Writing; any other category of the question file gets its own column
after them), each the mean of the turn scores of that category's questions ('-' when it has none);
``Avg`` the mean of all turn scores; ``Turn 1`` / ``Turn 2`` the means per turn (MT-Bench's first
and second turn scores); ``Failed`` the judgments that gave no score after every retry (they are
never counted as a score). With two or more models the best value of each score column is bold (ties
all bold; compared at the two decimals shown).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_patch.evaluation import answers as answers_mod
from megatron_patch.evaluation import judge as judge_mod
from megatron_patch.evaluation.questions import (CATEGORIES, REFERENCE_CATEGORIES,
                                                 EvaluationError, attach_references,
                                                 display_category, load_questions)

TABLE_FILE = "mt_bench_table.md"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------- table

@dataclasses.dataclass
class ModelScores:
    model: str
    by_category: Dict[str, List[float]] = dataclasses.field(default_factory=dict)  # key: lower
    by_turn: Dict[int, List[float]] = dataclasses.field(default_factory=dict)
    failed: int = 0
    missing: int = 0  # turns with an answer but no judgment yet (table-only runs)

    def add(self, category: str, turn: int, score: Optional[float]) -> None:
        if score is None:
            self.failed += 1
            return
        self.by_category.setdefault(category.strip().lower(), []).append(float(score))
        self.by_turn.setdefault(int(turn), []).append(float(score))

    @property
    def all_scores(self) -> List[float]:
        return [s for v in self.by_category.values() for s in v]


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def table_columns(rows: Sequence[ModelScores], categories: Sequence[str] = ()) -> List[str]:
    """Category keys in column order: the eight MT-Bench ones, then any others (sorted)."""
    extra = {c.strip().lower() for c in categories} | {c for r in rows for c in r.by_category}
    return list(CATEGORIES) + sorted(extra - set(CATEGORIES))


def render_table(rows: Sequence[ModelScores], categories: Sequence[str] = (),
                 turns: int = 2) -> str:
    """The Markdown table (see the module docstring)."""
    cats = table_columns(rows, categories)
    header = ["Model"] + [display_category(c) for c in cats] + ["Avg"] + \
        [f"Turn {t}" for t in range(1, turns + 1)] + ["Failed"]
    values: List[List[Optional[float]]] = []
    for r in rows:
        v = [_mean(r.by_category.get(c, [])) for c in cats] + [_mean(r.all_scores)]
        v += [_mean(r.by_turn.get(t, [])) for t in range(1, turns + 1)]
        values.append(v)
    shown = [[None if x is None else f"{x:.2f}" for x in v] for v in values]
    if len(rows) >= 2:
        for j in range(len(header) - 2):
            col = [float(s[j]) for s in shown if s[j] is not None]
            if not col:
                continue
            best = f"{max(col):.2f}"
            for s in shown:
                if s[j] == best:
                    s[j] = f"**{best}**"
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r, s in zip(rows, shown):
        cells = [r.model] + [x if x is not None else "-" for x in s] + [str(r.failed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect_scores(model: str, tasks: Sequence[judge_mod.Task],
                   cache: judge_mod.JudgmentCache) -> ModelScores:
    """Scores of one model from the cache: a task's latest record (a score or FAILED)."""
    ms = ModelScores(model)
    for t in tasks:
        rec = cache.records.get(t.key)
        if rec is None:
            ms.missing += 1
            continue
        ms.add(t.question.category, t.turn, rec.get("score"))
    return ms


# ----------------------------------------------------------------------------------- run

def parse_models(specs: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``NAME=CKPT`` or ``NAME`` (answers already in <out>/answers/NAME.jsonl)."""
    out, seen = [], set()
    for spec in specs:
        name, sep, ckpt = spec.partition("=")
        name = name.strip()
        if not MODEL_NAME.match(name):
            raise EvaluationError(f"--model {spec!r}: the name must be letters, digits, '.', '_' "
                                  "or '-' (it names the answer file)")
        if name in seen:
            raise EvaluationError(f"--model {name} is given twice")
        seen.add(name)
        if sep and not ckpt:
            raise EvaluationError(f"--model {spec!r}: no checkpoint after '='")
        out.append((name, ckpt or None))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mt_bench.py",
        description="MT-Bench: two-turn answers from Megatron checkpoints, graded 1-10 by a judge "
                    "behind an OpenAI-compatible endpoint, and a score table per category")
    p.add_argument("--question-file", required=True,
                   help="MT-Bench question jsonl (question_id, category, turns, [reference])")
    p.add_argument("--reference-file", default=None,
                   help="reference answers in the answer format (e.g. MT-Bench's "
                        "reference_answer/gpt-4.jsonl); replaces the questions' own 'reference'")
    p.add_argument("--out", "--output-dir", dest="out", required=True,
                   help="output folder (answers/, judgments/, mt_bench_table.md)")
    p.add_argument("--model", action="append", default=[], metavar="NAME[=CKPT]",
                   help="a model to evaluate (repeatable): NAME=CKPT generates the answers the "
                        "file lacks from a Megatron checkpoint; NAME alone uses "
                        "<out>/answers/NAME.jsonl. Default: every answer file in <out>/answers")
    p.add_argument("--mode", choices=("all", "answer", "judge", "table"), default="all",
                   help="all: answer + judge + table; answer: generate only (no judge needed); "
                        "judge: judge existing answers + table; table: from cached judgments only")
    g = p.add_argument_group("answer generation")
    g.add_argument("--tokenizer", default="-",
                   help="tokenizer folder / .model / TOKENIZER_PATH key; '-': the checkpoint's")
    g.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per answer turn")
    g.add_argument("--seq-length", type=int, default=0,
                   help="prompt + answer tokens (0: the model's max_position_embeddings)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--category-temperature", action="append", default=[], metavar="CAT=T",
                   help="temperature for one category (repeatable), e.g. writing=0.7")
    g.add_argument("--mt-bench-temperatures", action="store_true",
                   help="MT-Bench's per-category temperatures (writing/roleplay 0.7, stem/"
                        "humanities 0.1, others 0); --category-temperature overrides")
    g.add_argument("--system-prompt", default=None, help="a system message before turn 1")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    g.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel size for answer generation (run under torchrun with "
                        "TP x PP processes; rank 0 judges)")
    g.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    j = p.add_argument_group("judge (any OpenAI-compatible chat-completions endpoint)")
    j.add_argument("--judge-base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 "
                        "(default: $OPENAI_BASE_URL)")
    j.add_argument("--judge-model", default=None, help="the model name the endpoint serves")
    j.add_argument("--judge-api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY; none for a local server)")
    j.add_argument("--parallel", type=int, default=4, help="concurrent judge requests")
    j.add_argument("--judge-max-tokens", type=int, default=1024,
                   help="max_tokens of each judge request (0: not sent, the endpoint's default)")
    j.add_argument("--judge-temperature", type=float, default=0.0)
    j.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    j.add_argument("--judge-retries", type=int, default=4,
                   help="retries after the first try (HTTP errors, timeouts, no score)")
    j.add_argument("--judge-backoff", type=float, default=2.0,
                   help="seconds before the first retry, doubled each retry")
    j.add_argument("--judge-max-backoff", type=float, default=60.0)
    j.add_argument("--reference-categories", default=",".join(REFERENCE_CATEGORIES),
                   help="categories judged against the reference answer")
    return p


def _category_temperatures(args) -> Dict[str, float]:
    out = dict(answers_mod.MT_BENCH_TEMPERATURES) if args.mt_bench_temperatures else {}
    for spec in args.category_temperature:
        cat, sep, t = spec.partition("=")
        try:
            value = float(t)
        except ValueError:
            value = -1.0
        if not sep or not cat.strip() or value < 0:
            raise EvaluationError(f"--category-temperature {spec!r}: expected CATEGORY=T with "
                                  "T >= 0")
        out[cat.strip().lower()] = value
    return out


def _judge_config(args) -> judge_mod.JudgeConfig:
    # --mode table asks nothing: the judge model (which names the cache) is all it needs
    url = args.judge_base_url or ("http://unused" if args.mode == "table" else "")
    cfg = judge_mod.JudgeConfig(base_url=url, model=args.judge_model or "",
                                api_key=args.judge_api_key or None,
                                temperature=args.judge_temperature,
                                max_tokens=args.judge_max_tokens, timeout=args.judge_timeout,
                                retries=args.judge_retries, backoff=args.judge_backoff,
                                max_backoff=args.judge_max_backoff)
    judge_mod.check_config(cfg)
    return cfg


def _silent(*a, **k) -> None:
    pass


def run(args, log=print) -> dict:
    """The whole run (see the module docstring); returns {'table', 'rows', 'counts'}."""
    # every check before a model is loaded or a request is sent
    questions = load_questions(args.question_file)
    if args.reference_file:
        n = attach_references(questions, args.reference_file)
        log(f"references: {n} questions got a reference answer from {args.reference_file}")
    models = parse_models(args.model)
    for name, ckpt in models:
        if ckpt is not None and not os.path.isdir(ckpt):
            raise EvaluationError(f"model {name}: checkpoint folder {ckpt} does not exist")
    if min(args.batch_size, args.max_new_tokens, args.parallel, args.tp, args.pp) < 1:
        raise EvaluationError("--batch-size, --max-new-tokens, --parallel, --tp and --pp must be "
                              ">= 1")
    settings = answers_mod.GenerationSettings(
        tokenizer=args.tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        seq_length=args.seq_length, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, category_temperature=_category_temperatures(args),
        system_prompt=args.system_prompt, seed=args.seed, precision=args.precision,
        tp=args.tp, pp=args.pp)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        log = _silent  # the other ranks of a TP/PP launch only help generate
    if args.temperature < 0:
        raise EvaluationError("--temperature must be >= 0")
    cfg = None if args.mode == "answer" else _judge_config(args)
    answer_dir = os.path.join(args.out, "answers")
    if not models:
        found = sorted(glob.glob(os.path.join(answer_dir, "*.jsonl")))
        models = [(os.path.basename(f)[: -len(".jsonl")], None) for f in found]
        if not models:
            raise EvaluationError(f"no --model given and no answer files in {answer_dir}")
    if args.mode == "answer" and all(ckpt is None for _, ckpt in models):
        raise EvaluationError("--mode answer needs --model NAME=CKPT")

    # 1. answers
    if args.mode in ("all", "answer"):
        for name, ckpt in models:
            if ckpt is not None:
                answers_mod.generate_answers(name, ckpt, questions,
                                             os.path.join(answer_dir, f"{name}.jsonl"), settings,
                                             log=log)
    if args.mode == "answer" or rank != 0:
        return {"table": None, "rows": [], "counts": {}}
    per_model: Dict[str, Dict[str, List[str]]] = {}
    for name, _ in models:
        path = os.path.join(answer_dir, f"{name}.jsonl")
        got = answers_mod.load_answers(path)
        if not got:
            raise EvaluationError(f"model {name}: no answers in {path} (pass --model "
                                  f"{name}=CKPT to generate them)")
        n = sum(1 for q in questions if q.key in got)
        if n < len(questions):
            log(f"warning: model {name} has answers to {n} of {len(questions)} questions")
        short = [q.key for q in questions if q.key in got and len(got[q.key]) < len(q.turns)]
        if short:  # their later turns are judged by no one: say so, not a silently smaller mean
            log(f"warning: model {name} answers fewer turns than asked in {len(short)} questions "
                f"(ids {', '.join(short[:8])}{', ...' if len(short) > 8 else ''}): those turns "
                "are not judged (regenerate them: remove those records and pass --model "
                f"{name}=CKPT)")
        per_model[name] = got

    # 2. judgments
    ref_cats = [c.strip().lower() for c in args.reference_categories.split(",") if c.strip()]
    no_ref = [q.key for q in questions if q.category_key in ref_cats and not q.reference]
    if no_ref:
        log(f"warning: {len(no_ref)} questions of the reference categories have no reference "
            f"answer and are judged without one (ids {', '.join(no_ref[:8])}"
            f"{', ...' if len(no_ref) > 8 else ''})")
    cache = judge_mod.JudgmentCache(os.path.join(args.out, "judgments",
                                                 f"{judge_mod.safe_name(cfg.model)}.jsonl"))
    tasks = {name: judge_mod.make_tasks(name, questions, got, cfg.model, ref_cats)
             for name, got in per_model.items()}
    counts = {}
    try:
        if args.mode != "table":
            all_tasks = [t for ts in tasks.values() for t in ts]
            counts = judge_mod.run_judgments(cfg, all_tasks, cache, parallel=args.parallel,
                                             log=log)
            log(f"judge: {counts['cached']} cached, {counts['asked']} asked: "
                f"{counts['scored']} scored, {counts['failed']} failed")
    finally:
        cache.close()

    # 3. table
    rows = [collect_scores(name, ts, cache) for name, ts in tasks.items()]
    turns = max(len(q.turns) for q in questions)
    table = render_table(rows, [q.category for q in questions], turns)
    missing = sum(r.missing for r in rows)
    note = (f"\nJudge: {cfg.model}; {len(questions)} questions; scores are means of 1-10 turn "
            "ratings; Failed = judgments without a score after every retry (not counted).\n")
    if missing:
        note += f"{missing} answered turns have no judgment yet (run with --mode judge).\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, TABLE_FILE), "w", encoding="utf-8") as f:
        f.write(table + note)
    log(table + note.rstrip("\n"))
    return {"table": table, "rows": rows, "counts": counts}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        run(args, log=lambda *a, **k: print(*a, **k, flush=True))
        return 0

    from megatron_patch.cli import run_entry

    return run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
