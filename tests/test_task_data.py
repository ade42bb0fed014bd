"""Task data (pdss): configurable fields, and every bad input refused with one line."""

from __future__ import annotations

import json

import pytest

from common.cli import main
from common.data.loading import load_records
from common.data.task import TaskRecord, load_task, normalise_answer
from common.errors import DataError


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_jsonl_and_csv_with_user_fields(tmp_path):
    rows = [{"q": "Ann has 3 pens and buys 4. How many?", "a": 7, "why": "3 + 4 = 7"}, {"q": "x?", "a": "12.0"}]
    jsonl = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    got = load_task(jsonl, question_field="q", answer_field="a", rationale_field="why")
    assert got == [TaskRecord("Ann has 3 pens and buys 4. How many?", "7", "3 + 4 = 7"), TaskRecord("x?", "12.0")]
    csv = write(tmp_path, "t.csv", 'id,q,a\n1,"Ann has 3, buys 4",7\n')
    assert load_task(csv, question_field="q", answer_field="a") == [TaskRecord("Ann has 3, buys 4", "7")]


def test_normalised_exact_match():
    assert normalise_answer(" 1,200.0 ") == normalise_answer("1200") == "1200"
    assert normalise_answer("Cardiology.") == "cardiology"
    assert normalise_answer("7") != normalise_answer("17")


@pytest.mark.parametrize("name, content, expected", [
    ("t.jsonl", '{"question": "how many?"}\n', "line 1: missing field 'answer'"),
    ("t.jsonl", '{"question": "  ", "answer": "3"}\n', "line 1: field 'question' is empty"),
    ("t.jsonl", '{"question": "q", "answer": ""}\n{"question": "q", "answer": "1"}\n', "field 'answer' is empty"),
    ("t.jsonl", '{"question": "q", "answer": [1]}\n', "is an array"),
    ("t.csv", "question,answer\nhow many?,\n", "line 2: field 'answer' is empty"),
    ("t.csv", "question\nhow many?\n", "missing field 'answer'"),
    ("t.txt", "how many?\n", "must be JSONL or CSV"),
])
def test_bad_task_records(tmp_path, name, content, expected):
    assert expected in one_line_error(load_task, write(tmp_path, name, content))


@pytest.mark.parametrize("name, content", [
    ("a.jsonl", b'{"text": "fine"}\n{"text": "has a \x00 inside"}\n'),
    ("a.csv", b"text\nfine\nnul\x00here\n"),
    ("a.txt", b"one line\nanother \x00 line\n"),
    ("a.txt", b"\x7fELF\x02\x01\x01 binary\n"),
])
def test_binary_bytes_are_refused_by_every_loader(tmp_path, name, content):
    path = write(tmp_path, name, content)
    message = one_line_error(load_records, path)
    assert "binary file" in message and str(path) in message
    if name.endswith(".jsonl"):
        assert "line 2: a NUL byte" in message
        assert "binary file" in one_line_error(load_task, path, question_field="text", answer_field="text")


def test_tab_newline_and_escape_are_text(tmp_path):
    path = write(tmp_path, "a.txt", "col\tumn\r\n\x1b[1mbold\x1b[0m\n\fpage\n")
    assert len(load_records(path)) == 3


def test_data_check_refuses_nul_and_missing_answers(tmp_path, capsys):
    nul = write(tmp_path, "nul.jsonl", b'{"text": "a\x00b"}\n')
    assert main(["data", "check", str(nul)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NUL byte" in err
    tasks = write(tmp_path, "tasks.jsonl", '{"question": "q1", "answer": 1}\n{"question": "q2"}\n')
    assert main(["data", "check", str(tasks), "--field", "question", "--answer-field", "answer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2: missing field 'answer'" in err
    good = write(tmp_path, "good.jsonl", '{"question": "q1", "answer": 1}\n')
    assert main(["data", "check", str(good), "--field", "question", "--answer-field", "answer"]) == 0
