"""compare.json, compare.md and compare.png of a comparison (figures per method × ε, over seeds)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_json, json_safe

COLUMNS = ("heldout_perplexity", "public_perplexity", "mia_auc_loss", "mia_auc_min_k", "exposure_16")
TASK_COLUMNS = ("accuracy", "teacher_accuracy_seen", "leakage", "canaries_read_back")  # the pdss rows (on the task)


def is_task_row(row: dict) -> bool:
    return "accuracy" in row


def _num(x) -> float:
    if x == "inf":
        return math.inf
    return math.nan if x is None else float(x)


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (method, ε): each figure's mean over seeds and its spread (max − min)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["method"], _num(cell["epsilon_target"])), []).append(cell)
    rows = []
    for (method, eps), group in groups.items():
        row = {"method": method, "epsilon_target": eps, "seeds": [c["seed"] for c in group],
               "parameters": group[0]["parameters"],
               "epsilon": max(_num(c["epsilon"]) for c in group),
               "delta": max((_num(c["delta"]) for c in group if c.get("delta") is not None), default=None),
               "wall_seconds": statistics.mean(_num(c["wall_seconds"]) for c in group)}
        for column in TASK_COLUMNS if "accuracy" in group[0] else COLUMNS:
            values = [_num(c.get(column)) for c in group if c.get(column) is not None]
            row[column] = statistics.mean(values) if values else math.nan
            row[column + "_spread"] = (max(values) - min(values)) if len(values) > 1 else None
        rows.append(row)
    return rows


def gap_closed(rows: list[dict]) -> dict:
    """Per finite ε: (PPL_dp-sgd-student − PPL_best private) / (PPL_dp-sgd-student − PPL_nonprivate-kd)."""
    rows = [r for r in rows if not is_task_row(r)]
    upper = next((r["heldout_perplexity"] for r in rows if r["method"] == "nonprivate-kd"), None)
    out = {}
    for eps in sorted({r["epsilon_target"] for r in rows if math.isfinite(r["epsilon_target"])}):
        at = {r["method"]: r["heldout_perplexity"] for r in rows if r["epsilon_target"] == eps}
        base = at.get("dp-sgd-student")
        private = {m: p for m, p in at.items() if m not in ("teacher", "dp-sgd-student")}
        if upper is None or base is None or not private or base == upper:
            continue
        best = min(private, key=private.get)
        out[str(eps)] = {"best": best, "ratio": (base - private[best]) / (base - upper)}
    return out


def _fmt(x, spread=None, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    text = f"{x:.{digits}f}"
    return text + (f" ± {spread / 2:.{digits}f}" if spread else "")


def _delta(delta) -> str:
    return "–" if delta is None or (isinstance(delta, float) and math.isnan(delta)) else f"{delta:.0e}"


def markdown(document: dict, rows: list[dict], gaps: dict) -> str:
    m, c = document["machine"], document["compare"]
    lines = [f"# privdistill compare ({document['config']})", "",
             f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['threads']} threads)"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f". Seeds: {c['seeds']}; teacher "
             f"{c['teacher_model']}, student {c['student_model']}.", "",
             "| method | ε target | ε (ledgers) | δ | params | held-out ppl | public ppl | MIA AUC loss | "
             "MIA AUC min-k | exposure 16× (bits) | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(c["methods"])}
    task_rows = sorted((r for r in rows if is_task_row(r)), key=lambda r: (order.get(r["method"], 99), r["epsilon_target"]))
    rows = [r for r in rows if not is_task_row(r)]
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 99), r["epsilon_target"])):
        lines.append(f"| {r['method']} | {_fmt(r['epsilon_target'], digits=0)} | {_fmt(r['epsilon'])} | "
                     f"{_delta(r['delta'])} | "
                     f"{r['parameters']:,} | {_fmt(r['heldout_perplexity'], r['heldout_perplexity_spread'])} | "
                     f"{_fmt(r['public_perplexity'])} | {_fmt(r['mia_auc_loss'], r['mia_auc_loss_spread'], 3)} | "
                     f"{_fmt(r['mia_auc_min_k'], None, 3)} | {_fmt(r['exposure_16'], r['exposure_16_spread'])} | "
                     f"{_fmt(r['wall_seconds'], digits=0)} |")
    for role, f in (document.get("floor") or {}).items():
        if role == "task-student":
            continue
        lines.append(f"| public {role} (floor) | 0 | 0 | – | {f['parameters']:,} | {_fmt(f.get('heldout_perplexity'))} | "
                     f"{_fmt(f['public_perplexity'])} | "
                     f"{_fmt(f['mia_auc_loss'], None, 3)} | {_fmt(f['mia_auc_min_k'], None, 3)} | "
                     f"{_fmt(f['exposure_16'])} | – |")
    lines += ["", "± is half the range over seeds. Held-out perplexity: over every site's held-out split, weighted "
              "by records. ε (ledgers): the largest site's composed ε over every charge of the run(s) (PLD). "
              "MIA: members = the sites' training records, non-members = their held-out records (0.5 = chance). "
              "Exposure: mean over the canaries planted 16 times (higher = more memorised); the floor rows are the "
              "public base models, which never saw a private record."]
    if task_rows:
        lines += task_markdown(task_rows, (document.get("floor") or {}).get("task-student"), c)
    if gaps:
        lines += ["", "Gap closed by the best private student, (PPL_dp-sgd-student − PPL_best) / "
                      "(PPL_dp-sgd-student − PPL_nonprivate-kd):", ""]
        lines += [f"- ε = {eps}: {g['best']} closes {g['ratio']:.0%}" for eps, g in gaps.items()]
    settings = document["settings"]
    lines += ["", "Settings (shared by every cell):", "", "```",
              *(f"{k} = {v!r}" for k, v in sorted(settings.items())), "```", ""]
    return "\n".join(lines)


def task_markdown(rows: list[dict], floor: dict | None, c: dict) -> list[str]:
    """The pdss rows: the task's own table (answer accuracy; leakage of what the sites sent)."""
    lines = ["", f"On the task ({c['task_config']}; pdss: {c['prompt_share']:.0%} of ε for the prompts, ε_token = "
             f"that / {c['prompt_tokens']} tokens, the rest for DP-SGD; answer-only: no prompt is sent, all of ε "
             "for DP-SGD):", "",
             "| method | ε target | ε (ledgers) | δ | params | held-out accuracy | teacher accuracy on what it saw | "
             "leakage (private tokens sent) | canary PINs read back | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['epsilon_target'], digits=0)} | {_fmt(r['epsilon'])} | "
                     f"{_delta(r['delta'])} | {r['parameters']:,} | {_fmt(r['accuracy'], r['accuracy_spread'], 3)} | "
                     f"{_fmt(r['teacher_accuracy_seen'], None, 3)} | {_fmt(r['leakage'], None, 3)} | "
                     f"{_fmt(r['canaries_read_back'], None, 1)} | {_fmt(r['wall_seconds'], digits=0)} |")
    if floor:
        lines.append(f"| public task student (floor) | 0 | 0 | – | {floor['parameters']:,} | "
                     f"{_fmt(floor['accuracy'], None, 3)} | – | 0 | 0 | – |")
    lines += ["", "Accuracy: exact match after normalisation on every site's held-out questions, weighted by "
              "records. Leakage: the share of the prompts' private tokens (names, amounts, PIN digits) still in "
              "what the server saw (answer-only sends none)."]
    return lines


