"""Loading and validating private text files: happy paths, one test per bad input, the CLI path."""

import json
import sys

import pytest

from common.cli import main
from common.data import Record, load_records, summarize
from common.errors import DataError, UserError


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, UserError)
    return message


# ---------------------------------------------------------------------------- happy paths


def test_jsonl(tmp_path):
    rows = [{"text": "card declined at the store", "label": "card"}, {"text": "fee on my statement"}]
    path = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_records(path) == [Record("card declined at the store", "card"), Record("fee on my statement")]


def test_jsonl_custom_fields_and_raw_line_separator(tmp_path):
    # U+2028 is legal raw inside a JSON string: it must not split the record
    path = write(tmp_path, "a.json", '{"body": "one\u2028two", "y": 3}\n')
    assert load_records(path, field="body", label_field="y") == [Record("one\u2028two", "3")]


def test_csv(tmp_path):
    path = write(tmp_path, "a.csv", 'id,text,label\n1,"hello, world",greet\n2,"two\nlines",\n')
    assert load_records(path) == [Record("hello, world", "greet"), Record("two\nlines", None)]


def test_txt_line_mode(tmp_path):
    path = write(tmp_path, "a.txt", "first record\n\n  second record  \r\nthird\n")
    assert [r.text for r in load_records(path)] == ["first record", "second record", "third"]


def test_txt_block_mode(tmp_path):
    path = write(tmp_path, "a.txt", "\nnote one\ncontinues\n\n\n\nnote two\n  \nnote three")
    texts = [r.text for r in load_records(path, txt_mode="block")]
    assert texts == ["note one\ncontinues", "note two", "note three"]


def test_utf8_bom_is_not_content(tmp_path):
    path = write(tmp_path, "a.txt", b"\xef\xbb\xbfhello\n")
    assert load_records(path) == [Record("hello")]


def test_summary_numbers(tmp_path):
    lengths = list(range(1, 11))  # records of 1..10 words
    rows = [{"text": " ".join(["w"] * n), "label": "a" if n <= 7 else "b"} for n in lengths]
    path = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(load_records(path))
    assert summary == {"records": 10, "tokens": 55, "p50": 5, "p90": 9, "p99": 10, "max": 10,
                       "labels": {"a": 7, "b": 3}}


def test_summary_with_a_tokenizer():
    class CharTokenizer:  # the transformers calling convention: batch in, input_ids out
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [list(t) for t in texts]}

    summary = summarize([Record("abc"), Record("de")], CharTokenizer())
    assert (summary["tokens"], summary["max"], summary["labels"]) == (5, 3, {})


# ---------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "no such file" in message


def test_directory(tmp_path):
    message = error_of(tmp_path)
    assert str(tmp_path) in message and "directory" in message


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"])
def test_empty_file(tmp_path, content):
    message = error_of(write(tmp_path, "a.jsonl", content))
    assert "a.jsonl" in message and ("empty" in message or "only whitespace" in message)


def test_empty_record_jsonl(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "ok"}\n{"text": "   "}\n')
    message = error_of(path)
    assert "a.jsonl: line 2" in message and "empty record" in message


def test_empty_record_csv(tmp_path):
    path = write(tmp_path, "a.csv", "text,label\nfine,x\n,y\n")
    message = error_of(path)
    assert "a.csv: line 3" in message and "empty record" in message


def test_record_over_size(tmp_path):
    path = write(tmp_path, "a.txt", "short\n" + "x" * 101 + "\n")
    message = error_of(path, max_record_bytes=100)
    assert "a.txt: line 2" in message and "101 bytes" in message and "100" in message


def test_file_over_size(tmp_path):
    path = write(tmp_path, "a.txt", "x" * 50)
    message = error_of(path, max_file_bytes=10)
    assert "a.txt" in message and "50 bytes" in message and "split" in message


def test_non_utf8_gives_offset_and_line(tmp_path):
    content = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    path = write(tmp_path, "a.jsonl", content)
    message = error_of(path)
    offset = content.index(b"\xe9")
    assert f"byte offset {offset}" in message and "a.jsonl: line 2" in message and "UTF-8" in message


def test_malformed_json_line(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",\n')
    message = error_of(path)
    assert "a.jsonl: line 3" in message and "malformed JSON" in message


def test_json_line_not_an_object(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n["text", "b"]\n')
    message = error_of(path)
    assert "a.jsonl: line 2" in message and "an array, not an object" in message


def test_missing_field(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    message = error_of(path)
    assert "a.jsonl: line 2" in message and "missing field 'text'" in message and "'body'" in message


def test_text_field_not_a_string(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": 12}\n')
    message = error_of(path)
    assert "a.jsonl: line 1" in message and "not a string" in message


def test_missing_csv_column_lists_columns(tmp_path):
    path = write(tmp_path, "a.csv", "body,category\nhello,x\n")
    message = error_of(path)
    assert "a.csv" in message and "no column 'text'" in message and "'body', 'category'" in message


def test_csv_unterminated_quote(tmp_path):
    path = write(tmp_path, "a.csv", 'text,label\nfine,x\n"never closed,y\nmore\n')
    message = error_of(path)
    assert "a.csv: line 3" in message and "malformed CSV" in message


def test_csv_file_read_as_jsonl(tmp_path):
    path = write(tmp_path, "a.jsonl", "text,label\nhello,x\n")
    message = error_of(path)
    assert "a.jsonl: line 1" in message and "looks like CSV" in message and "--format csv" in message


def test_plain_text_read_as_jsonl(tmp_path):
    path = write(tmp_path, "a.jsonl", "just some notes\n")
    message = error_of(path)
    assert "looks like plain text" in message and "--format txt" in message


def test_jsonl_file_read_as_csv(tmp_path):
    path = write(tmp_path, "a.csv", '{"text": "a"}\n')
    message = error_of(path)
    assert "a.csv: line 1" in message and "looks like JSON Lines" in message and "--format jsonl" in message


def test_jsonl_file_read_as_csv_by_explicit_format(tmp_path):
    path = write(tmp_path, "data.dat", '\n{"text": "a"}\n')
    message = error_of(path, fmt="csv")
    assert "data.dat: line 2" in message and "--format jsonl" in message


def test_unknown_suffix_asks_for_format(tmp_path):
    message = error_of(write(tmp_path, "a.dat", "hello\n"))
    assert "a.dat" in message and "--format" in message


def test_datasets_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"pip install privdistill\[datasets\]"):
        load_records("imdb:test", fmt="datasets")


# ---------------------------------------------------------------------------- the CLI path


def run_cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "ok"}\n{"text": "\xff"}\n', "byte offset 25"),
    (b'{"text": "ok"}\n{"text": }\n', "line 2: malformed JSON"),
])
def test_cli_reports_one_line_and_exits_2(tmp_path, capsys, content, expected):
    path = write(tmp_path, "bad.jsonl", content)
    rc, out, err = run_cli(capsys, ["data", "check", str(path)])
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err and "bad.jsonl" in err
    assert "Traceback" not in out + err


def test_cli_check_prints_summary(tmp_path, capsys):
    path = write(tmp_path, "good.csv", "text,label\na b c,x\nd e,y\n")
    rc, out, err = run_cli(capsys, ["data", "check", str(path)])
    assert rc == 0 and err == ""
    assert "records" in out and "x: 1" in out
