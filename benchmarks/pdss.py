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

* the rationale the student would train on is right (it states the computation that gives the
  record's answer: "x op y = answer"): the teacher's (exponential) or the decoder's (encoder-decoder);
  and, for encoder-decoder, the decoder's with the teacher's rationale blanked (what the teacher adds);
* encoder-decoder: the share of rewrites whose template tokens differ from their question's: how
  much the encoder reshapes (it sees the private question, which is why a site perturbs every token
  of a rewrite, sent as exactly privatiser-prompt-tokens tokens, and is charged for all of them).

``--strategies exponential encoder-decoder`` adds rows for the encoder-decoder privatiser
(client/pdss_privatiser.py): per ε its public examples are built with the run's teacher (as phase
pdss-privatiser does), the privatiser is trained once (kept under RUN/bench-privatiser by digest),
its encoder rewrites each question, the mechanism perturbs every token of the rewrite cut or padded
to privatiser-prompt-tokens (the per-record ε: ε_token × that), the teacher answers, and the decoder
writes the rationale for the raw question.

Student accuracy per cell needs one federated run per (strategy, ε): `--students` runs them
(minutes each). ``--plot`` writes accuracy and leakage against ε_token (benchmarks/pdss.png).

Usage:  .venv/bin/python benchmarks/pdss.py --run runs/pdss [--epsilons 1 4 16 inf]
            [--strategies exponential encoder-decoder] [--students] [--plot benchmarks/pdss.png] [--json ROWS]
        .venv/bin/python benchmarks/pdss.py --replot ROWS --plot benchmarks/pdss.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from pathlib import Path

from client.pdss import build_mechanism, rewrite_mechanism, site_records
from common.privacy.accounting import PURE_EPSILON, epsilon_of_events, subsampled_gaussian
from common.privacy.dp_sgd import plan_dp_sgd
from common.data.task import normalise_answer
from common.settings import MAX_PROMPT_EPSILON, PRIVATISERS, RunSettings
from server.pdss_rationales import load_teacher_generator, public_records
from server.rationales import few_shot_prefix, write_rationales
from simulations.pdss import correct, leakage_counts


def perturbed_prompts(settings, questions: list[str]) -> tuple[list[str], list[int]]:
    """The mechanism's output on each question (OS randomness) and its tokens perturbed; an
    encoder-decoder rewrite as a site sends it (exactly privatiser-prompt-tokens, all perturbed)."""
    mechanism, tokenizer = build_mechanism(settings.model_dir, settings)
    if settings.pdss.encoder_decoder:
        mechanism, ids_of = rewrite_mechanism(mechanism, tokenizer, settings.pdss.privatiser_prompt_tokens)
        ids = [ids_of(q) for q in questions]
    else:
        ids = [tokenizer.encode(q, add_special_tokens=False) for q in questions]
    counts = [mechanism.tokens_perturbed(x) for x in ids]
    if not settings.pdss.perturbs:
        return list(questions), counts
    return [tokenizer.decode(x) for x in mechanism.perturb_batch(ids)], counts


def trained_privatiser(settings, run: Path, generator):
    """The encoder-decoder privatiser for these settings, built as phase pdss-privatiser builds it."""
    from client.dp_lora import Site
    from client.pdss_privatiser import ensure_privatiser, load_privatiser
    from server.pdss_privatiser import public_examples

    keep = run / "bench-privatiser" / "site.json"  # privatisers are kept by digest beside this (unused) ledger
    site = Site("bench", keep, keep, keep, 1.0, Path(settings.model_dir))
    digest, info = ensure_privatiser(site, settings, public_examples(settings, generator))
    return load_privatiser(site, settings, digest), info


def skeleton(mechanism, tokenizer, text: str) -> list[int]:
    """The pass-through tokens of a text, in order: what the mechanism sends unperturbed and uncharged."""
    return [t for t in tokenizer.encode(text, add_special_tokens=False) if mechanism.passes(t)]


