"""The offline demo: corpus → tokenizer + warmed-up tiny teacher → 5 simulated sites ×
3 rounds of DP-SGD LoRA under Flower → round table and every site's ledger.

Everything lands under ``runs/<name>/``. ``run_local_demo`` is the single-site, no-Flower
variant (the baseline `train-local` measures against).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.dp_lora import DPLoRAConfig, heldout_perplexity, train_dp_lora
from common.data.generate import generate_corpus
from common.data.loading import load_records
from common.models.warmup import warmup_teacher
from common.privacy.dp_sgd import plan_dp_sgd
from common.privacy.ledger import PrivacyLedger

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


def run_local_demo(run_dir: Path, epsilon: float = 8.0, steps: int = 40, seed: int = 0) -> dict:
    run_dir = Path(run_dir)
    model_dir = prepare(run_dir, seed=seed)
    site = run_dir / "corpus" / "client_0"
    cfg = DPLoRAConfig(epsilon=epsilon, local_steps=steps, batch_size=16, learning_rate=5e-3)
    n = len(load_records(site / "train.jsonl"))
    plan = plan_dp_sgd(n, cfg.batch_size, cfg.local_steps, cfg.rounds, epsilon)
    ledger = PrivacyLedger.open(run_dir / "ledgers" / "client_0.json", "client_0", epsilon, plan.delta)
    console.print(f"[bold]3/3[/] DP-SGD LoRA on client_0's private split: ε={epsilon}, δ={plan.delta:.1e}, "
                  f"σ={plan.noise_multiplier:.3f}, q={plan.sample_rate:.3f}, {steps} steps")
    before, _ = heldout_perplexity(model_dir, site / "heldout.jsonl", cfg)
    result = train_dp_lora(model_dir, site / "train.jsonl", cfg, ledger, run_id=run_dir.name, round_id=1,
                           save_to=run_dir / "adapter", progress=True)
    after, _ = heldout_perplexity(model_dir, site / "heldout.jsonl", cfg, result.adapter)
    summary = {"heldout_perplexity_teacher": before, "heldout_perplexity_dp_lora": after, **result.metrics}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = Table(title=f"privdistill demo: {run_dir}")
    table.add_column("model")
    table.add_column("held-out perplexity", justify="right")
    table.add_column("ε spent", justify="right")
    table.add_row("warmed-up teacher (public data)", f"{before:.3f}", "0")
    table.add_row(f"+ DP-SGD LoRA (target ε={epsilon})", f"{after:.3f}", f"{ledger.spent_epsilon():.3f}")
    console.print(table)
    console.print(ledger.describe(), markup=False, highlight=False)
    return summary
