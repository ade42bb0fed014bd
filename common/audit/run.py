"""`privdistill audit`: score every model of a run (and any others named) for leakage.

Members are the sites' private training records (canaries excluded; they are scored by
exposure and extraction); non-members are the sites' held-out records, drawn from the same
distribution. The public warm-up model is the floor: it never saw any private record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from common.audit import blocks, exposure, extraction, mia
from common.audit.mia import AuditError
from common.audit.scoring import token_logprobs
from common.data.control import with_control_code
from common.data.loading import load_records

ATTACKS = ("loss", "zlib", "min-k", "reference")
DEFAULT_FPRS = (0.01, 0.001)


@dataclass
class AuditTarget:
    label: str
    model_dir: Path
    adapter: Path | None      # safetensors adapter (a run's global adapter) or None
    epsilon: float | None     # None: never trained on private data (the floor); inf: no DP
    delta: float | None = None
    source: str = ""


def run_targets(run_dir: Path, label: str | None = None) -> AuditTarget:
    """A run directory's final global adapter, with ε and δ from its sites' ledgers."""
    from common.privacy.ledger import PrivacyLedger, ledger_paths
    from common.settings import STUDENT_BASE_DIR, ledger_dir_of

    state = _state(run_dir)
    settings = state["settings"]
    ledgers = ledger_paths(ledger_dir_of(run_dir, settings))  # a dp-opd student charges its DP teacher's ledgers
    private = settings.get("private", True)
    if private and not ledgers:
        raise AuditError(f"{run_dir} has no ledgers/ directory with client ledgers; audit a run directory written by "
                         "`privdistill simulate` (or copy the sites' ledgers into RUN_DIR/ledgers/)")
    spent = [PrivacyLedger.load(p) for p in ledgers]
    epsilon = max((l.spent_epsilon() for l in spent), default=0.0) if private else math.inf
    delta = max((l.delta for l in spent), default=None) if private else None
    name = label or (f"{settings.get('name', run_dir.name)} (DP ε={settings.get('epsilon')})" if private
                     else f"{settings.get('name', run_dir.name)} (no DP)")
    base = Path(settings["model-dir"])
    if settings.get("mode") == "dp-opd" and (run_dir / STUDENT_BASE_DIR / "config.json").is_file():
        base = run_dir / STUDENT_BASE_DIR  # dp-opd's rounds trained the student: its adapter sits on the student base
    return AuditTarget(name, base, run_dir / state["adapter"], epsilon, delta, str(run_dir))


def parse_model_spec(spec: str) -> AuditTarget:
    """``LABEL=PATH`` (or ``PATH``): a run directory (its final adapter) or a save_pretrained directory."""
    label, sep, path = spec.rpartition("=")  # labels may contain "=" (e.g. "ε=2"); paths rarely do
    path = Path(path)
    label = label if sep else path.name
    if (path / "state.json").is_file():
        return run_targets(path, label)
    if (path / "config.json").is_file():
        epsilon = delta = None
        if (path / "privacy.json").is_file():  # an exported student: the guarantee it inherits
            privacy = json.loads((path / "privacy.json").read_text())["privacy"]
            epsilon = math.inf if privacy["epsilon"] == "inf" else float(privacy["epsilon"])
            delta = privacy["delta"]
        return AuditTarget(label, path, None, epsilon, delta, str(path))
    raise AuditError(f"--models {spec!r}: {path} is neither a run directory (state.json) nor a model directory "
                     "(config.json)")


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except FileNotFoundError:
        raise AuditError(f"{run_dir} has no state.json; pass a run directory written by `privdistill simulate`") from None


def load_target(target: AuditTarget):
    from common.models.build import build_model
    from common.models.loading import load_teacher
    from common.settings import RunSettings

    tokenizer = AutoTokenizer.from_pretrained(target.model_dir)
    if target.adapter is None:
        return build_model(target.model_dir).eval(), tokenizer
    cfg = RunSettings.from_flat(_state(Path(target.source))["settings"]).dp  # the run's LoRA shape
    # Merged: the same function as base + LoRA, at the base model's cost (generation-heavy scoring).
    model, _ = load_teacher(target.model_dir, cfg, target.adapter)
    return model, tokenizer


def audit_data(run_dir: Path, max_records: int, seed: int) -> tuple[list[str], list[str], list[dict]]:
    """Members, non-members (equal numbers, seeded sample) and the canaries of a run."""
    settings = _state(run_dir)["settings"]
    return audit_records(Path(settings.get("data-dir", "")), int(settings.get("clients", 0)),
                         settings.get("label-field") or None, max_records, seed)


def audit_records(data_dir: Path, clients: int, label_field: str | None, max_records: int, seed: int,
                  require_canaries: bool = True) -> tuple[list[str], list[str], list[dict]]:
    """Members, non-members and canaries of the sites ``client_0 … client_{clients-1}`` under ``data_dir``
    (no canaries, when ``require_canaries`` is off and the data has none: a user's own corpus)."""
    canary_file = data_dir / "canaries.json"
    if not canary_file.is_file() and not require_canaries:
        canaries = []
    elif not canary_file.is_file():
        raise AuditError(f"{canary_file} not found: the audit needs the run's canaries; generate the corpus with "
                         "`privdistill data generate` (it plants them) or plant canaries into a copy of your data")
    else:
        canaries = json.loads(canary_file.read_text())["canaries"]
    secrets = {c["text"] for c in canaries}
    members, nonmembers = [], []

    def as_trained(r):  # with control codes when the run trained on them (label + blank line + text)
        return with_control_code(r.label, r.text) if label_field else r.text

    for i in range(clients):
        members += [as_trained(r) for r in load_records(data_dir / f"client_{i}" / "train.jsonl", label_field=label_field)
                    if r.text not in secrets]
        nonmembers += [as_trained(r) for r in load_records(data_dir / f"client_{i}" / "heldout.jsonl",
                                                            label_field=label_field)]
    members = list(dict.fromkeys(members))
    mia.check_disjoint(members, nonmembers)
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers), max_records)
    pick = lambda texts: [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False))]  # noqa: E731
    return pick(members), pick(nonmembers), canaries


