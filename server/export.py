"""Phase `export`: the student as a Hugging Face model directory with its privacy card.

RUN_DIR/student/ holds ``save_pretrained`` of model and tokenizer (so
``AutoModelForCausalLM.from_pretrained(dir)`` loads it), ``privacy.json`` (the (ε, δ) it
inherits, from the sites' ledgers; every mechanism that touched private data) and a
``README.md`` model card. Nothing private is written: no record, canary or label count.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_json, json_safe
from common.privacy.ledger import PrivacyLedger, ledger_paths

STUDENT_DIR = "student"
MECHANISM_NAMES = {"dp-sgd": "DP-SGD (Poisson-subsampled Gaussian)", "gaussian": "Gaussian mechanism",
                   "laplace": "Laplace mechanism", "pure-epsilon": "pure ε-DP mechanism"}


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def privacy_summary(run_dir: Path, state: dict) -> dict:
    """What the released student inherits, rebuilt from the ledgers (never from the run state)."""
    settings = state["settings"]
    sites = []
    for path in ledger_paths(run_dir / "ledgers"):
        ledger = PrivacyLedger.load(path)
        run_entries = [e for e in ledger.entries if e["run_id"] == settings.get("name")]
        kinds = Counter(_mechanism_label(e) for e in run_entries)
        sites.append({"site": ledger.client_id, "epsilon": ledger.spent_epsilon(), "delta": ledger.delta,
                      "budget": ledger.epsilon_budget, "accountant": ledger.accountant,
                      "epsilon_by_accountant": ledger.epsilon_by_accountant(),
                      "mechanisms": [{"mechanism": k, "releases": n} for k, n in sorted(kinds.items())]})
    private = settings.get("private", True)
    user_level = None
    server = run_dir / "server_ledger.json"
    if server.exists():
        ledger = PrivacyLedger.load(server)
        user_level = {"epsilon": ledger.spent_epsilon(), "delta": ledger.delta,
                      "covers": "a site's entire contribution (central DP on the aggregated updates)"}
    return {
        "private": private,
        "epsilon": max((s["epsilon"] for s in sites), default=0.0) if private else math.inf,
        "delta": max((s["delta"] for s in sites), default=None) if private else None,
        "covers": ("record-level (ε, δ)-DP at each site, add/remove adjacency: the student is post-processing of "
                   "the DP teacher (DP-SGD LoRA rounds) and of the DP label histogram; distillation on synthetic "
                   "text touches no private record") if private else "nothing: trained without DP (a baseline)",
        "sites": sites,
        "user_level": user_level,
        "secure_aggregation": bool(settings.get("secure-aggregation")),
    }


def _mechanism_label(entry: dict) -> str:
    if entry["charge_id"].endswith("/label-histogram"):
        return "label histogram (Gaussian, once)"
    name = MECHANISM_NAMES.get(entry["mechanism"], entry["mechanism"])
    return f"{name}: teacher LoRA rounds" if entry["mechanism"] == "dp-sgd" else name


def card_document(run_dir: Path, state: dict, audit: dict | None = None) -> dict:
    settings = state["settings"]
    phases = state.get("phases", {})
    evaluation = phases.get("student-evaluation", {})
    distill = phases.get("distillation", {})
    synthesis = phases.get("synthesis", {})
    keys = ("student", "kd-lambda", "kd-temperature", "kd-beta", "kd-top-k", "kd-kl-start", "distill-steps",
            "distill-batch-size", "distill-learning-rate", "synthetic-records", "prompt-source", "label-source",
            "histogram-epsilon", "gen-temperature", "gen-top-k", "gen-top-p", "gen-no-repeat-ngram", "epsilon",
            "rounds", "local-steps", "batch-size", "learning-rate", "lora-r", "accountant")
    return {
        "format": "privdistill-privacy", "version": 1, "model": "student", "method": settings.get("mode"),
        "run": settings.get("name"),
        "privacy": privacy_summary(run_dir, state),
        "data": {"sites": len(ledger_paths(run_dir / "ledgers")),
                 "synthetic_records": distill.get("synthetic_records"),
                 "note": "private record counts and label counts are not published"},
        "models": {"student_parameters": distill.get("student_parameters"),
                   "teacher_parameters": distill.get("teacher_parameters")},
        # Held-out record counts are private statistics without DP: the card keeps perplexities only.
        "evaluation": {who: {k: v for k, v in (evaluation.get(who) or {}).items() if k != "records"}
                       for who in ("student", "teacher")},
        "synthesis": {k: synthesis.get(k) for k in ("filter", "tokens_per_second") if k in synthesis},
        "settings": {k: settings[k] for k in keys if k in settings},
        "audit": audit,
    }


def model_card(doc: dict) -> str:
    p = doc["privacy"]
    eps = "∞ (no DP)" if not p["private"] else f"{p['epsilon']:.3f}"
    delta = "–" if p["delta"] is None else f"{p['delta']:.1e}"
    ev = doc["evaluation"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [differential-privacy, knowledge-distillation, federated-learning, privdistill]", "---", "",
             f"# privdistill student ({doc['method']}, run `{doc['run']}`)", "",
             f"A compact causal LM distilled from a federated DP teacher. **Privacy: (ε = {eps}, δ = {delta})** — "
             f"{p['covers']}.", "",
             "## Privacy", "", "| site | ε | δ | mechanisms on its data |", "|---|---|---|---|"]
    for site in p["sites"]:
        mechanisms = "; ".join(f"{m['mechanism']} ×{m['releases']}" for m in site["mechanisms"])
        lines.append(f"| {site['site']} | {site['epsilon']:.3f} | {site['delta']:.1e} | {mechanisms} |")
    if p["sites"]:
        others = ", ".join(f"{name.upper()} {eps:.3f}" for name, eps in p["sites"][0]["epsilon_by_accountant"].items())
        lines += ["", f"The student's ε is the largest site's: the {p['sites'][0]['accountant'].upper()} accountant "
                      "(dp-accounting) composing every mechanism charged to that site's ledger (other accountants on "
                      f"{p['sites'][0]['site']}: {others}). δ is the probability with which the ε bound may fail; it "
                      "is below 1/(10·records) at every site."]
    if p["user_level"]:
        lines += ["", f"Also user-level central DP: ε = {p['user_level']['epsilon']:.3f} at "
                      f"δ = {p['user_level']['delta']:.1e} for {p['user_level']['covers']}."]
    if p["secure_aggregation"]:
        lines += ["", "The teacher's rounds used secure aggregation (SecAgg+): the server saw only sums."]
    s, t = ev.get("student") or {}, ev.get("teacher") or {}
    lines += ["", "## Evaluation", "", "| model | parameters | held-out perplexity (sites) | public perplexity |",
              "|---|---|---|---|",
              f"| teacher | {doc['models']['teacher_parameters']:,} | {_fmt(t.get('heldout_perplexity'))} | "
              f"{_fmt(t.get('public_perplexity'))} |",
              f"| student | {doc['models']['student_parameters']:,} | {_fmt(s.get('heldout_perplexity'))} | "
              f"{_fmt(s.get('public_perplexity'))} |", "",
              "## Method", "", "DistilDP: the sites fine-tune LoRA adapters of a shared teacher with DP-SGD (Flower "
              "FedAvg); the server samples synthetic text from the DP teacher (control codes drawn by a DP label "
              "histogram) and distils it into this student with (1−λ)·CE + λ·T²·KL + β·MSE(W·h_s, h_t).", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in doc["settings"].items()]
    if doc.get("audit"):
        lines += ["", "## Audit (what the released models leak)", "", "| model | ε | MIA AUC (loss) | MIA AUC (min-k) "
                  "| mean exposure of 16× canaries (bits) |", "|---|---|---|---|---|"]
        for row in doc["audit"]["models"]:
            lines.append(f"| {row['label']} | {row['epsilon']} | {_fmt(row['auc_loss'])} | {_fmt(row['auc_min_k'])} | "
                         f"{_fmt(row['exposure_16'])} |")
    lines += ["", "Load it with `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`.", ""]
    return "\n".join(lines)


def audit_summary(report: dict) -> dict:
    """The audit's headline figures per model, for the card (the full report is RUN_DIR/audit.md)."""
    rows = []
    for row in report["models"]:
        exposure16 = row["exposure"].get(16) or row["exposure"].get("16") or {}
        rows.append({"label": row["label"], "epsilon": _eps_text(row["epsilon"]),
                     "auc_loss": row["membership"]["loss"]["auc"], "auc_min_k": row["membership"]["min-k"]["auc"],
                     "exposure_16": exposure16.get("mean")})
    return {"report": "../audit.md", "members": report["members"], "models": rows}


def _eps_text(epsilon) -> str:
    if epsilon is None:
        return "0 (public only)"
    return "∞" if math.isinf(epsilon) else f"{epsilon:.2f}"


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def write_cards(run_dir: Path, audit: dict | None = None) -> Path:
    """privacy.json and README.md beside the exported student (again after an audit)."""
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    doc = card_document(run_dir, state, audit)
    out = run_dir / STUDENT_DIR
    atomic_write_json(out / "privacy.json", json_safe(doc))
    atomic_write_bytes(out / "README.md", model_card(doc).encode("utf-8"))
    return out



def run(phase) -> dict:
    from server.student_evaluation import load_student

    out = phase.run.path / STUDENT_DIR
    student = load_student(phase)
    student.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(phase.run.path / phase.summary_of("distillation")["student"]).save_pretrained(out)
    write_cards(phase.run.path)
    return {"directory": STUDENT_DIR}