def plot(rows: list[dict], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_rows = [r for r in rows if is_task_row(r)]
    rows = [r for r in rows if not is_task_row(r)]
    epsilons = sorted({r["epsilon_target"] for r in rows + task_rows})
    position = {e: i for i, e in enumerate(epsilons)}
    fig, axes = plt.subplots(1, 3 if task_rows else 2, figsize=(16 if task_rows else 11, 4.2))
    left, right = axes[0], axes[1]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["epsilon_target"])
        xs = [position[r["epsilon_target"]] for r in mine]
        left.errorbar(xs, [r["heldout_perplexity"] for r in mine],
                      yerr=[(r["heldout_perplexity_spread"] or 0) / 2 for r in mine], marker="o", capsize=3,
                      label=method)
        right.plot(xs, [r["mia_auc_loss"] for r in mine], marker="o", label=method)
    for role, f in (floor or {}).items():
        if role == "task-student":
            continue
        if f.get("heldout_perplexity") is not None:
            left.axhline(f["heldout_perplexity"], linestyle=":", color="grey" if role == "teacher" else "black",
                         label=f"public {role} (no private data)")
        right.axhline(f["mia_auc_loss"], linestyle=":", color="grey" if role == "teacher" else "black",
                      label=f"public {role} (floor)")
    labels = ["∞" if math.isinf(e) else f"{e:g}" for e in epsilons]
    panels = [(left, "utility", "held-out perplexity (lower is better)"),
              (right, "leakage", "MIA AUC, loss attack (0.5 = chance)")]
    if task_rows:
        task = axes[2]
        for method in dict.fromkeys(r["method"] for r in task_rows):
            mine = sorted((r for r in task_rows if r["method"] == method), key=lambda r: r["epsilon_target"])
            task.errorbar([position[r["epsilon_target"]] for r in mine], [r["accuracy"] for r in mine],
                          yerr=[(r["accuracy_spread"] or 0) / 2 for r in mine], marker="o", capsize=3, label=method)
        if floor.get("task-student"):
            task.axhline(floor["task-student"]["accuracy"], linestyle=":", color="black",
                         label="public task student (no private data)")
        task.legend(fontsize=8)
        panels.append((task, "pdss (on the task)", "held-out answer accuracy (higher is better)"))
    for ax, title, ylabel in panels:
        ax.set_xticks(range(len(epsilons)), labels)
        ax.set_xlabel("ε per site")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(document: dict, out: Path) -> dict:
    rows = aggregate(document["cells"])
    gaps = gap_closed(rows)
    document = {**document, "table": rows, "gap_closed": gaps}
    safe = json_safe(document)
    atomic_write_json(out / "compare.json", safe)
    atomic_write_bytes(out / "compare.md", markdown(document, rows, gaps).encode("utf-8"))
    plot(rows, document.get("floor") or {}, out / "compare.png")
    return safe

