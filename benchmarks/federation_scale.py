"""Benchmark: the federation at 10 and 100 simulated sites, and what SecAgg+ / central DP cost.

Prints figures; asserts nothing. Two parts, each run as fresh subprocesses one after the other
(``--part scale``, ``--part cost`` or ``--part both``):

  scale  R rounds with the same number of sites sampled per round (``--per-round``), once with
         10 sites and once with 100 (``--clients``). Each site has its own private split,
         held-out split and ledger. Same per-round work, so the wall time per round should
         not grow with the number of sites; peak memory is the whole process tree's.
  cost   ``--cost-clients`` sites, all sampled, R rounds, four ways: plain, secagg (SecAgg+),
         central-dp (server-side clipping), secagg+central-dp (client-side clipping), in
         ``--passes`` passes with the order reversed every other pass. The ratios are of the
         mean round time (sampling → masked sum / aggregate → evaluation → checkpoint; Ray's
         start-up is outside the rounds), measured in one invocation.

Memory: a sampler thread sums, every 0.5 s, the PSS (proportional set size: shared pages
split between the processes sharing them, so torch's libraries are not counted once per Ray
worker) and the RSS of the run's process and every process below it (Ray's gcs_server,
raylet, ClientApp actors). Peak PSS is the figure to quote; summed RSS double counts.

Usage (from the repository root; the corpus and teacher are made once under --work):

    .venv/bin/python benchmarks/federation_scale.py --part both
    .venv/bin/python benchmarks/federation_scale.py --part scale --clients 10,100 --per-round 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COST_MODES = {
    "plain": {},
    "secagg": {"secure-aggregation": True},
    "central-dp": {"central-dp": True},
    "secagg+central-dp": {"secure-aggregation": True, "central-dp": True},
}
CENTRAL = {"central-noise-multiplier": 1.0, "central-clip": 1.0, "central-epsilon": 1000.0}


class TreeMemory:
    """Peak summed PSS / RSS of this process and all its descendants, sampled every ``period`` s."""

    def __init__(self, period: float = 0.5):
        self.period, self.peak_pss, self.peak_rss, self.peak_procs = period, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            pss = rss = 0
            procs = [me] + me.children(recursive=True)
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self._stop.wait(self.period)


def prepare(work: Path, clients: int, train_per_client: int) -> None:
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    corpus = work / f"corpus-{clients}"
    if not (corpus / "manifest.json").exists():
        generate_corpus(corpus, n_clients=clients, seed=3, train_per_client=train_per_client, heldout_per_client=10,
                        public_records=400)
    if not (work / "teacher" / "config.json").exists():
        warmup_teacher([r.text for r in load_records(corpus / "public.jsonl")], work / "teacher", spec="tiny-gpt2",
                       steps=60, progress=False)


def run_one(args) -> dict:
    """One simulated run in this process (called in a fresh subprocess); prints a JSON line."""
    from common.settings import RunSettings
    from simulations.run import prepare_run, simulate

    overrides = json.loads(args.overrides)
    settings = RunSettings.from_toml(ROOT / "simulations" / "configs" / "dp-lora.toml", overrides)
    run_dir = Path(args.run_dir)
    settings = prepare_run(settings, run_dir, resume=False)
    started = time.monotonic()
    with TreeMemory() as memory:
        state = simulate(settings)
    wall = time.monotonic() - started
    rounds = state["rounds"]
    return {"wall_s": wall, "round_s": [r["seconds"] for r in rounds], "valid": [r["valid"] for r in rounds],
            "evaluated": [r["evaluate"]["clients"] for r in rounds], "peak_pss": memory.peak_pss,
            "peak_rss": memory.peak_rss, "processes": memory.peak_procs,
            "perplexity": rounds[-1]["evaluate"]["perplexity"]}


def spawn(work: Path, label: str, overrides: dict) -> dict:
    run_dir = work / "runs" / f"{label}-{int(time.time())}"
    cmd = [sys.executable, __file__, "--one", "--run-dir", str(run_dir), "--overrides", json.dumps(overrides)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{label}: the run failed (exit {out.returncode})")
    return json.loads(lines[-1])


def base_overrides(work: Path, clients: int, args) -> dict:
    return {"clients": clients, "rounds": args.rounds, "min-clients": min(args.per_round, clients),
            "local-steps": args.steps, "batch-size": 16, "data-dir": str(work / f"corpus-{args.corpus_clients}"),
            "model-dir": str(work / "teacher"), "generate-data": False, "round-timeout": 1800.0}


def mib(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def part_scale(work: Path, args) -> None:
    print(f"\n## scale: {args.rounds} rounds, {args.per_round} sites sampled and evaluated per round, "
          f"{args.steps} DP-SGD steps each\n")
    print("| sites | wall (s) | per round (s): each | mean | peak PSS (tree) | peak RSS (tree, summed) | processes |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for clients in args.clients:
        overrides = base_overrides(work, clients, args)
        fraction = min(1.0, args.per_round / clients)
        overrides["fraction-train"] = fraction  # fraction-evaluate follows it (the default)
        if args.evaluate_all and clients == max(args.clients):
            rows.append((f"{clients}, all evaluated", {**overrides, "fraction-evaluate": 1.0}))
        rows.append((str(clients), overrides))
    for label, overrides in rows:
        r = spawn(work, f"scale-{label.replace(', ', '-').replace(' ', '-')}", overrides)
        mean = sum(r["round_s"]) / len(r["round_s"])
        print(f"| {label} | {r['wall_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['round_s'])} | {mean:.1f} | "
              f"{mib(r['peak_pss'])} | {mib(r['peak_rss'])} | {r['processes']} |", flush=True)


def part_cost(work: Path, args) -> None:
    clients = args.cost_clients
    order = list(COST_MODES)
    print(f"\n## cost: {clients} sites, all sampled, {args.rounds} rounds, {args.steps} DP-SGD steps each; "
          f"{args.passes} pass(es), the order reversed every other pass\n")
    print("| pass | mode | wall (s) | per round (s): each | mean | peak PSS |")
    print("|---|---|---|---|---|---|")
    means: dict[str, list[float]] = {label: [] for label in order}
    for p in range(args.passes):
        for label in order if p % 2 == 0 else order[::-1]:
            extra = COST_MODES[label]
            overrides = {**base_overrides(work, clients, args), "min-clients": 3, **extra}
            if extra.get("central-dp"):
                overrides.update(CENTRAL)
            r = spawn(work, label, overrides)
            means[label].append(sum(r["round_s"]) / len(r["round_s"]))
            print(f"| {p + 1} | {label} | {r['wall_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['round_s'])} | "
                  f"{means[label][-1]:.1f} | {mib(r['peak_pss'])} |", flush=True)
    plain = sum(means["plain"]) / len(means["plain"])
    print("\n| mode | mean round (s), all passes | × plain | × plain per pass |")
    print("|---|---|---|---|")
    for label, values in means.items():
        per_pass = ", ".join(f"{v / p:.2f}" for v, p in zip(values, means["plain"]))
        print(f"| {label} | {sum(values) / len(values):.1f} | {sum(values) / len(values) / plain:.2f} | {per_pass} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("scale", "cost", "both"), default="both")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--evaluate-all", action="store_true",
                        help="also run the largest federation with every site evaluated each round")
    parser.add_argument("--cost-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="cost part: passes, alternating the order")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-per-client", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("/tmp/privdistill-bench-scale"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    args.corpus_clients = max(args.clients + [args.cost_clients])
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.corpus_clients, args.train_per_client)
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2 ** 30:.0f} GiB; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    if args.part in ("scale", "both"):
        part_scale(args.work, args)
    if args.part in ("cost", "both"):
        part_cost(args.work, args)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
