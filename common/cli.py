"""The `privdistill` command line.

Subcommands live next to the code they drive (``common/data/cli.py``, ...); this module
mounts them and turns a ``UserError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import json
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from common.errors import UserError
from common.data.cli import data_app

console = Console()

app = typer.Typer(
    help="privdistill: federated, differentially private distillation of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
teacher_app = typer.Typer(help="Build the shared base (teacher) model.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect privacy ledgers.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
app.add_typer(ledger_app, name="ledger")


@teacher_app.command("warmup")
def teacher_warmup(
    public: Path = typer.Option(..., help="Public split (JSONL/CSV/TXT): costs no privacy."),
    out: Path = typer.Option(..., help="Directory to write the model and tokenizer to (save_pretrained)."),
    spec: str = typer.Option("tiny-gpt2", help="Tiny config to build (tiny-gpt2, tiny-llama, small-gpt2, "
                                               "small-llama, bench-gpt2-50m)."),
    steps: int = typer.Option(200, min=1, help="Optimizer steps on the public split."),
    batch_size: int = typer.Option(16, min=1),
    learning_rate: float = typer.Option(2e-3),
    vocab_size: int = typer.Option(2048, min=300, help="Byte-level BPE vocabulary size."),
    max_length: int = typer.Option(128, min=8),
    seed: int = typer.Option(0),
) -> None:
    """Train a byte-level BPE tokenizer and a tiny base model on public text (non-private)."""
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    texts = [r.text for r in load_records(public)]
    info = warmup_teacher(texts, out, spec, steps, batch_size, learning_rate, max_length, vocab_size, seed)
    console.print(f"warmed-up teacher saved to [bold]{out}[/]: {info['parameters']:,} parameters, "
                  f"public eval perplexity {info['public_eval_perplexity']:.2f}")


@app.command("train-local")
def train_local(
    data: Path = typer.Option(..., help="This site's private training file."),
    model: Path = typer.Option(..., help="Base model directory (from `teacher warmup`)."),
    epsilon: float = typer.Option(8.0, help="Target ε for this run."),
    delta: Optional[float] = typer.Option(None, help="δ (default min(1e-5, 1/(10·records)))."),
    steps: int = typer.Option(30, min=1, help="Logical DP-SGD steps."),
    batch_size: int = typer.Option(16, min=1, help="Expected logical batch (Poisson)."),
    max_physical_batch_size: int = typer.Option(16, min=1, help="Memory bound per forward pass."),
    max_grad_norm: float = typer.Option(1.0, help="Per-record clipping norm C."),
    learning_rate: float = typer.Option(5e-3),
    max_length: int = typer.Option(128, min=8),
    accountant: str = typer.Option("rdp", help="opacus accountant: rdp or prv."),
    lora_r: int = typer.Option(8, min=1),
    heldout: Optional[Path] = typer.Option(None, help="Held-out file: report perplexity before/after."),
    ledger: Optional[Path] = typer.Option(None, help="Ledger file (default: OUT/ledger.json)."),
    budget: Optional[float] = typer.Option(None, help="Client's total ε budget (default: --epsilon)."),
    client_id: str = typer.Option("local", help="Client id recorded in the ledger."),
    run_id: str = typer.Option("train-local", help="Run id; the ledger charges each run/round once."),
    out: Path = typer.Option(Path("runs/train-local"), help="Output directory (adapter, metrics)."),
) -> None:
    """DP-SGD LoRA fine-tuning on one data file, no federation (the overhead baseline)."""
    from client.dp_lora import DPLoRAConfig, heldout_perplexity, plan_for, train_dp_lora
    from common.privacy.ledger import PrivacyLedger

    cfg = DPLoRAConfig(epsilon=epsilon, delta=delta, local_steps=steps, batch_size=batch_size,
                       max_physical_batch_size=max_physical_batch_size, max_grad_norm=max_grad_norm,
                       learning_rate=learning_rate, max_length=max_length, accountant=accountant, lora_r=lora_r)
    cfg.validate()
    _, plan = plan_for(data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    book = PrivacyLedger.open(ledger or out / "ledger.json", client_id, budget or epsilon, plan.delta, accountant)
    console.print(f"plan: σ={plan.noise_multiplier:.3f}, q={plan.sample_rate:.4f}, {plan.total_steps} steps, "
                  f"C={plan.max_grad_norm}, target ε={epsilon} at δ={plan.delta:.2e} ({accountant})")
    before = heldout_perplexity(model, heldout, cfg)[0] if heldout else None
    started = time.perf_counter()
    result = train_dp_lora(model, data, cfg, book, run_id=run_id, round_id=1, save_to=out / "adapter", progress=True)
    seconds = time.perf_counter() - started
    after = heldout_perplexity(model, heldout, cfg, result.adapter)[0] if heldout else None
    summary = {**result.metrics, "seconds": seconds, "heldout_perplexity_before": before,
               "heldout_perplexity_after": after, "plan": plan.to_dict()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = Table(title="train-local (DP-SGD LoRA)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("examples", "steps", "noise_multiplier", "train_loss", "epsilon_spent", "epsilon_remaining"):
        value = result.metrics[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if heldout:
        table.add_row("held-out perplexity before", f"{before:.3f}")
        table.add_row("held-out perplexity after", f"{after:.3f}")
    table.add_row("wall time (s)", f"{seconds:.1f}")
    console.print(table)
    console.print(f"adapter saved to {out / 'adapter'}; ledger {book.path}")


@app.command("demo")
def demo(name: str = typer.Option("demo", help="Run name: everything goes under runs/NAME/."),
         epsilon: float = typer.Option(8.0, help="Target ε."),
         runs: Path = typer.Option(Path("runs"), help="Parent directory of run directories.")) -> None:
    """The offline demo: generate data, warm the teacher up, DP-train on a site, print the result."""
    from simulations.demo import run_local_demo

    run_local_demo(runs / name, epsilon=epsilon)


@ledger_app.command("show")
def ledger_show(path: Path = typer.Argument(..., help="A client's (or the server's) ledger JSON file.")) -> None:
    """Print a ledger: budget, entries, and (ε, δ) rebuilt by the opacus accountant."""
    from common.privacy.ledger import PrivacyLedger

    console.print(PrivacyLedger.load(path).describe(), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    try:
        app(args=argv, prog_name="privdistill", standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.exceptions.ClickException as err:
        print(f"error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def entry() -> None:
    sys.exit(main())