def right_computation(rationale: str, answer: str) -> bool:
    """Does the rationale state a computation "x op y = v" that holds and gives the record's answer?"""
    m = re.match(r"\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)", rationale)
    if not m:
        return False
    x, op, y, v = int(m[1]), m[2], int(m[3]), int(m[4])
    value = x + y if op == "+" else x - y if op == "-" else x * y
    return value == v and normalise_answer(str(v)) == normalise_answer(answer)


def row_for(settings, epsilon: float, strategy: str, generator, prefix: str, truth: dict, run: Path) -> dict:
    settings = RunSettings.from_flat({**settings.to_run_config(), "token-epsilon": epsilon, "privatiser": strategy})
    p, data_dir = settings.pdss, Path(settings.data_dir)
    privatiser, info = trained_privatiser(settings, run, generator) if p.encoder_decoder else (None, {})
    mechanism, tokenizer = build_mechanism(settings.model_dir, settings)
    ok = right = blind_right = total = empty = reshaped = 0
    leaks, counts = [0, 0, 0], []
    for i in range(settings.clients):
        records = site_records(data_dir / f"client_{i}" / "train.jsonl", settings)
        questions = [r.question for r in records]
        if privatiser:  # the encoder's rewrite is what the mechanism perturbs (an empty one: the question)
            rewrites = privatiser.encode(questions)
            empty += sum(not w for w in rewrites)
            reshaped += sum(skeleton(mechanism, tokenizer, w or q) != skeleton(mechanism, tokenizer, q)
                            for w, q in zip(rewrites, questions))
            questions = [w or q for w, q in zip(rewrites, questions)]
        prompts, tokens = perturbed_prompts(settings, questions)
        written = write_rationales(generator, prompts, prefix, p.teacher_max_new_tokens, p.teacher_batch_size)
        targets = [w.rationale for w in written]
        if privatiser:
            raw = [r.question for r in records]
            targets = privatiser.decode(prompts, targets, raw)
            blind = privatiser.decode(prompts, [""] * len(raw), raw)  # what the teacher's rationale adds
            blind_right += sum(right_computation(t, r.answer) for t, r in zip(blind, records))
        ok, total = ok + correct(records, [w.answer for w in written]), total + len(records)
        right += sum(right_computation(t, r.answer) for t, r in zip(targets, records))
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
    return {"strategy": strategy, "epsilon_token": epsilon,
            "typical_record_epsilon": epsilon * statistics.median(counts) if math.isfinite(epsilon) else math.inf,
            "charged_record_epsilon": charged, "median_tokens_perturbed": statistics.median(counts),
            "with_dp_sgd": composed, "leakage": leaks[0] / leaks[1], "canaries_read": f"{leaks[2]}/{len(truth['canaries'])}",
            "teacher_accuracy": ok / total, "rationale_correct": right / total, "encoder_empty": empty,
            "decoded_without_teacher_correct": blind_right / total if privatiser else None,
            "skeleton_changed": reshaped / total if privatiser else None,
            "privatiser_loss": [info.get("loss_first"), info.get("loss_last_10")] if info else None}


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
    from common.models.student_update import initial_student

    adapter, correct_, total = initial_student(settings), 0.0, 0
    for i in range(settings.clients):
        d = Path(settings.data_dir) / f"client_{i}"
        site = Site(f"client_{i}", d / "train.jsonl", d / "heldout.jsonl", d / "unused.json", 1.0,
                    Path(settings.model_dir))
        accuracy, n = heldout_accuracy(site, settings, adapter)
        correct_, total = correct_ + accuracy * n, total + n
    return correct_ / total


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy and leakage against ε_token, one line per strategy (∞ drawn at the right end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["epsilon_token"] for r in rows if math.isfinite(r["epsilon_token"])})
    at_inf = (finite[-1] * 4) if finite else 1.0
    x_of = lambda e: e if math.isfinite(e) else at_inf  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    metrics = (("teacher_accuracy", "teacher accuracy (on what it saw)", "C0"),
               ("rationale_correct", "student's rationale right", "C1"),
               ("student_accuracy", "student accuracy", "C2"))
    for strategy, style in (("exponential", "o-"), ("encoder-decoder", "s--")):  # colour: metric; line: strategy
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: x_of(r["epsilon_token"]))
        if not mine:
            continue
        xs = [x_of(r["epsilon_token"]) for r in mine]
        for key, label, colour in metrics:
            if all(key in r for r in mine):
                ys = [math.nan if r[key] is None else r[key] for r in mine]  # None: a cell the sites refused
                left.plot(xs, ys, style, color=colour, label=f"{strategy}: {label}")
        right.plot(xs, [r["leakage"] for r in mine], style, color="C3", label=strategy)
    ticks = finite + [at_inf]
    for ax, title in ((left, "accuracy"), (right, "leakage (private tokens surviving)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
        ax.set_xlabel("ε per token")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished `privdistill simulate` pdss run")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0, math.inf])
    parser.add_argument("--strategies", nargs="+", default=["exponential"], choices=PRIVATISERS)
    parser.add_argument("--students", action="store_true", help="also train a federated student per cell (slow)")
    parser.add_argument("--plot", type=Path, help="write accuracy and leakage against ε here (png)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--replot", type=Path, help="only redraw --plot from rows a --json wrote")
    args = parser.parse_args()
    if args.replot:
        return plot(json.loads(args.replot.read_text()), args.plot or Path("benchmarks/pdss.png"))
    if args.run is None:
        parser.error("--run is required (or --replot ROWS.json)")
    settings = RunSettings.from_flat(json.loads((args.run / "state.json").read_text())["settings"])
    truth = json.loads((Path(settings.data_dir) / "canaries.json").read_text())
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), settings.pdss.teacher_few_shot, settings.seed)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; run {args.run}")
    header = ("strategy", "ε/token", "record ε (median)", "record ε (charged)", "+ DP-SGD", "leakage", "PINs read",
              "teacher acc", "rationale right", "decoded w/o teacher", "skeleton changed") + \
        (("student acc",) if args.students else ())
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows = []
    for strategy in args.strategies:
        for epsilon in args.epsilons:
            started = time.perf_counter()
            r = row_for(settings, epsilon, strategy, generator, prefix, truth, args.run)
            cells = [strategy, f"{r['epsilon_token']:g}", f"{r['typical_record_epsilon']:g}",
                     f"{r['charged_record_epsilon']:g}", f"{r['with_dp_sgd']:.2f}", f"{r['leakage']:.3f}",
                     r["canaries_read"], f"{r['teacher_accuracy']:.3f}", f"{r['rationale_correct']:.3f}",
                     *("–" if r[k] is None else f"{r[k]:.3f}" for k in ("decoded_without_teacher_correct",
                                                                         "skeleton_changed"))]
            if args.students and MAX_PROMPT_EPSILON < r["charged_record_epsilon"] < math.inf:  # every site refuses
                r["student_accuracy"] = None
                cells.append(f"refused (ε {r['charged_record_epsilon']:g} per record > {MAX_PROMPT_EPSILON:g})")
            elif args.students:  # the prompt budget must cover the charged per-record ε, or the sites refuse
                cap = min(MAX_PROMPT_EPSILON, max(64.0, r["charged_record_epsilon"]))
                r["student_accuracy"] = student_accuracy(args.run, f"{strategy}-eps-{epsilon:g}", **{
                    "token-epsilon": epsilon, "prompt-epsilon": cap, "privatiser": strategy})
                cells.append(f"{r['student_accuracy']:.3f}")
            r["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(r)
            extra = f"; privatiser loss {r['privatiser_loss']}, empty rewrites {r['encoder_empty']}" \
                if r["privatiser_loss"] else ""
            print("| " + " | ".join(cells) + f" |  ({r['seconds']}s{extra})", flush=True)
            if args.json:  # after every row: a cut benchmark keeps what it measured
                args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    if args.plot:
        plot(rows, args.plot)
    print(f"public-only student base (no private training): accuracy {public_only_accuracy(settings):.3f}")
    if args.students:
        answer_only = student_accuracy(args.run, "answer-only", **{"rationale-weight": 0.0})
        print(f"answer-only student (rationale-weight 0, ε_token {settings.pdss.token_epsilon:g}): "
              f"accuracy {answer_only:.3f}")


if __name__ == "__main__":
    main()
