"""Benchmark: what the per-token ε of pdss buys and costs, on a finished pdss run's task and teacher.

For each per-token ε (default 1, 4, 16, ∞) every site's training questions are perturbed with the
token-level exponential mechanism (client/pdss.py's mechanism, OS randomness, no ledger touched),
and the run's teacher answers them (server/rationales.py, greedy). Printed per ε:

* per-record ε of the prompts: ε_token × perturbed tokens, typical (median record) and charged
  (the largest record: parallel composition), and composed with the run's DP-SGD plan for the
  student (dp-accounting PLD, as a site's ledger does);
* leakage: the share of private tokens (names, amounts, PIN digits) still in the perturbed prompt,
  and the canary PINs readable whole;
* the teacher's answer accuracy on those prompts (ε = ∞: the raw questions).

Student accuracy per ε needs one federated run per ε: `--students` runs them (minutes each).
The encoder-decoder strategy of issue 13 is not built, so it has no rows.

Usage:  .venv/bin/python benchmarks/pdss.py --run runs/pdss [--epsilons 1 4 16 inf] [--students]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

from client.pdss import build_mechanism, site_records
from common.privacy.accounting import PURE_EPSILON, epsilon_of_events, subsampled_gaussian
from common.privacy.dp_sgd import plan_dp_sgd
from common.settings import MAX_PROMPT_EPSILON, RunSettings
from server.pdss_rationales import load_teacher_generator, public_records
from server.rationales import few_shot_prefix, write_rationales
from simulations.pdss import correct, leakage_counts


def perturbed_prompts(settings, records) -> tuple[list[str], list[int]]:
    if not settings.pdss.perturbs:
        return [r.question for r in records], [0] * len(records)
    mechanism, tokenizer = build_mechanism(settings.model_dir, settings)
    ids = [tokenizer.encode(r.question, add_special_tokens=False) for r in records]
    return [tokenizer.decode(x) for x in mechanism.perturb_batch(ids)], [mechanism.tokens_perturbed(x) for x in ids]


def row_for(settings, epsilon: float, generator, prefix: str, truth: dict) -> dict:
    settings = RunSettings.from_flat({**settings.to_run_config(), "token-epsilon": epsilon})
    p, data_dir = settings.pdss, Path(settings.data_dir)
    ok = total = 0
    leaks, counts = [0, 0, 0], []
    for i in range(settings.clients):
        records = site_records(data_dir / f"client_{i}" / "train.jsonl", settings)
        prompts, tokens = perturbed_prompts(settings, records)
        answers = [w.answer for w in write_rationales(generator, prompts, prefix, p.teacher_max_new_tokens,
                                                      p.teacher_batch_size)]
        ok, total = ok + correct(records, answers), total + len(records)
        leaks = [a + b for a, b in zip(leaks, leakage_counts(truth, f"client_{i}", prompts))]
        counts += tokens
    plan = plan_dp_sgd(len(records), settings.dp.batch_size, settings.dp.local_steps, settings.rounds,
                       settings.dp.epsilon, settings.dp.delta, settings.dp.max_grad_norm, settings.dp.accountant)
    charged = epsilon * max(counts) if math.isfinite(epsilon) else math.inf
    composed = math.inf
    if math.isfinite(charged):
        events = [((PURE_EPSILON, charged), 1), (subsampled_gaussian(plan.noise_multiplier, plan.sample_rate),
                                                plan.total_steps)]
        composed = epsilon_of_events(events, plan.delta, "pld")
    return {"epsilon_token": epsilon, "typical_record_epsilon": epsilon * statistics.median(counts)
            if math.isfinite(epsilon) else math.inf, "charged_record_epsilon": charged,
            "with_dp_sgd": composed, "leakage": leaks[0] / leaks[1], "canaries_read": f"{leaks[2]}/{len(truth['canaries'])}",
            "teacher_accuracy": ok / total}


def student_accuracy(run: Path, label: str, **changes) -> float:
    """Held-out accuracy of a federated student trained by a fresh pdss run on ``run``'s task and models."""
    from simulations.run import prepare_run, simulate

    state = json.loads((run / "state.json").read_text())
    overrides = {**state["settings"], **changes, "name": f"bench-{label}"}
    settings = prepare_run(RunSettings.from_flat(overrides), run.parent / f"{run.name}-{label}", False)
    return simulate(settings)["phases"]["pdss-evaluation"]["accuracy"]


def public_only_accuracy(settings) -> float:
    """The student's base before any private training (public warm-up only): the floor."""
    from client.dp_lora import Site
    from client.pdss_student import heldout_accuracy
    from server.server_app import initial_adapter

    adapter, correct_, total = initial_adapter(settings), 0.0, 0
    for i in range(settings.clients):
        d = Path(settings.data_dir) / f"client_{i}"
        site = Site(f"client_{i}", d / "train.jsonl", d / "heldout.jsonl", d / "unused.json", 1.0,
                    Path(settings.model_dir))
        accuracy, n = heldout_accuracy(site, settings, adapter)
        correct_, total = correct_ + accuracy * n, total + n
    return correct_ / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `privdistill simulate` pdss run")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0, math.inf])
    parser.add_argument("--students", action="store_true", help="also train a federated student per ε (slow)")
    args = parser.parse_args()
    settings = RunSettings.from_flat(json.loads((args.run / "state.json").read_text())["settings"])
    truth = json.loads((Path(settings.data_dir) / "canaries.json").read_text())
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), settings.pdss.teacher_few_shot, settings.seed)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; run {args.run}")
    header = ("ε/token", "record ε (median)", "record ε (charged)", "+ DP-SGD", "leakage", "PINs read",
              "teacher acc") + (("student acc",) if args.students else ())
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for epsilon in args.epsilons:
        started = time.perf_counter()
        r = row_for(settings, epsilon, generator, prefix, truth)
        cells = [f"{r['epsilon_token']:g}", f"{r['typical_record_epsilon']:g}", f"{r['charged_record_epsilon']:g}",
                 f"{r['with_dp_sgd']:.2f}", f"{r['leakage']:.3f}", r["canaries_read"], f"{r['teacher_accuracy']:.3f}"]
        if args.students:  # the prompt budget must cover the charged per-record ε, or the sites refuse
            cap = min(MAX_PROMPT_EPSILON, max(64.0, r["charged_record_epsilon"]))
            cells.append(f"{student_accuracy(args.run, f'eps-{epsilon:g}', **{'token-epsilon': epsilon, 'prompt-epsilon': cap}):.3f}")
        print("| " + " | ".join(cells) + f" |  ({time.perf_counter() - started:.1f}s)")
    print(f"public-only student base (no private training): accuracy {public_only_accuracy(settings):.3f}")
    if args.students:
        answer_only = student_accuracy(args.run, "answer-only", **{"rationale-weight": 0.0})
        print(f"answer-only student (rationale-weight 0, ε_token {settings.pdss.token_epsilon:g}): "
              f"accuracy {answer_only:.3f}")


if __name__ == "__main__":
    main()
