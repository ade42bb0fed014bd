"""Benchmark: held-out perplexity against DP-SGD steps, small vs large logical batch, same ε.

One site of the generated corpus **without site stamps** (``generate_corpus(site_stamp=False)``:
nothing per-site to pick up, so what training gains is what text of the public distribution
gives), a tiny teacher warmed up on the public split, then DP-SGD LoRA through the real path:
``client.dp_lora.plan_for`` (σ from ``plan_dp_sgd`` for the arm's whole run at ``--epsilon``)
and ``train_dp_lora`` (opacus, Poisson sampling, ``BatchMemoryManager`` with the arm's physical
batch, the arm's clipping norm C), charged to a throwaway ledger per arm. It also prints the
per-record LoRA gradient norms at initialisation, the figure to set C against.

Arms get the **same compute**: ``--records`` records processed (in expectation) each, so an arm
with batch B runs ``records / B`` logical steps. Each arm's run is cut into ``--checkpoints``
equal calls of ``train_dp_lora`` (each call's adapter starts the next, a fresh Adam each call,
as in federated rounds) and held-out perplexity is measured after each. σ is planned for the
whole run, so the last point of every arm spends exactly ``--epsilon``; earlier points are on
the way there. ``--nonprivate B:LR`` adds a non-private arm (no clipping, no noise) as the
ceiling. DP noise is unseeded (as in production), so ``--reps`` repeats each arm.

Usage (from the repository root):

    nice -n 10 .venv/bin/python benchmarks/dp_batch_curve.py --records 10240 --checkpoints 5   # C = 0.1 rows
    .venv/bin/python benchmarks/dp_batch_curve.py --records 1024 --arms 16:5e-3:16:1,128:5e-3:32:0.1
    .venv/bin/python benchmarks/dp_batch_curve.py --arms ""          # the gradient norms only
    .venv/bin/python benchmarks/dp_batch_curve.py --render a.json b.json --png plot.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_arm(text: str, private: bool = True) -> dict:
    """``BATCH:LR[:PHYSICAL[:CLIP]]`` → an arm."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"arm {text!r} is not BATCH:LR[:PHYSICAL[:CLIP]] (e.g. 256:2e-2:32:0.1)")
    batch, lr = int(parts[0]), float(parts[1])
    physical = int(parts[2]) if len(parts) > 2 else min(batch, 32)
    clip = float(parts[3]) if len(parts) > 3 else 1.0
    return {"batch": batch, "lr": lr, "physical": physical, "clip": clip, "private": private}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def prepare(work: Path, args) -> tuple[Path, Path]:
    """The stamp-free corpus (one site) and the warmed-up teacher; reused when already there."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    corpus, teacher = work / "corpus", work / "teacher"
    if not (corpus / "manifest.json").exists():
        generate_corpus(corpus, n_clients=1, seed=args.seed, train_per_client=args.train_records,
                        heldout_per_client=args.heldout_records, public_records=args.public_records,
                        site_stamp=False)
    if not (teacher / "warmup.json").exists():
        public = [r.text for r in load_records(corpus / "public.jsonl")]
        warmup_teacher(public, teacher, spec=args.spec, steps=args.warmup_steps, seed=args.seed, progress=False)
    return corpus / "client_0", teacher


def gradient_norms(teacher: Path, site: Path, args, records: int = 32) -> list[float]:
    """Per-record gradient norms of the LoRA parameters at initialisation: where C bites."""
    import torch

    from client.dp_lora import load_texts
    from common.models.lm import encode_texts, per_record_loss
    from common.models.loading import load_lora_model
    from common.settings import DPLoRAConfig

    cfg = DPLoRAConfig(max_length=args.max_length, seed=args.seed)
    model, tokenizer = load_lora_model(teacher, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for input_ids, mask in encode_texts(load_texts(site / "train.jsonl", cfg)[:records], tokenizer, args.max_length):
        grads = torch.autograd.grad(per_record_loss(model, input_ids[None], mask[None]).mean(), params)
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    return sorted(norms)


def run_arm(arm: dict, site: Path, teacher: Path, args, ledger_dir: Path) -> dict:
    from client.dp_lora import heldout_perplexity, load_texts, plan_for, train_dp_lora
    from common.privacy.ledger import PrivacyLedger
    from common.settings import DPLoRAConfig

    n = len(load_texts(site / "train.jsonl", DPLoRAConfig()))
    expected_batch = n / math.ceil(n / arm["batch"])  # Poisson: q·n with opacus's q = 1/ceil(n/B)
    per_call = max(1, round(args.records / expected_batch / args.checkpoints))
    steps = per_call * args.checkpoints
    cfg = DPLoRAConfig(epsilon=args.epsilon, rounds=args.checkpoints, local_steps=per_call,
                       batch_size=arm["batch"], max_physical_batch_size=arm["physical"],
                       learning_rate=arm["lr"], max_grad_norm=arm["clip"], max_length=args.max_length,
                       private=arm["private"])
    planned = plan_for(site / "train.jsonl", cfg)
    plan = planned[1]
    name = f"{'dp' if arm['private'] else 'nonprivate'}-b{arm['batch']}-lr{arm['lr']:g}-{time.time_ns()}"
    ledger = PrivacyLedger.open(ledger_dir / f"{name}.json", "site-0", args.epsilon, plan.delta, cfg.accountant) \
        if arm["private"] else None
    start = time.perf_counter()
    curve = [(0, heldout_perplexity(teacher, site / "heldout.jsonl", cfg)[0])]
    adapter, train_seconds = None, 0.0
    for call in range(1, args.checkpoints + 1):
        t0 = time.perf_counter()
        result = train_dp_lora(teacher, site / "train.jsonl", cfg, ledger, name, call, adapter, planned=planned)
        train_seconds += time.perf_counter() - t0
        adapter = result.adapter
        curve.append((call * per_call, heldout_perplexity(teacher, site / "heldout.jsonl", cfg, adapter)[0]))
    return {**arm, "steps": steps, "expected_batch": expected_batch, "records_seen": round(steps * expected_batch),
            "sample_rate": plan.sample_rate,
            "sigma": plan.noise_multiplier if arm["private"] else 0.0,
            "epsilon": ledger.spent_epsilon() if ledger else math.inf, "curve": curve,
            "train_s": train_seconds, "wall_s": time.perf_counter() - start}


def label(row: dict) -> str:
    kind = "DP" if row["private"] else "non-private"
    clip = f", C {row['clip']:g}" if row["private"] else ""
    return f"{kind} batch {row['batch']} (phys {row['physical']}), lr {row['lr']:g}{clip}"


def table(rows: list[dict], args) -> str:
    points = len(rows[0]["curve"])
    head = ["arm", "q", "σ", "steps", "records"] + [f"ppl @ {i}/{points - 1}" for i in range(points)] + \
           ["ε spent", "train s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [label(row), f"{row['sample_rate']:.4f}", f"{row['sigma']:.3f}", str(row["steps"]),
                 f"{row['records_seen']:,}"]
        cells += [f"{ppl:.2f} (s{step})" for step, ppl in row["curve"]]
        train_s = "–" if row.get("train_s") is None else f"{row['train_s']:.0f}"
        cells += ["∞" if math.isinf(row["epsilon"]) else f"{row['epsilon']:.3f}", train_s, f"{row['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_steps, by_records) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for row in rows:
        steps = [max(s, 0.8) for s, _ in row["curve"]]  # step 0 shown at the left edge of the log axis
        ppl = [p for _, p in row["curve"]]
        style = "-o" if row["private"] else "--s"
        by_steps.plot(steps, ppl, style, label=label(row), markersize=4)
        by_records.plot([s * row["records_seen"] / row["steps"] for s, _ in row["curve"]], ppl, style, label=label(row), markersize=4)
    start = rows[0]["curve"][0][1]
    low = min(p for row in rows for _, p in row["curve"])
    by_steps.set_ylim(0.98 * low, 1.2 * start)  # a diverging arm leaves the plot instead of flattening the rest
    by_steps.set_xscale("log")
    by_steps.set_xlabel("logical DP-SGD steps (log)")
    by_records.set_xlabel("records processed (compute)")
    by_steps.set_ylabel("held-out perplexity")
    by_records.legend(fontsize=8)
    fig.suptitle(f"{args.spec} LoRA, one site of {args.train_records} stamp-free records, ε = {args.epsilon:g} "
                 f"per arm, same compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="16:5e-3:16:0.1,256:2e-2:32:0.1",
                        help="DP arms, comma-separated BATCH:LR[:PHYSICAL[:CLIP]] (clip C default 1.0; "
                             "default %(default)s)")
    parser.add_argument("--nonprivate", default="", help="non-private reference arms, same syntax (e.g. 16:5e-3)")
    parser.add_argument("--records", type=int, default=7680, help="records each arm processes (same compute)")
    parser.add_argument("--checkpoints", type=int, default=6, help="held-out evaluations per arm (after step 0)")
    parser.add_argument("--epsilon", type=float, default=2.0, help="ε of every DP arm's whole run")
    parser.add_argument("--reps", type=int, default=1, help="runs per arm (DP noise is unseeded)")
    parser.add_argument("--train-records", type=int, default=3200, help="the site's training records")
    parser.add_argument("--heldout-records", type=int, default=200)
    parser.add_argument("--public-records", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=30,
                        help="public warm-up steps: few, so the teacher starts far from what the data allows, as "
                             "on real text (120, the demo's, leaves it near the floor of stamp-free records)")
    parser.add_argument("--spec", default="tiny-gpt2", help="teacher (a tiny spec)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="corpus, teacher and LoRA initialisation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models on a shared box)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-dp-batch",
                        help="corpus and teacher, reused across runs (default %(default)s)")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="print the table (and --png) of earlier --json files instead of running")
    args = parser.parse_args(argv)
    if args.render:
        rows = [row for path in args.render for row in json.loads(path.read_text())["rows"]]
        print(table(rows, args))
        if args.png:
            plot(rows, args.png, args)
        return 0
    arms = [parse_arm(a) for a in args.arms.split(",") if a]
    arms += [parse_arm(a, private=False) for a in args.nonprivate.split(",") if a]

    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    load = os.getloadavg()
    t0 = time.perf_counter()
    site, teacher = prepare(args.work, args)
    print(f"corpus + teacher: {time.perf_counter() - t0:.0f} s ({args.work})", flush=True)
    norms = gradient_norms(teacher, site, args)
    norm_line = (f"per-record LoRA gradient norm at initialisation ({len(norms)} training records): median "
                 f"{norms[len(norms) // 2]:.3f}, range {norms[0]:.3f}–{norms[-1]:.3f}; a C above {norms[-1]:.3f} clips none")
    print(norm_line, flush=True)
    if not arms:
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as ledgers:
        for rep in range(args.reps):
            for arm in arms:
                row = run_arm(arm, site, teacher, args, Path(ledgers))
                rows.append({**row, "rep": rep})
                print(f"{label(row)}: {row['steps']} steps, ppl " +
                      " → ".join(f"{p:.2f}" for _, p in row["curve"]) + f" ({row['wall_s']:.0f} s)", flush=True)
    print()
    print(f"Machine: {machine()}; {started:%Y-%m-%d %H:%M} UTC; load average {load[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - t0:.0f} s wall in all.")
    print(f"One site: {args.train_records} training / {args.heldout_records} held-out records (stamp off), "
          f"{args.spec} teacher warmed up {args.warmup_steps} steps on {args.public_records} public records; "
          f"max length {args.max_length}; ε = {args.epsilon:g} per DP arm (PLD, δ from the site size); "
          f"{args.records} records per arm in expectation (steps × q·n); {args.checkpoints} evaluations (s = step).")
    print(norm_line[0].upper() + norm_line[1:] + ".")
    print()
    print(table(rows, args))
    if args.png:
        plot(rows, args.png, args)
        print(f"\nplot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
