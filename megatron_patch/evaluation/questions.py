"""MT-Bench question files: read, check, attach reference answers.

A question file is jsonl, one question per line (blank lines are skipped):
``{"question_id": 81, "category": "writing", "turns": ["first user message", "second user message"],
"reference": ["answer to turn 1", "answer to turn 2"]}``. ``question_id`` is an integer or a string,
unique in the file; ``category`` a non-empty string (matched case-insensitively); ``turns`` one or
two non-empty strings; ``reference`` (optional) at most as many strings as turns. Any problem is an
``EvaluationError`` naming ``file:line``.

Reference answers may also come from a separate file in the answer format (as MT-Bench ships them in
``reference_answer/gpt-4.jsonl``): ``{"question_id": .., "choices": [{"turns": [..]}]}`` or
``{"question_id": .., "turns": [..]}``; they replace a question's own ``reference``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Union

# the eight MT-Bench categories, in the table's column order, with their display names
CATEGORIES = {"coding": "Coding", "extraction": "Extraction", "humanities": "Humanities",
              "math": "Math", "reasoning": "Reasoning", "roleplay": "Roleplay", "stem": "STEM",
              "writing": "Writing"}
# categories whose judge prompt includes the reference answer (MT-Bench's protocol)
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
MAX_TURNS = 2


class EvaluationError(ValueError):
    """Bad input (question file, answers, checkpoint, judge settings): one ``error:`` line and
    exit 2 on the command line."""


@dataclasses.dataclass
class Question:
    question_id: Union[int, str]
    category: str  # as written in the file
    turns: List[str]
    reference: Optional[List[str]] = None

    @property
    def key(self) -> str:
        """The id as a string: how answers and judgments are matched (files may differ in type)."""
        return str(self.question_id)

    @property
    def category_key(self) -> str:
        return self.category.strip().lower()


def _read_jsonl(path: str, what: str):
    """(line number, object) per non-blank line; EvaluationError on a missing file or bad line."""
    if not os.path.isfile(path):
        raise EvaluationError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise EvaluationError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise EvaluationError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def _strings(value, where: str, name: str, lo: int, hi: int) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise EvaluationError(f"{where}: '{name}' must be a list of strings")
    if not lo <= len(value) <= hi:
        raise EvaluationError(f"{where}: '{name}' has {len(value)} entries (expected "
                              f"{lo if lo == hi else f'{lo} to {hi}'})")
    return list(value)


def _check_id(obj: dict, where: str) -> Union[int, str]:
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise EvaluationError(f"{where}: 'question_id' must be an integer or a non-empty string")
    return qid


def load_questions(path: str) -> List[Question]:
    """The questions of an MT-Bench jsonl file, in file order (see the module docstring)."""
    out: List[Question] = []
    seen: Dict[str, int] = {}
    for n, obj in _read_jsonl(path, "question file"):
        where = f"{path}:{n}"
        qid = _check_id(obj, where)
        if str(qid) in seen:
            raise EvaluationError(f"{where}: duplicate question_id {qid!r} (first on line "
                                  f"{seen[str(qid)]})")
        seen[str(qid)] = n
        cat = obj.get("category")
        if not isinstance(cat, str) or not cat.strip():
            raise EvaluationError(f"{where}: 'category' must be a non-empty string")
        turns = _strings(obj.get("turns"), where, "turns", 1, MAX_TURNS)
        if any(not t.strip() for t in turns):
            raise EvaluationError(f"{where}: 'turns' has an empty message")
        ref = obj.get("reference")
        if ref is not None:
            ref = _strings(ref, where, "reference", 1, len(turns))
        out.append(Question(qid, cat, turns, ref))
    if not out:
        raise EvaluationError(f"question file {path} has no questions")
    return out


def answer_turns(obj: dict, where: str) -> List[str]:
    """The turns of an answer-format record (``choices[0].turns`` or ``turns``)."""
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return _strings(choices[0].get("turns"), where, "choices[0].turns", 1, MAX_TURNS)
    return _strings(obj.get("turns"), where, "turns", 1, MAX_TURNS)


def attach_references(questions: List[Question], path: str) -> int:
    """Set ``reference`` from an answer-format file; returns how many questions got one. Ids not
    in the question list are ignored."""
    by_id = {q.key: q for q in questions}
    n_set = 0
    for n, obj in _read_jsonl(path, "reference file"):
        where = f"{path}:{n}"
        qid = _check_id(obj, where)
        q = by_id.get(str(qid))
        if q is None:
            continue
        turns = answer_turns(obj, where)
        q.reference = turns[: len(q.turns)]
        n_set += 1
    return n_set


def display_category(key: str) -> str:
    return CATEGORIES.get(key, key.title())
