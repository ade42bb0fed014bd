"""Benchmark: does the pdss step-by-step student learn under DP-SGD? Held-out accuracy per round.

Reuses one finished pdss run's teacher and student base (both warmed on the public split only)
and trains only the federated students, so one trial costs about a minute, not a full run:

* the task: the run's generator settings, or ``task-train-per-client`` / ``task-heldout-per-client``
  changed (regenerated under the run's seed into OUT/data-<train>-<heldout>; the public split, so
  the teacher and base, do not change with them);
* prompts and rationales: every training question perturbed by the run's token-level exponential
  mechanism (client/pdss.py's, OS randomness, no ledger) and answered by the run's teacher
  (server/rationales.py), once per task, cached in OUT;
* per repeat: fresh ledgers and plan stores in a temporary directory; every round each site runs
  client/pdss_student.train_round (real opacus DP-SGD, charged) from the global student, the
  replies are averaged weighted by records used (what Flower's FedAvg computes), and each site's
  held-out exact-match accuracy of the new global student is recorded.

``student-warmup-steps`` in a trial re-warms the student base on the public split
(OUT/student-base-<steps>), as simulations/pdss.py does; the public-only base (round 0) is the floor.

Usage:  .venv/bin/python benchmarks/pdss_student_curve.py --run runs/pdss [--repeats 2] [--out DIR] \
            [--trial "NAME key=value ..."]...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from client.dp_lora import Site
from client.pdss import build_mechanism, site_records
from client.pdss_student import heldout_accuracy, train_round
from common.settings import RunSettings
from server.pdss_rationales import load_teacher_generator, public_records
from server.rationales import few_shot_prefix, write_rationales
from common.models.student_update import initial_student

HARNESS_KEYS = ("student-warmup-steps",)  # trial keys this script acts on before the settings


def parse_trial(text: str) -> tuple[str, dict]:
    name, *pairs = text.split()
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            changes[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            changes[key] = value
    return name, changes


def task_for(settings: RunSettings, out: Path) -> Path:
    """The data directory for the settings' generator counts (the run's own if they match)."""
    from common.data.arithmetic import generate_task

    manifest = json.loads((Path(settings.data_dir) / "manifest.json").read_text())["counts"]
    if (manifest["train_per_client"], manifest["heldout_per_client"]) == (settings.task_train_per_client,
                                                                          settings.task_heldout_per_client):
        return Path(settings.data_dir)
    data = out / f"data-{settings.task_train_per_client}-{settings.task_heldout_per_client}"
    if not (data / "manifest.json").exists():
        generate_task(data, n_clients=settings.clients, seed=settings.seed,
                      train_per_client=settings.task_train_per_client,
                      heldout_per_client=settings.task_heldout_per_client)
    return data


def rationales_for(settings: RunSettings, data: Path, run: Path, out: Path) -> dict[str, list[str]]:
    """Teacher rationales for each site's perturbed training questions (the run's own when the data is)."""
    if data == Path(settings.data_dir):
        sites = json.loads((run / "pdss" / "rationales.json").read_text())["sites"]
        return {client: [r["rationale"] for r in rows] for client, rows in sites.items()}
    cache = data / f"rationales-eps{settings.pdss.token_epsilon:g}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    mechanism, tokenizer = build_mechanism(settings.model_dir, settings)
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), settings.pdss.teacher_few_shot, settings.seed)
    written = {}
    for i in range(settings.clients):
        records = site_records(data / f"client_{i}" / "train.jsonl", settings)
        ids = [tokenizer.encode(r.question, add_special_tokens=False) for r in records]
        prompts = [tokenizer.decode(x) for x in mechanism.perturb_batch(ids)] if settings.pdss.perturbs else \
            [r.question for r in records]
        written[f"client_{i}"] = [w.rationale for w in write_rationales(
            generator, prompts, prefix, settings.pdss.teacher_max_new_tokens, settings.pdss.teacher_batch_size)]
    cache.write_text(json.dumps(written))
    return written


def student_base(settings: RunSettings, steps: int, out: Path) -> str:
    """The run's student base, or one re-warmed for ``steps`` on the public split."""
    if steps == settings.pdss.student_warmup_steps:
        return settings.model_dir
    from transformers import AutoTokenizer

    from common.models.warmup import warmup_teacher

    base = out / f"student-base-{steps}"
    if not (base / "config.json").exists():
        public = public_records(settings)
        texts = [f"predict: {r.question}\n{r.answer}" for r in public] + \
                [f"explain: {r.question}\n{r.rationale}" for r in public if r.rationale]
        warmup_teacher(texts, base, spec=settings.pdss.student_spec, steps=steps, seed=settings.seed,
                       progress=False, tokenizer=AutoTokenizer.from_pretrained(settings.pdss.teacher_dir))
    return str(base)