def run_audit(run_dir: str | Path, extra: list[str] = (), fprs: tuple[float, ...] | None = None,
              max_records: int = 500, candidates: int = 500, block_sigma: float = 0.01, block_seeds=(0, 1, 2),
              seed: int = 0, progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    members, nonmembers, canaries = audit_data(run_dir, max_records, seed)
    requested = fprs is not None
    fprs = tuple(fprs) if requested else DEFAULT_FPRS
    if requested:
        for fpr in fprs:
            if len(nonmembers) * fpr < 1:
                raise AuditError(f"TPR at {fpr:.3%} FPR needs at least {math.ceil(1 / fpr)} non-members; this run has "
                                 f"{len(nonmembers)} held-out records. Ask for a larger FPR or hold out more records")
    run = run_targets(run_dir)
    floor = AuditTarget("public warm-up (floor)", run.model_dir, None, None, None, str(run.model_dir))
    targets = [floor, run] + [parse_model_spec(s) for s in extra]

    ref_model, ref_tok = load_target(floor)
    ref_m, ref_n = (token_logprobs(ref_model, ref_tok, t) for t in (members, nonmembers))
    rows = []
    for target in tqdm(targets, desc="auditing models", disable=not progress):
        model, tokenizer = load_target(target)
        lp_m, lp_n = token_logprobs(model, tokenizer, members), token_logprobs(model, tokenizer, nonmembers)
        scores = {}
        for split, texts, lps, refs in (("m", members, lp_m, ref_m), ("n", nonmembers, lp_n, ref_n)):
            scores[split] = {
                "loss": [mia.loss_score(lp) for lp in lps],
                "zlib": [mia.zlib_score(t, lp) for t, lp in zip(texts, lps)],
                "min-k": [mia.min_k_score(lp, 0.2) for lp in lps],
                "reference": [mia.reference_score(lp, ref) for lp, ref in zip(lps, refs)],
            }
        membership = mia.membership_report(scores["m"], scores["n"], fprs)
        exposures = exposure.exposure_table(model, tokenizer, canaries, n_candidates=candidates, seed=seed)
        extracted = extraction.extract_canaries(model, tokenizer, canaries, seed=seed)
        records = extraction.record_extraction_rate(model, tokenizer, members)
        per_block = blocks.per_block_auc(model, tokenizer, members[:200], nonmembers[:200], block_sigma, block_seeds)
        rows.append({
            "label": target.label, "source": target.source, "epsilon": target.epsilon, "delta": target.delta,
            "membership": membership, "exposure": exposure.summarize_by_repeats(exposures),
            "exposure_rows": exposures,
            "extraction": {
                "canaries_greedy": sum(e["greedy_hit"] for e in extracted),
                "canaries_sampled": sum(e["sampled_hits"] > 0 for e in extracted),
                "canaries": len(extracted),
                "by_repeats": {str(r): sum(e["greedy_hit"] for e in extracted if e["repeats"] == r)
                               for r in sorted({e["repeats"] for e in extracted})},
                "records": records,
            },
            "blocks": per_block,
            "roc": {a: [x.tolist() for x in mia.roc_points(scores["m"][a], scores["n"][a])[:2]] for a in ATTACKS},
        })
    report = {"run": str(run_dir), "members": len(members), "nonmembers": len(nonmembers),
              "canaries": len(canaries), "fprs": list(fprs), "candidates": candidates,
              "block_sigma": block_sigma, "block_seeds": list(block_seeds), "models": rows}
    from common.audit.report import write_report

    write_report(report, run_dir)
    return report
