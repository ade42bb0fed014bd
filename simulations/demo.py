"""The offline demo, the DistilDP pipeline end to end:

corpus → tokenizer + warmed-up teacher (public data) → 5 simulated sites × 3 rounds of DP-SGD
LoRA under Flower → one DP label histogram per site → DP synthetic text → student
distillation → federated evaluation of the student → export with its privacy card → audit of
teacher and student → one short table.

Everything lands under ``runs/<name>/``; the console shows our progress, the rest goes to
``runs/<name>/log.txt``. Re-running the same name resumes where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.data.generate import generate_corpus
from common.data.loading import load_records
from common.models.warmup import warmup_teacher

console = Console()
CONFIG = Path(__file__).parent / "configs" / "distildp.toml"


def prepare(run_dir: Path, clients: int = 5, seed: int = 0, warmup_steps: int = 120, spec: str = "tiny-gpt2",
            public_records: int = 600, train_per_client: int = 200, heldout_per_client: int = 50,
            site_stamp: bool = True) -> Path:
    """Generate the corpus and warm the teacher up (skipped when already there). Returns the model dir."""
    corpus, model_dir = run_dir / "corpus", run_dir / "teacher"
    if not (corpus / "manifest.json").exists():
        console.print(f"[bold]corpus[/]: generating the synthetic private corpus in {corpus}")
        generate_corpus(corpus, n_clients=clients, seed=seed, public_records=public_records,
                        train_per_client=train_per_client, heldout_per_client=heldout_per_client,
                        site_stamp=site_stamp)
    if not (model_dir / "warmup.json").exists():
        console.print(f"[bold]teacher[/]: training the tokenizer and warming the {spec} teacher up on public data")
        public = [r.text for r in load_records(corpus / "public.jsonl")]
        info = warmup_teacher(public, model_dir, spec=spec, steps=warmup_steps, seed=seed, progress=False)
        console.print(f"      public perplexity {info['public_eval_perplexity']:.2f}")
    return model_dir


def run_distildp_demo(name: str = "demo", runs: Path = Path("runs"), epsilon: float = 8.0,
                      overrides: dict | None = None) -> dict:
    from common.settings import RunSettings
    from simulations.console import quiet_console
    from simulations.run import prepare_run, simulate

    global console
    run_dir = Path(runs) / name
    resume = (run_dir / "state.json").exists()
    settings = RunSettings.from_toml(CONFIG, {"name": name, "epsilon": epsilon, **(overrides or {})})
    console.print(f"[bold]privdistill demo[/] (DistilDP) → {run_dir} ({'resuming' if resume else 'new run'}); "
                  f"dependencies' output goes to {run_dir / 'log.txt'}")
    with quiet_console(run_dir / "log.txt") as terminal:
        console = Console(file=terminal)
        prepare(run_dir, clients=settings.clients, seed=settings.seed, warmup_steps=settings.warmup_steps,
                spec=settings.warmup_spec, site_stamp=settings.site_stamp)
        settings = prepare_run(settings, run_dir, resume)
        console.print(f"[bold]federation[/]: {settings.clients} sites × {settings.rounds} DP-SGD LoRA rounds at "
                      f"ε={epsilon}, then synthesis, distillation, evaluation, export and audit")
        state = simulate(settings)
    console = Console(width=None if Console().is_terminal else 110)  # a log file still gets the whole table
    summary_table(run_dir, state)
    return state


def summary_table(run_dir: Path, state: dict) -> None:
    import json

    card = json.loads((run_dir / "student" / "privacy.json").read_text())
    audit = {row["label"]: row for row in (card.get("audit") or {}).get("models", [])}
    teacher_label = next((k for k in audit if k not in ("student", "public warm-up (floor)")), None)
    ev, models = card["evaluation"], card["models"]
    table = Table(title=f"DistilDP demo ({run_dir})")
    for column in ("model", "params", "held-out ppl", "public ppl", "ε", "MIA AUC", "exposure 16×"):
        table.add_column(column, justify="right", no_wrap=True)
    delta = card["privacy"]["delta"]
    eps = f"{card['privacy']['epsilon']:.2f}" if delta else "–"
    for label, key, params in (("DP teacher", teacher_label, models["teacher_parameters"]),
                               ("student", "student", models["student_parameters"]),
                               ("public floor", "public warm-up (floor)", models["teacher_parameters"])):
        row = audit.get(key) or {}
        e = ev.get("teacher" if label == "DP teacher" else "student") or {}
        held = e.get("heldout_perplexity") if label != "public floor" else state.get("baseline", {}).get("perplexity")
        public = e.get("public_perplexity") if label != "public floor" else None
        table.add_row(label, f"{params:,}", _f(held), _f(public), eps if label != "public floor" else "0",
                      _f(row.get("auc_loss")), _f(row.get("exposure_16")))
    console.print(table)
    console.print(f"ε at δ = {delta:.0e} per site (the largest site's); MIA AUC: loss attack, members vs held-out "
                  "(0.5 = chance); exposure: mean bits of the canaries planted 16 times.")
    console.print(f"student: {run_dir / 'student'} (AutoModelForCausalLM.from_pretrained); card: "
                  f"{run_dir / 'student' / 'README.md'}; audit: {run_dir / 'audit.md'}")


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"
