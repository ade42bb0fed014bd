"""The figures of one comparison cell, read off its finished run.

Utility: held-out perplexity over the sites' held-out splits (weighted by records; the sites
computed it in the run), public perplexity (computed here on the public split), parameters.
Privacy: the ε and δ the sites' ledgers report (the largest site's, composed by the ledger's
accountant over every charge on it). Leakage: the built-in audit's loss and Min-K% membership
attacks (members = the sites' training records, non-members = their held-out records) and
the mean exposure of the canaries planted 16 times.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from common.atomic import atomic_write_json, json_safe

from common.audit import exposure, mia
from common.audit.run import audit_records
from common.audit.scoring import token_logprobs
from common.models.build import build_model, count_parameters
from common.models.loading import load_teacher
from common.privacy.ledger import PrivacyLedger, ledger_paths
from common.settings import RunSettings
from server.checkpoint import RunDirectory
from server.export import STUDENT_DIR
from server.student_evaluation import public_perplexity


def figures(cell, run_dir: Path, comparison, bases: Path) -> dict:
    from simulations.compare import METHODS

    state = RunDirectory(run_dir).load_state()
    settings = RunSettings.from_flat(state["settings"])
    what = METHODS[cell.method][1]
    phases = state.get("phases", {})
    if state["settings"]["mode"] == "dp-lora":  # the student (or teacher) fine-tuned at the sites
        model, tokenizer = load_teacher(settings.model_dir, settings.dp, run_dir / state["adapter"])
        last = state["rounds"][-1]["evaluate"] if state["rounds"] else state["baseline"]
        heldout = last["perplexity"]
        seconds = phases.get("teacher-rounds", {}).get("seconds")
    elif what == "teacher":
        model, tokenizer = load_teacher(settings.model_dir, settings.dp, run_dir / state["adapter"])
        heldout = phases["student-evaluation"]["teacher"]["heldout_perplexity"]
        seconds = phases["teacher-rounds"]["seconds"]
    else:
        student_dir = run_dir / STUDENT_DIR
        model = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        heldout = phases["student-evaluation"]["student"]["heldout_perplexity"]
        seconds = sum(p.get("seconds", 0.0) for p in phases.values())
    public = public_perplexity(settings, {"model": model}, tokenizer).get("model")
    epsilon, delta = ledger_epsilon(run_dir, settings)
    return {"heldout_perplexity": heldout, "public_perplexity": public, "parameters": count_parameters(model)[1],
            "epsilon": epsilon, "delta": delta, "wall_seconds": seconds,
            **leakage(model, tokenizer, audit_set(comparison), comparison)}


def ledger_epsilon(run_dir: Path, settings: RunSettings) -> tuple[float, float | None]:
    """The largest site's composed ε (every charge on its ledger) and its δ; ∞ without DP."""
    if not settings.dp.private:
        return math.inf, None
    # a dpkd student charges its teacher run's ledgers: the composed ε there covers both
    ledgers = [PrivacyLedger.load(p) for p in ledger_paths(settings.ledger_dir())]
    if not ledgers:
        return math.nan, None
    return max(l.spent_epsilon() for l in ledgers), max(l.delta for l in ledgers)


def heldout_over_sites(settings: RunSettings, model, model_dir: Path) -> float:
    """A public model's held-out perplexity as the sites report it (per-site loss, weighted by records).
    Computed here because the model is public; a trained model's figure always comes from its run."""
    from client.dp_lora import heldout_perplexity

    loss, records = 0.0, 0
    for i in range(settings.clients):
        ppl, n = heldout_perplexity(model_dir, Path(settings.data_dir) / f"client_{i}" / "heldout.jsonl",
                                    settings.dp, model=model)
        loss, records = loss + math.log(ppl) * n, records + n
    return math.exp(loss / records)


def data_dir_of(comparison) -> Path:
    return Path(comparison.run_values.get("data-dir") or comparison.out / "corpus")


def audit_set(comparison) -> tuple[list[str], list[str], list[dict]]:
    """The same members, non-members and canaries for every cell (a user's corpus may have no canaries)."""
    values = comparison.run_values
    return audit_records(data_dir_of(comparison), int(values.get("clients", 5)), values.get("label-field") or None,
                         comparison.compare.leakage_records, seed=0, require_canaries=False)


def leakage(model, tokenizer, records, comparison) -> dict:
    """MIA AUC (loss, Min-K%) on (members, non-members) and the 16× canaries' mean exposure."""
    c = comparison.compare
    members, nonmembers, canaries = records
    lp_m, lp_n = token_logprobs(model, tokenizer, members), token_logprobs(model, tokenizer, nonmembers)
    scores = {split: {"loss": [mia.loss_score(lp) for lp in lps], "min-k": [mia.min_k_score(lp, 0.2) for lp in lps]}
              for split, lps in (("m", lp_m), ("n", lp_n))}
    report = mia.membership_report(scores["m"], scores["n"], fprs=(0.01,), n_boot=50)
    rows = exposure.exposure_table(model, tokenizer, canaries, n_candidates=c.leakage_candidates, seed=0) \
        if canaries else []
    by_repeats = exposure.summarize_by_repeats(rows)
    return {"mia_auc_loss": report["loss"]["auc"], "mia_auc_min_k": report["min-k"]["auc"],
            "exposure_16": (by_repeats.get(16) or {}).get("mean"),
            "exposure_unplanted": (by_repeats.get(0) or {}).get("mean")}


def floor_figures(comparison, bases: Path, console=None) -> dict:
    """The public base models (never saw a private record): the leakage floor every row is read against."""
    from simulations.compare import _say

    path = comparison.out / "cells" / "floor.json"
    if path.is_file():
        return json.loads(path.read_text())
    _say(console, "floor: scoring the public base models")
    data_dir = data_dir_of(comparison)
    records = audit_set(comparison)
    out = {}
    for role in ("teacher", "student"):
        model, tokenizer = build_model(bases / role).eval(), AutoTokenizer.from_pretrained(bases / role)
        settings = RunSettings.from_flat({**comparison.run_values, "mode": "distildp", "model-dir": str(bases / role),
                                          "data-dir": str(data_dir)})
        out[role] = {"heldout_perplexity": heldout_over_sites(settings, model, bases / role),
                     "public_perplexity": public_perplexity(settings, {"m": model}, tokenizer).get("m"),
                     "parameters": count_parameters(model)[1], **leakage(model, tokenizer, records, comparison)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json_safe(out))
    return out