def fedavg(replies: list[tuple[dict, int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in replies)
    return {k: sum(a[k].astype(np.float64) * n for a, n in replies) / total for k in replies[0][0]}


def accuracy_of(sites, settings, model) -> float:
    correct = total = 0.0
    for site in sites:
        accuracy, n = heldout_accuracy(site, settings, model)
        correct, total = correct + accuracy * n, total + n
    return correct / total


def federated_curve(settings: RunSettings, data: Path, rationales: dict, scratch: Path) -> list[float]:
    """Held-out accuracy of the global student after each round (index 0: the public-only base)."""
    sites = [Site(f"client_{i}", data / f"client_{i}" / "train.jsonl", data / f"client_{i}" / "heldout.jsonl",
                  scratch / f"client_{i}.json", 1e4, Path(settings.model_dir)) for i in range(settings.clients)]
    model = initial_student(settings)
    curve = [accuracy_of(sites, settings, model)]
    for server_round in range(1, settings.rounds + 1):
        replies = []
        for site in sites:
            update, metrics, refusal = train_round(site, settings, "curve", server_round, rationales[site.client_id],
                                                   model)
            if refusal:
                raise RuntimeError(f"{site.client_id} refused round {server_round}: {refusal}")
            replies.append((update, int(metrics["num-examples"])))
        model = fedavg(replies)
        curve.append(accuracy_of(sites, settings, model))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `privdistill simulate` pdss run")
    parser.add_argument("--out", type=Path, default=None, help="cache of regenerated tasks and bases "
                                                              "(default RUN-curve)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trial", action="append", default=[], help='"NAME key=value ..." (repeatable); '
                                                                     "none: the run's own settings")
    args = parser.parse_args()
    out = args.out or args.run.parent / f"{args.run.name}-curve"
    out.mkdir(parents=True, exist_ok=True)
    flat = json.loads((args.run / "state.json").read_text())["settings"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
          f"run {args.run}; {args.repeats} repeats")
    print("| trial | changes | accuracy by round (mean over repeats) | final (min–max) | s/repeat |\n|---|---|---|---|---|")
    for name, changes in [parse_trial(t) for t in args.trial] or [("run", {})]:
        settings = RunSettings.from_flat({**flat, **{k: v for k, v in changes.items() if k not in HARNESS_KEYS}})
        settings.model_dir = student_base(settings, int(changes.get("student-warmup-steps",
                                                                     settings.pdss.student_warmup_steps)), out)
        data = task_for(settings, out)
        rationales = rationales_for(settings, data, args.run, out)
        curves, started = [], time.perf_counter()
        for _ in range(args.repeats):
            scratch = Path(tempfile.mkdtemp(prefix="pdss-curve-"))
            try:
                curves.append(federated_curve(settings, data, rationales, scratch))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        means = [statistics.mean(c[r] for c in curves) for r in range(len(curves[0]))]
        finals = [c[-1] for c in curves]
        seconds = (time.perf_counter() - started) / args.repeats
        print(f"| {name} | {' '.join(f'{k}={v}' for k, v in changes.items()) or '–'} | "
              f"{' → '.join(f'{m:.3f}' for m in means)} | {statistics.mean(finals):.3f} "
              f"({min(finals):.3f}–{max(finals):.3f}) | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
