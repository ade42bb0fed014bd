"""Task records (question → answer, optionally a rationale) from a user's JSONL or CSV file.

The field names are settings (``question-field``, ``answer-field``, ``rationale-field``), so any
user's file works without a code change. A file is read by the same strict reader as every other
data file (``common.data.loading``: strict UTF-8, NUL/binary bytes refused); every problem is a
one-line ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.data.loading import _infer_format, _json_type, _lines, _read_text
from common.errors import DataError


@dataclass(frozen=True)
class TaskRecord:
    question: str
    answer: str
    rationale: str | None = None


def load_task(path, question_field: str = "question", answer_field: str = "answer",
              rationale_field: str = "rationale", fmt: str | None = None,
              max_file_bytes: int = 2_000_000_000) -> list[TaskRecord]:
    """The task records of a JSONL or CSV file; the rationale is optional (public data has it)."""
    path = Path(path)
    text = _read_text(path, max_file_bytes)
    fmt = fmt or _infer_format(path)
    if fmt not in ("jsonl", "csv"):
        raise DataError(f"{path}: task data must be JSONL or CSV (question and answer fields), not {fmt}")
    rows = _jsonl_rows(path, text) if fmt == "jsonl" else _csv_rows(path, text)
    records = [_record(where, row, question_field, answer_field, rationale_field) for where, row in rows]
    if not records:
        raise DataError(f"{path}: no task records; add at least one {{{question_field!r}, {answer_field!r}}} record")
    return records


def _record(where: str, row: dict, q_field: str, a_field: str, r_field: str) -> TaskRecord:
    for name in (q_field, a_field):
        if name not in row:
            keys = ", ".join(map(repr, list(row)[:10])) or "none"
            raise DataError(f"{where}: missing field {name!r} (fields: {keys}); add it or set "
                            f"{'question' if name == q_field else 'answer'}-field")
    question, answer = row[q_field], row[a_field]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = _number_text(answer)
    for name, value in ((q_field, question), (a_field, answer)):
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} is {_json_type(value)}, not a string or number")
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty; fill it in or remove the record")
    rationale = row.get(r_field) if r_field else None
    if rationale is not None and not isinstance(rationale, str):
        raise DataError(f"{where}: field {r_field!r} is {_json_type(rationale)}, not a string")
    return TaskRecord(question.strip(), answer.strip(), (rationale or "").strip() or None)


def _jsonl_rows(path: Path, text: str):
    for line_no, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{path}: line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: JSON value is {_json_type(obj)}, not an object")
        yield where, obj


def _csv_rows(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            yield f"{path}: line {reader.line_num}", {k.strip(): v for k, v in row.items() if k is not None and v is not None}
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({err}); check the quotes") from None


def _number_text(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+$")


def normalise_answer(text: str) -> str:
    """What exact match compares: trimmed, lower case, one space, no trailing period; a number
    loses its thousands commas and a zero fraction ("1,200.0" → "1200")."""
    s = " ".join(str(text).strip().lower().split()).rstrip(".")
    if _NUMBER.match(s):
        try:
            return _number_text(float(s.replace(",", "")))
        except ValueError:
            return s
    return s
