"""audit.json, audit.md (one table), roc.png and blocks.png in the run directory, and the
run's privacy card (privacy_card.md) that states the guarantees and links the audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_json


def _eps(epsilon) -> str:
    if epsilon is None:
        return "0 (public data only)"
    return "∞ (no DP)" if math.isinf(epsilon) else f"{epsilon:.2f}"


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else ("inf" if value > 0 else ("-inf" if value < 0 else None))
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def markdown(report: dict) -> str:
    fprs = report["fprs"]
    attacks = list(report["models"][0]["membership"]) if report["models"] else []
    repeats = sorted({int(k) for row in report["models"] for k in row["exposure"]})
    head = ["model", "ε"] + [f"exposure r={r} (mean/max)" for r in repeats]
    head += [f"AUC {a}" for a in attacks] + [f"TPR@{fprs[0]:.0%} {a}" for a in attacks]
    head += ["canaries extracted (greedy/sampled)", "records extracted"]
    lines = [f"# Privacy audit of {report['run']}", "",
             f"{report['members']} members (sites' training records) vs {report['nonmembers']} non-members "
             f"(held-out records, same distribution); {report['canaries']} canaries scored against "
             f"{report['candidates']} random candidates each; per-block σ = {report['block_sigma']}, "
             f"seeds {report['block_seeds']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["models"]:
        cells = [row["label"], _eps(row["epsilon"])]
        for r in repeats:
            e = row["exposure"].get(r) or row["exposure"].get(str(r))
            cells.append(f"{e['mean']:.1f} / {e['max']:.1f}" if e else "–")
        for a in attacks:
            m = row["membership"][a]
            cells.append(f"{m['auc']:.3f} [{m['auc_ci'][0]:.2f}, {m['auc_ci'][1]:.2f}]")
        for a in attacks:
            tpr = row["membership"][a]["tpr_at_fpr"].get(fprs[0])
            cells.append("n/a" if tpr is None else f"{tpr:.3f}")
        ex = row["extraction"]
        cells.append(f"{ex['canaries_greedy']}/{ex['canaries_sampled']} of {ex['canaries']}")
        rec = ex["records"]
        cells.append(f"{rec['extracted']} of {rec['eligible']}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({n for row in report["models"] for m in row["membership"].values() for n in m["notes"]})
    lines += ["", "AUC with a 95% bootstrap interval. Exposure in bits (Secret Sharer, skew-normal extrapolation "
              "over the 10^10 secret space); r = times the canary was planted (0 = never)."]
    if len(fprs) > 1:
        lines += ["", "TPR at lower FPRs (see audit.json): " + "; ".join(
            f"{row['label']}: " + ", ".join(f"{a} {row['membership'][a]['tpr_at_fpr'].get(f)}" for a in attacks)
            for row in report["models"] for f in fprs[1:])]
    lines += [f"- {n}" for n in notes]
    lines += ["", "![ROC curves](roc.png)", "", "![Per-block membership AUC](blocks.png)", ""]
    return "\n".join(lines)


def plots(report: dict, run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    attacks = list(rows[0]["roc"]) if rows else []
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(4 * max(1, len(attacks)), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for row in rows:
            fpr, tpr = row["roc"][attack]
            ax.plot(fpr, tpr, label=f"{row['label']} (AUC {row['membership'][attack]['auc']:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"MIA: {attack}", xlabel="FPR", ylabel="TPR", xscale="linear")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run_dir / "roc.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot([b["block"] for b in row["blocks"]], [b["auc"] for b in row["blocks"]], "o-", label=row["label"])
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set(title=f"Per-block membership AUC (σ={report['block_sigma']})", xlabel="transformer block", ylabel="AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "blocks.png", dpi=110)
    plt.close(fig)


def write_report(report: dict, run_dir: Path) -> None:
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "audit.json", _json_safe(report))
    atomic_write_bytes(run_dir / "audit.md", markdown(report).encode("utf-8"))
    plots(report, run_dir)
    write_privacy_card(run_dir)


def write_privacy_card(run_dir: Path) -> Path:
    """privacy_card.md: what the run guarantees (from the ledgers), what it protects, the audit."""
    from common.privacy.ledger import PrivacyLedger, ledger_paths
    from common.settings import ledger_dir_of

    run_dir = Path(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    settings = state["settings"]
    lines = [f"# Privacy card: {settings.get('name', run_dir.name)}", "",
             f"Mode `{settings.get('mode')}`, {state['completed_round']} of {settings.get('rounds')} rounds completed.",
             ""]
    if settings.get("private", True):
        lines += ["**Guarantee:** record-level (ε, δ)-DP per site, from DP-SGD on the LoRA adapters "
                  "(opacus, Poisson sampling, per-record clipping)"
                  + (" and one DP label histogram (Gaussian)" if settings.get("mode") == "distildp" else "")
                  + (" of the student (dp-opd), composed with its DP teacher's charges when it has one"
                     if settings.get("mode") == "dp-opd" else "")
                  + ", composed over every round by each site's ledger accountant "
                  f"({settings.get('accountant', 'rdp').upper()}). It protects each single record of a site's "
                  "private text; it does not hide a site's participation.", "",
                  "| site | ε spent | δ | budget ε | charges |", "|---|---|---|---|---|"]
        for path in ledger_paths(ledger_dir_of(run_dir, settings)):
            ledger = PrivacyLedger.load(path)
            lines.append(f"| {ledger.client_id} | {ledger.spent_epsilon():.3f} | {ledger.delta:.1e} | "
                         f"{ledger.epsilon_budget:g} | {len(ledger.entries)} |")
        secure = bool(settings.get("secure-aggregation"))
        if secure:
            lines += ["", "**Secure aggregation (SecAgg+):** the server saw only the mean of each round's sampled "
                          "sites' adapters, never one site's update; this protects updates from the server, and adds "
                          "no (ε, δ) of its own."]
        server = run_dir / "server_ledger.json"
        if server.exists():
            ledger = PrivacyLedger.load(server)
            where = "at each site before masking (Flower's client-side" if secure else "by the server (Flower's server-side"
            lines += ["", f"**Also user-level central DP:** each site's whole update clipped to C = "
                          f"{settings.get('central-clip')} {where} fixed clipping) and Gaussian noise on the mean, "
                          f"accounted by the server ledger's {ledger.accountant.upper()} accountant as a subsampled "
                          f"Gaussian per round: "
                          f"ε = {ledger.spent_epsilon():.3f} at δ = {ledger.delta:.1e} for a site's entire "
                          f"contribution (budget {ledger.epsilon_budget:g}); see server_ledger.json."]
    else:
        lines += ["**No differential privacy:** this run trained without clipping or noise (an audit baseline). "
                  "Nothing bounds what it leaks."]
    lines += ["", "Audit (what the released adapter actually leaks): "
              + ("[audit.md](audit.md)" if (run_dir / "audit.md").exists() else "not run yet "
                 "(`privdistill audit --run RUN_DIR`)"), ""]
    path = run_dir / "privacy_card.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path
