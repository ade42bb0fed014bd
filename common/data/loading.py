"""Load private text records from JSONL / CSV / plain text files (or a `datasets` id) and check them.

Every problem a user can cause raises ``DataError`` with one line that names the file, the
line (1-based), what is wrong and how to fix it. A file is read once as bytes and decoded
strictly, so a bad byte is reported at its offset instead of being silently replaced.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError

FORMATS = ("jsonl", "csv", "txt", "datasets")
TXT_MODES = ("line", "block")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "txt"}


@dataclass(frozen=True)
class Record:
    text: str
    label: str | None = None


def load_records(
    path,
    fmt: str | None = None,
    field: str = "text",
    label_field: str | None = "label",
    txt_mode: str = "line",
    max_record_bytes: int = 100_000,
    max_file_bytes: int = 2_000_000_000,
) -> list[Record]:
    """Load the records of ``path``; ``fmt`` is inferred from the suffix when None."""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if txt_mode not in TXT_MODES:
        raise DataError(f"{path}: unknown txt mode {txt_mode!r}; use 'line' or 'block'")
    if fmt == "datasets":
        return _load_hf_dataset(str(path), field, label_field, max_record_bytes)

    path = Path(path)
    text = _read_text(path, max_file_bytes)
    fmt = fmt or _infer_format(path)
    if fmt == "jsonl":
        return _parse_jsonl(path, text, field, label_field, max_record_bytes)
    if fmt == "csv":
        return _parse_csv(path, text, field, label_field, max_record_bytes)
    return _parse_txt(path, text, txt_mode, max_record_bytes)


def summarize(records, tokenizer=None) -> dict:
    """Counts and token-length percentiles (nearest rank) of ``records``.

    Tokens are the tokenizer's count (no special tokens) when one is given, else
    whitespace-separated words.
    """
    texts = [r.text for r in records]
    lengths = np.asarray(_token_lengths(texts, tokenizer), dtype=np.int64)
    labels = Counter(r.label for r in records if r.label is not None)

    def pct(q):  # "inverted_cdf" is the nearest-rank percentile: always an observed length
        return int(np.percentile(lengths, q, method="inverted_cdf")) if len(lengths) else 0

    return {
        "records": len(texts),
        "tokens": int(lengths.sum()),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": int(lengths.max()) if len(lengths) else 0,
        "labels": dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# ---------------------------------------------------------------------------- reading


def _read_text(path: Path, max_file_bytes: int) -> str:
    if not path.exists():
        raise DataError(
            f"{path}: no such file; check the path "
            "(for a Hugging Face data set id pass --format datasets)"
        )
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file; pass the path of one data file inside it")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise DataError(
            f"{path}: file is {size:,} bytes, over the limit of {max_file_bytes:,}; "
            "split it into several smaller files"
        )
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); write at least one record into it")
    raw = path.read_bytes()
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark (Excel, Notepad) is not content
    try:
        text = raw[bom:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as err:
        offset = err.start + bom  # offset in the file as it is on disk
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: line {line}: byte 0x{raw[offset]:02x} at byte offset {offset} is not valid UTF-8; "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    _refuse_binary(path, raw, bom)
    if not text.strip():
        raise DataError(f"{path}: file contains only whitespace; write at least one record into it")
    return text


# C0 control bytes that no text record holds (tab, newline, CR, VT, FF and ESC are allowed).
# Valid UTF-8 never uses these bytes inside a multi-byte character, so a byte search is exact.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


def _refuse_binary(path: Path, raw: bytes, start: int) -> None:
    """A file with NUL or other binary control bytes is not a text file: refuse it, whatever its
    suffix (strict UTF-8 accepts NUL, and a record would carry it on to the tokenizer)."""
    found = _BINARY_BYTES.search(raw, start)
    if found:
        offset = found.start()
        line = raw.count(b"\n", 0, offset) + 1
        kind = "a NUL byte" if raw[offset] == 0 else f"control byte 0x{raw[offset]:02x}"
        raise DataError(f"{path}: line {line}: {kind} at byte offset {offset}; this is a binary file, "
                        "not text: export the data as plain UTF-8 JSONL, CSV or text")


def _infer_format(path: Path) -> str:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix or '(none)'!r}; "
            "pass --format jsonl, csv or txt"
        )
    return fmt


def _lines(text: str) -> list[str]:
    # split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON strings may hold raw
    return [line.removesuffix("\r") for line in text.split("\n")]


def _first_nonempty(lines: list[str]) -> tuple[int, str]:
    return next((i, line.strip()) for i, line in enumerate(lines, 1) if line.strip())


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _make_record(where: str, text, label, max_record_bytes: int, field: str) -> Record:
    """Validate one record; ``where`` is "file: line N" for the message."""
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {field!r} is {_json_type(text)}, not a string; "
            "store the text of each record as a JSON string"
        )
    if not text.strip():
        raise DataError(f"{where}: empty record (field {field!r} is blank); remove the record or fill in its text")
    size = len(text.encode("utf-8"))
    if size > max_record_bytes:
        raise DataError(
            f"{where}: record is {size:,} bytes, over the limit of {max_record_bytes:,}; "
            "split it into smaller records or raise --max-record-bytes"
        )
    if label is not None and not isinstance(label, str):
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)  # numeric class ids are common; keep them as names
        else:
            raise DataError(f"{where}: label is {_json_type(label)}; use a string or a number as the label")
    return Record(text=text, label=label or None)


# ---------------------------------------------------------------------------- formats


def _parse_jsonl(path, text, field, label_field, max_record_bytes) -> list[Record]:
    lines = _lines(text)
    first_no, first = _first_nonempty(lines)
    if first.startswith("["):
        raise DataError(
            f"{path}: line {first_no}: looks like a JSON array, not JSON Lines; "
            "write one JSON object per line (e.g. jq -c '.[]' file.json > file.jsonl)"
        )
    if not first.startswith("{"):
        kind, fmt = ("CSV", "csv") if "," in first or "\t" in first else ("plain text", "txt")
        raise DataError(
            f"{path}: line {first_no}: looks like {kind}, not JSON Lines (the line does not start with '{{'); "
            f"pass --format {fmt}"
        )
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines between JSON objects carry no record
        where = f"{path}: line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON ({err.msg} at column {err.colno}); "
                "each line must be one complete JSON object such as {\"text\": \"...\"}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: JSON value is {_json_type(obj)}, not an object; "
                f"write each record as an object such as {{\"{field}\": \"...\"}}"
            )
        if field not in obj:
            keys = ", ".join(map(repr, list(obj)[:10])) or "none"
            raise DataError(f"{where}: missing field {field!r} (fields: {keys}); add it or pass --field NAME")
        label = obj.get(label_field) if label_field else None
        records.append(_make_record(where, obj[field], label, max_record_bytes, field))
    return records


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse_csv(path, text, field, label_field, max_record_bytes) -> list[Record]:
    first_no, first = _first_nonempty(_lines(text))
    if first.startswith("{") and _is_json_object(first):
        raise DataError(f"{path}: line {first_no}: looks like JSON Lines, not CSV; pass --format jsonl")
    # strict: an unterminated quote is an error, not a record that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row_start = 1
    try:
        header = next(reader)
        while not any(cell.strip() for cell in header):  # skip leading blank lines
            header = next(reader)
        columns = [cell.strip() for cell in header]
        if field not in columns:
            listed = ", ".join(map(repr, columns[:20]))
            raise DataError(
                f"{path}: line {reader.line_num}: no column {field!r} in the header (columns: {listed}); "
                "add a header row naming the text column or pass --field NAME"
            )
        text_col = columns.index(field)
        label_col = columns.index(label_field) if label_field and label_field in columns else None
        records = []
        row_start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
        for row in reader:
            where = f"{path}: line {row_start}"
            row_start = reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= text_col:
                raise DataError(
                    f"{where}: row has {len(row)} columns but {field!r} is column {text_col + 1}; "
                    "fill in the missing cells"
                )
            label = row[label_col] if label_col is not None and label_col < len(row) else None
            records.append(_make_record(where, row[text_col], label, max_record_bytes, field))
    except csv.Error as err:
        raise DataError(
            f"{path}: line {row_start}: malformed CSV ({err}); check the quotes in the row starting on that line"
        ) from None
    if not records:
        raise DataError(f"{path}: CSV has a header but no rows; add at least one record")
    return records


def _parse_txt(path, text, txt_mode, max_record_bytes) -> list[Record]:
    lines = _lines(text)
    first_no, first = _first_nonempty(lines)
    if first.startswith("{") and _is_json_object(first):
        raise DataError(f"{path}: line {first_no}: looks like JSON Lines, not plain text; pass --format jsonl")
    if txt_mode == "line":
        return [
            _make_record(f"{path}: line {no}", line.strip(), None, max_record_bytes, "text")
            for no, line in enumerate(lines, 1)
            if line.strip()
        ]
    # block mode: one or more blank lines separate records; a record keeps its inner newlines
    records, block, block_start = [], [], 0
    for no, line in enumerate(lines + [""], 1):
        if line.strip():
            block_start = block_start or no
            block.append(line.rstrip())
        elif block:
            where = f"{path}: record {len(records) + 1} (line {block_start})"
            records.append(_make_record(where, "\n".join(block).strip(), None, max_record_bytes, "text"))
            block, block_start = [], 0
    return records


def _load_hf_dataset(spec: str, field, label_field, max_record_bytes) -> list[Record]:
    """``spec`` is a Hugging Face data set id, optionally ``id:split`` (default split: train)."""
    try:
        import datasets  # optional: only users who are online need it
    except ImportError:
        raise DataError(
            f"{spec}: loading a Hugging Face data set needs the datasets package; pip install privdistill[datasets]"
        ) from None
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, unknown id, unknown split: all user-fixable
        reason = " ".join(str(err).split())[:300]
        raise DataError(
            f"{spec}: cannot load data set {name!r} split {split!r} ({type(err).__name__}: {reason}); "
            "check the id and split (id:split) and that this machine is online"
        ) from None
    if field not in dataset.column_names:
        listed = ", ".join(map(repr, dataset.column_names))
        raise DataError(f"{spec}: no column {field!r} (columns: {listed}); pass --field NAME")
    has_label = bool(label_field) and label_field in dataset.column_names
    label_feature = dataset.features[label_field] if has_label else None
    records = []
    for i, row in enumerate(dataset, 1):
        label = row[label_field] if has_label else None
        if label is not None and hasattr(label_feature, "int2str"):  # ClassLabel: use the class name
            label = label_feature.int2str(label)
        records.append(_make_record(f"{spec}: record {i}", row[field], label, max_record_bytes, field))
    if not records:
        raise DataError(f"{spec}: split {split!r} has no records; pick another split (id:split)")
    return records


def _token_lengths(texts: list[str], tokenizer) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    if hasattr(tokenizer, "encode_batch"):  # a raw `tokenizers.Tokenizer`
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    # Whole lengths are the point here: no truncation. A transformers tokenizer (it has a model_max_length)
    # would warn about each record over that limit; verbose=False keeps it quiet.
    quiet = {"verbose": False} if hasattr(tokenizer, "model_max_length") else {}
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, **quiet)["input_ids"]]
