"""The offline demo: corpus → tokenizer + warmed-up tiny teacher → 5 simulated sites ×
3 rounds of DP-SGD LoRA under Flower → round table and every site's ledger.

Everything lands under ``runs/<name>/``. The single-site, no-Flower variant is
`privdistill train-local`.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from common.data.generate import generate_corpus
from common.data.loading import load_records
from common.models.warmup import warmup_teacher

console = Console()


def prepare(run_dir: Path, clients: int = 5, seed: int = 0, warmup_steps: int = 120, spec: str = "tiny-gpt2",
            public_records: int = 600, train_per_client: int = 200, heldout_per_client: int = 50) -> Path:
    """Generate the corpus and warm the teacher up (skipped when already there). Returns the model dir."""
    corpus, model_dir = run_dir / "corpus", run_dir / "teacher"
    if not (corpus / "manifest.json").exists():
        console.print(f"[bold]1/3[/] generating the synthetic private corpus in {corpus}")
        generate_corpus(corpus, n_clients=clients, seed=seed, public_records=public_records,
                        train_per_client=train_per_client, heldout_per_client=heldout_per_client)
    if not (model_dir / "warmup.json").exists():
        console.print(f"[bold]2/3[/] training the tokenizer and warming the {spec} teacher up on public data")
        public = [r.text for r in load_records(corpus / "public.jsonl")]
        info = warmup_teacher(public, model_dir, spec=spec, steps=warmup_steps, seed=seed)
        console.print(f"      public perplexity {info['public_eval_perplexity']:.2f}")
    return model_dir


def run_federated_demo(name: str = "demo", runs: Path = Path("runs"), epsilon: float = 8.0) -> dict:
    """5 clients × 3 rounds of DP-LoRA at ε in the Simulation Engine (simulations/configs/dp-lora.toml)."""
    from common.settings import RunSettings
    from simulations.run import prepare_run, report, simulate

    run_dir = Path(runs) / name
    config = Path(__file__).parent / "configs" / "dp-lora.toml"
    resume = (run_dir / "state.json").exists()
    settings = RunSettings.from_toml(config, {"name": name, "epsilon": epsilon})
    console.print(f"[bold]privdistill demo[/] → {run_dir} ({'resuming' if resume else 'new run'})")
    prepare(run_dir)  # corpus + teacher, with progress
    settings = prepare_run(settings, run_dir, resume)
    console.print(f"[bold]3/3[/] federated DP-SGD LoRA: {settings.clients} clients × {settings.rounds} rounds "
                  f"at ε={epsilon} (Flower Simulation Engine)")
    state = simulate(settings)
    report(state, settings, console)
    return state
