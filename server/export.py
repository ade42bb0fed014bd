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
from common.settings import ledger_dir_of

STUDENT_DIR = "student"
MECHANISM_NAMES = {"dp-sgd": "DP-SGD (Poisson-subsampled Gaussian)", "gaussian": "Gaussian mechanism",
                   "laplace": "Laplace mechanism", "pure-epsilon": "pure ε-DP mechanism"}


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def privacy_summary(run_dir: Path, state: dict) -> dict:
    """What the released student inherits, rebuilt from the ledgers (never from the run state)."""
    settings = state["settings"]
    teacher_run = _teacher_run_name(settings)
    runs = {settings.get("name"): "teacher LoRA rounds" if settings.get("mode") != "dp-opd" else "student rounds (dp-opd)"}
    if teacher_run:
        runs[teacher_run] = f"DP teacher's LoRA rounds (run {teacher_run!r})"
    sites = []
    for path in ledger_paths(ledger_dir_of(run_dir, settings)):
        ledger = PrivacyLedger.load(path)
        run_entries = [e for e in ledger.entries if e["run_id"] in runs]
        kinds = Counter(_mechanism_label(e, runs[e["run_id"]]) for e in run_entries)
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
        "covers": _covers(settings, teacher_run) if private else "nothing: trained without DP (a baseline)",
        "sites": sites,
        "user_level": user_level,
        "secure_aggregation": bool(settings.get("secure-aggregation")),
    }


def _mechanism_label(entry: dict, rounds: str = "teacher LoRA rounds") -> str:
    if entry["charge_id"].endswith("/label-histogram"):
        return "label histogram (Gaussian, once)"
    name = MECHANISM_NAMES.get(entry["mechanism"], entry["mechanism"])
    return f"{name}: {rounds}" if entry["mechanism"] == "dp-sgd" else name


def _teacher_run_name(settings: dict) -> str | None:
    """dp-opd with a DP teacher: the name its ledger entries carry."""
    teacher = str(settings.get("opd-teacher", "public")).strip()
    if settings.get("mode") != "dp-opd" or teacher == "public":
        return None
    return json.loads((Path(teacher) / "state.json").read_text())["settings"].get("name")


def _covers(settings: dict, teacher_run: str | None) -> str:
    if settings.get("mode") != "dp-opd":
        return ("record-level (ε, δ)-DP at each site, add/remove adjacency: the student is post-processing of "
                "the DP teacher (DP-SGD LoRA rounds) and of the DP label histogram; distillation on synthetic "
                "text touches no private record")
    teacher = (f"the frozen teacher is run {teacher_run!r}'s DP release (post-processing), and its ε is composed "
               "with the student's in each site's ledger" if teacher_run else
               "the frozen teacher is the public base model, which saw no private record (no cost)")
    return ("record-level (ε, δ)-DP at each site, add/remove adjacency: the student's LoRA is trained with DP-SGD "
            "(per-record clipping of its whole loss on the record's prefix, its own continuation and the "
            f"teacher's constant targets); {teacher}. A teacher trained on private data without DP is refused: its "
            "outputs on one record depend on every other record outside any DP mechanism")


def card_document(run_dir: Path, state: dict, audit: dict | None = None) -> dict:
    settings = state["settings"]
    phases = state.get("phases", {})
    evaluation = phases.get("student-evaluation", {})
    distill = phases.get("distillation") or phases.get("student-rounds", {})
    synthesis = phases.get("synthesis", {})
    keys = ("student", "kd-lambda", "kd-temperature", "kd-beta", "kd-top-k", "kd-kl-start", "distill-steps",
            "distill-batch-size", "distill-learning-rate", "synthetic-records", "prompt-source", "label-source",
            "histogram-epsilon", "gen-temperature", "gen-top-k", "gen-top-p", "gen-no-repeat-ngram", "epsilon",
            "rounds", "local-steps", "batch-size", "learning-rate", "lora-r", "accountant", "opd-teacher",
            "opd-prefix", "opd-max-new-tokens", "opd-temperature", "opd-beta", "opd-lambda", "opd-ce-weight")
    if settings.get("mode") == "dp-opd":  # distildp's synthesis and KD settings do not apply
        keys = ("student",) + keys[keys.index("epsilon"):]
    return {
        "format": "privdistill-privacy", "version": 1, "model": "student", "method": settings.get("mode"),
        "run": settings.get("name"),
        "privacy": privacy_summary(run_dir, state),
        "data": {"sites": len(ledger_paths(ledger_dir_of(run_dir, settings))),
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
             f"A compact causal LM distilled {'on-policy from a frozen teacher' if doc['method'] == 'dp-opd' else 'from a federated DP teacher'}. **Privacy: (ε = {eps}, δ = {delta})** — "
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
              "## Method", "", METHODS.get(doc["method"], METHODS["distildp"]), "",
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


METHODS = {
    "distildp": "DistilDP: the sites fine-tune LoRA adapters of a shared teacher with DP-SGD (Flower FedAvg); the "
                "server samples synthetic text from the DP teacher (control codes drawn by a DP label histogram) and "
                "distils it into this student with (1−λ)·CE + λ·T²·KL + β·MSE(W·h_s, h_t).",
    "dp-opd": "DP-OPD: the sites train this student's LoRA with DP-SGD (Flower FedAvg): per private record the "
              "student continues the record's prefix, a frozen teacher scores prefix + continuation, and the loss "
              "is the generalised JSD (β = opd-beta) over the continuation tokens only, mixed with the same "
              "divergence (1 − opd-lambda) and CE (opd-ce-weight) on the record's own continuation. The teacher is "
              "the public base (no privacy cost) or a DP teacher run's release, whose ε is composed in the same "
              "ledgers; a teacher trained without DP is refused, since its outputs on one record depend on the "
              "other private records outside any DP mechanism.",
}


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
    from transformers import AutoTokenizer

    from server.student_evaluation import load_student, student_dir

    out = phase.run.path / STUDENT_DIR
    load_student(phase).save_pretrained(out)  # distildp's distilled model; dp-opd's base + adapter, merged
    AutoTokenizer.from_pretrained(student_dir(phase)).save_pretrained(out)
    write_cards(phase.run.path)
    return {"directory": STUDENT_DIR}
