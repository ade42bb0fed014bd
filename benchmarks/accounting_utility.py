"""Benchmark: held-out perplexity of the DP teacher trained with σ calibrated under RDP vs PLD.

The other half of issue 11's benchmark (the σ half is ``benchmarks/accounting.py``): for each
DP-SGD plan and target ε, σ is calibrated once under opacus's RDP accountant (ledger v1's
default) and once under dp-accounting's PLD (v2's default), and one site's teacher LoRA is
trained with each σ from the same warmed-up teacher and the same LoRA seed; the table gives the
held-out perplexity after training (mean and min–max over ``--reps`` repetitions) and the
perplexity before training.

What runs: the offline demo's corpus and warmed-up tiny-gpt2 teacher (``simulations.demo.prepare``,
built once under ``runs/bench-accounting/`` and reused), site 0's private split
(``client_0/train.jsonl``, 217 records with its planted canaries; held out:
``client_0/heldout.jsonl``, 50 records), the demo's DP-LoRA settings (simulations/configs/
distildp.toml: control codes from the ``label`` field, lr 5e-3, LoRA r 8, max length 128, clip 1.0).
Each run is ``rounds`` calls of ``client.dp_lora.train_dp_lora`` of ``local_steps`` steps, the
adapter of one call starting the next: exactly what a site runs each round, without the
federation (no FedAvg with the other sites, so this is one site's teacher, not the demo's global
one). Each run charges a throwaway ``PrivacyLedger`` (budget = the target ε, opened with the
plan's accountant) in a temporary directory; the ε it ends at is in the table.

Plans (δ = min(1e-5, 1/(10·n)) = 1e-5, Poisson rate q = 1/⌈217/batch⌉):

* demo: batch 16 (q = 1/14), 3 rounds × 15 local steps = 45 steps.
* comparison: the σ benchmark's comparison plan (batch 64, 200 steps over 1,000 records) does not
  fit a 217-record site; its batch of 64 does (q = 1/4), with 2 rounds × 15 = 30 steps by default
  (``--comparison-steps``; 100 steps costs ~110 s per run on the 2-core sandbox, too long for 8).

DP noise and Poisson sampling are never seeded in the product (``torch.seed()`` in
``train_dp_lora``), so repetitions differ; only the LoRA initialisation (``seed = 0``) is shared.

Usage (from the repository root; 6 minutes on the 2-vCPU sandbox at load ≤ 3, 12 at load 5-7):

    .venv/bin/python benchmarks/accounting_utility.py
    .venv/bin/python benchmarks/accounting_utility.py --reps 3 --comparison-steps 100 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from client.dp_lora import heldout_perplexity, plan_for, train_dp_lora  # noqa: E402
from common.privacy.ledger import PrivacyLedger  # noqa: E402
from common.settings import DPLoRAConfig  # noqa: E402
from simulations.demo import prepare  # noqa: E402

ACCOUNTANTS = ("rdp", "pld")


def demo_config(batch: int, rounds: int, local_steps: int, epsilon: float, accountant: str) -> DPLoRAConfig:
    # simulations/configs/distildp.toml's [dp] table and label-field (the demo's teacher step)
    cfg = DPLoRAConfig(epsilon=epsilon, rounds=rounds, local_steps=local_steps, batch_size=batch,
                       max_physical_batch_size=16, max_grad_norm=1.0, learning_rate=0.005, max_length=128,
                       accountant=accountant, lora_r=8, lora_alpha=16, seed=0, label_field="label")
    cfg.validate()
    return cfg


def train_site(model_dir: Path, train: Path, heldout: Path, cfg: DPLoRAConfig, planned, tag: str) -> tuple[float, float]:
    """``cfg.rounds`` rounds of one site's DP-SGD; (held-out perplexity, ε in the ledger)."""
    plan = planned[1]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp) / "ledger.json", "client_0", cfg.epsilon, plan.delta, cfg.accountant)
        adapter = None
        for round_id in range(1, cfg.rounds + 1):
            adapter = train_dp_lora(model_dir, train, cfg, ledger, tag, round_id, adapter, planned=planned).adapter
        spent = ledger.spent_epsilon()
    ppl, _ = heldout_perplexity(model_dir, heldout, cfg, adapter)
    return ppl, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--reps", type=int, default=2, help="trainings per (plan, ε, accountant); ≥ 2")
    parser.add_argument("--comparison-steps", type=int, default=30,
                        help="total steps of the comparison plan (rounds of 15; default 30)")
    parser.add_argument("--plans", nargs="+", choices=["demo", "comparison"], default=["demo", "comparison"])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-accounting"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: faster than 2 on the busy 2-core sandbox)")
    args = parser.parse_args()
    if args.reps < 2:
        parser.error("--reps must be ≥ 2 (DP noise is unseeded: one run says nothing about the spread)")
    if args.comparison_steps % 15:
        parser.error("--comparison-steps must be a multiple of 15 (rounds of 15 local steps)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    print(f"python {platform.python_version()}, torch {torch.__version__} ({args.threads} thread(s)) on "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    model_dir = prepare(args.run_dir)
    corpus = args.run_dir / "corpus"
    train, heldout = corpus / "client_0" / "train.jsonl", corpus / "client_0" / "heldout.jsonl"
    plans = {"demo": (16, 3, 15), "comparison": (64, args.comparison_steps // 15, 15)}
    base_cfg = demo_config(16, 1, 1, 8.0, "pld")
    before, n_heldout = heldout_perplexity(model_dir, heldout, base_cfg)
    print(f"held-out perplexity before training: {before:.2f} ({n_heldout} records of {heldout})", flush=True)

    header = ["plan", "q", "steps", "target ε", "σ RDP", "σ PLD", "ppl RDP: mean (min–max)",
              "ppl PLD: mean (min–max)", "PLD − RDP", "ranges disjoint?", "ε ledger RDP / PLD"]
    rows = []
    for name in args.plans:
        batch, rounds, local_steps = plans[name]
        for eps in args.epsilons:
            cell = {}
            for acc in ACCOUNTANTS:
                cfg = demo_config(batch, rounds, local_steps, eps, acc)
                planned = plan_for(train, cfg)  # σ calibrated by this accountant, reused by every run
                ppls, spent = [], 0.0
                for rep in range(args.reps):
                    t = time.perf_counter()
                    ppl, spent = train_site(model_dir, train, heldout, cfg, planned, f"{name}-{eps:g}-{acc}-{rep}")
                    ppls.append(ppl)
                    print(f"  {name} ε={eps:g} {acc}: σ={planned[1].noise_multiplier:.4f} rep {rep + 1} "
                          f"ppl {ppl:.2f} (ledger ε {spent:.3f}, {time.perf_counter() - t:.0f} s)", flush=True)
                cell[acc] = (planned[1], ppls, spent)
            (p_rdp, r, e_rdp), (p_pld, p, e_pld) = cell["rdp"], cell["pld"]
            diff = statistics.mean(p) - statistics.mean(r)
            separated = max(p) < min(r) or min(p) > max(r)  # the two ranges do not overlap
            rows.append([name, f"{p_rdp.sample_rate:.4f}", str(rounds * local_steps), f"{eps:g}",
                         f"{p_rdp.noise_multiplier:.4f}", f"{p_pld.noise_multiplier:.4f}",
                         f"{statistics.mean(r):.2f} ({min(r):.2f}–{max(r):.2f})",
                         f"{statistics.mean(p):.2f} ({min(p):.2f}–{max(p):.2f})",
                         f"{diff:+.2f}", "yes" if separated else "no", f"{e_rdp:.2f} / {e_pld:.2f}"])

    print()
    print(f"held-out perplexity before training: {before:.2f}; {args.reps} runs per cell; "
          f"{time.perf_counter() - start:.0f} s wall")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
