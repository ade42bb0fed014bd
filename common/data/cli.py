"""`privdistill data ...`: check a private data file, or write the offline demo corpus.

Errors are ``UserError``s and are left to the top-level CLI, which prints one line and exits 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from common.data.generate import generate_corpus, plant_canaries
from common.data.loading import Record, load_records, summarize
from common.data.task import load_task
from common.errors import DataError

data_app = typer.Typer(help="Load, check and generate private text data.", no_args_is_help=True)


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    txt = "txt"
    datasets = "datasets"


class TxtMode(str, Enum):
    line = "line"
    block = "block"


class Domain(str, Enum):
    support = "support"
    clinical = "clinical"


@data_app.command()
def check(
    path: str = typer.Argument(..., help="Data file, or a Hugging Face data set id (id or id:split) with --format datasets."),
    fmt: Format | None = typer.Option(None, "--format", help="File format; inferred from the suffix when omitted."),
    field: str = typer.Option("text", help="Name of the text field (JSONL) or column (CSV)."),
    label_field: str = typer.Option("label", help="Name of the optional label field or column."),
    txt_mode: TxtMode = typer.Option(TxtMode.line, help="Plain text: one record per line, or per blank-line-separated block."),
    tokenizer: Path | None = typer.Option(None, help="Directory of a Hugging Face tokenizer for token counts (default: words)."),
    max_record_bytes: int = typer.Option(100_000, help="Reject records larger than this many bytes."),
    answer_field: str = typer.Option("", help="Task data (pdss): the answer field; every record then needs "
                                              "--field (its question) and this one, both non-empty."),
) -> None:
    """Load a data file, report every problem as one line, and print a summary."""
    if answer_field:
        tasks = load_task(path, question_field=field, answer_field=answer_field, fmt=fmt.value if fmt else None)
        records = [Record(t.question, None) for t in tasks]
    else:
        records = load_records(path, fmt=fmt.value if fmt else None, field=field, label_field=label_field or None,
                               txt_mode=txt_mode.value, max_record_bytes=max_record_bytes)
    summary = summarize(records, _load_tokenizer(tokenizer) if tokenizer else None)
    unit = "tokens" if tokenizer else "words"
    table = Table(title=f"{path}: OK", show_header=False)
    table.add_row("records", f"{summary['records']:,}")
    table.add_row(unit, f"{summary['tokens']:,}")
    for key in ("p50", "p90", "p99", "max"):
        table.add_row(f"length {key} ({unit})", str(summary[key]))
    labels = summary["labels"]
    table.add_row("labels", ", ".join(f"{k}: {v}" for k, v in labels.items()) if labels else "none")
    Console().print(table)


@data_app.command()
def generate(
    out: Path = typer.Option(..., help="Directory to write the corpus into (created if missing)."),
    clients: int = typer.Option(5, help="Number of clients (one private split each)."),
    seed: int = typer.Option(0, help="Seed; the same seed writes byte-identical files."),
    train_per_client: int = typer.Option(200, help="Training records per client (canaries come on top)."),
    heldout_per_client: int = typer.Option(50, help="Held-out records per client."),
    public_records: int = typer.Option(1000, help="Records in the public split."),
    domain: Domain = typer.Option(Domain.support, help="support: bank tickets; clinical: clinical notes."),
    site_stamp: bool = typer.Option(True, "--site-stamp/--no-site-stamp",
                                    help="Start each private record with its site's export stamp (an easy per-site "
                                         "signal); --no-site-stamp for records that behave like real text."),
) -> None:
    """Write an offline demo corpus: public split, per-client train/heldout splits, canaries."""
    manifest = generate_corpus(out, n_clients=clients, seed=seed, train_per_client=train_per_client,
                               heldout_per_client=heldout_per_client, public_records=public_records,
                               domain=domain.value, site_stamp=site_stamp)
    counts = manifest["counts"]
    stamp = "site stamps on" if site_stamp else "no site stamps"
    table = Table(title=f"{domain.value} corpus in {out} (seed {seed}, {stamp})")
    table.add_column("file")
    table.add_column("records", justify="right")
    table.add_row(manifest["files"]["public"], str(counts["public"]))
    for client in manifest["files"]["clients"]:
        table.add_row(client["train"], str(client["train_records"]))
        table.add_row(client["heldout"], str(client["heldout_records"]))
    table.add_row(manifest["files"]["canaries"],
                  f"{counts['canaries_planted']} planted ({counts['canary_copies']} copies), "
                  f"{counts['canaries_heldout']} held out")
    Console().print(table)


@data_app.command("plant-canaries")
def plant(
    path: Path = typer.Argument(..., help="Your private file (JSONL/CSV/TXT); it is not modified."),
    out: Path = typer.Option(..., help="Directory for the copy (train.jsonl) and canaries.json."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, csv or txt (default: from the suffix)."),
    field: str = typer.Option("text", help="Text field / column."),
    repeats: str = typer.Option("1,4,16", help="How many times each canary is planted (comma-separated)."),
    per_repeat: int = typer.Option(2, min=1, help="Canaries per repeat count (as many are held out)."),
    seed: int = typer.Option(0),
) -> None:
    """Plant audit canaries into a copy of your own data; canaries.json says where (keep it private)."""
    try:
        counts = tuple(int(r) for r in repeats.split(","))
    except ValueError:
        raise DataError(f"--repeats {repeats!r} is not a comma-separated list of integers (e.g. 1,4,16)") from None
    doc = plant_canaries(path, out, counts, per_repeat, seed, fmt, field)
    planted = [c for c in doc["canaries"] if c["repeats"]]
    Console().print(f"{out / 'train.jsonl'}: {len(planted)} canaries planted "
                    f"({sum(c['repeats'] for c in planted)} copies); {len(doc['canaries']) - len(planted)} held out; "
                    f"where they are: {out / 'canaries.json'}")


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer  # heavy import: only when asked for

    if not directory.is_dir():
        raise DataError(f"{directory}: no such tokenizer directory; pass a directory written by save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # a directory without tokenizer files, or a corrupt one
        reason = " ".join(str(err).split())[:200]
        raise DataError(f"{directory}: cannot load a tokenizer ({reason}); pass a directory written by save_pretrained") from None
