"""A site's σ plans on disk, so that a deployed site calibrates its noise once per run.

A deployed site runs every message in a fresh ``flwr-clientapp`` process, so the in-process
memo of ``calibrate_noise`` dies with each message, and the σ search (seconds) was paid on
every round. The plan is a pure function of its inputs; it is kept next to the site's ledger
(``<ledger>.plans.json``, written atomically with ``common.atomic``) under the SHA-256 of
every input of the calibration:

  records, batch size, steps per round, rounds, target ε, δ (as configured and as resolved),
  clipping norm, accountant, and the versions of the code that computes it (opacus,
  dp-accounting, numpy, scipy, and a digest of accounting.py and dp_sgd.py).

A changed input is a different key, so it is calibrated afresh. A stored plan is used only
after it is re-checked: the file parses, the entry's digest matches its content, its fields
are exactly what these inputs imply (sample rate, steps, rounds, δ, accountant, C), σ is
finite and positive, and the accountant's ε of the plan is ≤ the target (one ε evaluation,
a fraction of the search's cost, and memoised in-process by ``accounting``). Anything else
— a corrupt or truncated file, an edited σ, a plan that overspends — is recalculated and
rewritten, never trusted. Within one process (a simulation actor serving a site round after
round) a plan this process calibrated or verified is reused without re-checking while the
file is unchanged (same size, mtime and inode). Privacy does not rest on this file: the ledger checks and
charges every round with the σ actually used.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from importlib import metadata
from logging import WARNING, getLogger
from pathlib import Path

from common.atomic import atomic_write_json
from common.privacy import dp_sgd
from common.privacy.accounting import default_delta
from common.privacy.dp_sgd import DPSGDPlan, sample_rate_for

FORMAT = "privdistill-sigma-plans"
VERSION = 1
MAX_PLANS = 32  # plans kept per site (newest last); older runs' plans are dropped
_EPSILON_SLACK = 1e-9  # relative: the verified ε may not exceed the target by more than rounding
_logger = getLogger(__name__)
stats = {"calibrated": 0, "reused": 0, "rejected": 0}  # for tests and benchmarks
_checked: dict[tuple[str, str], tuple[tuple, DPSGDPlan]] = {}  # (file, key) → (file signature, plan)


def path_for(ledger_path: str | Path) -> Path:
    """Where a site keeps its plans: beside its ledger, ``<ledger stem>.plans.json``."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(f"{ledger_path.stem}.plans.json")


@lru_cache(maxsize=1)
def code_versions() -> dict[str, str]:
    """Versions of everything that can change a calibrated σ."""
    versions = {}
    for package in ("opacus", "dp-accounting", "numpy", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("accounting.py", "dp_sgd.py"):
        digest.update((here / name).read_bytes())
    versions["privdistill-calibration"] = digest.hexdigest()[:16]
    return versions


def plan_inputs(n_records: int, batch_size: int, steps_per_round: int, rounds: int, target_epsilon: float,
                delta: float | None, max_grad_norm: float, accountant: str) -> dict:
    return {"n_records": int(n_records), "batch_size": int(batch_size), "steps_per_round": int(steps_per_round),
            "rounds": int(rounds), "target_epsilon": float(target_epsilon),
            "delta": None if delta is None else float(delta),
            "resolved_delta": float(default_delta(int(n_records)) if delta is None else delta),
            "max_grad_norm": float(max_grad_norm), "accountant": str(accountant), "versions": code_versions()}


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def key_of(inputs: dict) -> str:
    return hashlib.sha256(_canonical(inputs)).hexdigest()


def _digest(inputs: dict, plan: dict) -> str:
    return hashlib.sha256(_canonical({"inputs": inputs, "plan": plan})).hexdigest()


def load_or_plan(store: str | Path, n_records: int, batch_size: int, steps_per_round: int, rounds: int,
                 target_epsilon: float, delta: float | None = None, max_grad_norm: float = 1.0,
                 accountant: str = "rdp") -> DPSGDPlan:
    """The site's plan for these inputs: the stored one when it checks out, else calibrated and stored."""
    store = Path(store)
    inputs = plan_inputs(n_records, batch_size, steps_per_round, rounds, target_epsilon, delta, max_grad_norm,
                         accountant)
    key = key_of(inputs)
    memo = (str(store.resolve()), key)
    known = _checked.get(memo)
    if known is not None and known[0] == _signature(store):
        stats["reused"] += 1
        return known[1]
    plans = _read(store)
    entry = plans.get(key)
    if entry is not None:
        plan, problem = _verified(entry, inputs)
        if plan is not None:
            stats["reused"] += 1
            _checked[memo] = (_signature(store), plan)
            return plan
        stats["rejected"] += 1
        _logger.log(WARNING, "stored σ plan in %s not used (%s); calibrating again", store, problem)
    plan = dp_sgd.plan_dp_sgd(n_records, batch_size, steps_per_round, rounds, target_epsilon, delta, max_grad_norm,
                              accountant)
    stats["calibrated"] += 1
    record = plan.to_dict()
    plans.pop(key, None)
    plans[key] = {"inputs": inputs, "plan": record, "digest": _digest(inputs, record)}
    while len(plans) > MAX_PLANS:
        plans.pop(next(iter(plans)))
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, {"format": FORMAT, "version": VERSION, "plans": plans})
    except OSError as exc:  # a read-only ledger directory costs the next message a calibration, nothing more
        _logger.log(WARNING, "could not keep the σ plan in %s: %s", store, exc)
    _checked[memo] = (_signature(store), plan)
    return plan


def _signature(store: Path) -> tuple | None:
    try:
        st = store.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _read(store: Path) -> dict:
    """The stored plans by key; an unreadable or foreign file counts as none (it is rewritten)."""
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        stats["rejected"] += 1
        _logger.log(WARNING, "σ plan file %s is unreadable (%s); recalculating", store, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("plans"), dict):
        stats["rejected"] += 1
        _logger.log(WARNING, "%s is not a privdistill σ plan file; recalculating", store)
        return {}
    return {k: v for k, v in data["plans"].items() if isinstance(v, dict)}


def _verified(entry: dict, inputs: dict) -> tuple[DPSGDPlan | None, str]:
    """(the plan, "") when the entry is intact and fits ``inputs``; (None, why) otherwise."""
    try:
        record = entry["plan"]
        if entry.get("inputs") != inputs:
            return None, "its inputs differ"
        if entry.get("digest") != _digest(inputs, record):
            return None, "its digest does not match (corrupted or edited)"
        plan = DPSGDPlan(**record)
        expected = {"target_epsilon": inputs["target_epsilon"], "delta": inputs["resolved_delta"],
                    "sample_rate": sample_rate_for(inputs["n_records"], inputs["batch_size"]),
                    "steps_per_round": inputs["steps_per_round"], "rounds": inputs["rounds"],
                    "max_grad_norm": inputs["max_grad_norm"], "accountant": inputs["accountant"]}
        for name, value in expected.items():
            if getattr(plan, name) != value:
                return None, f"its {name} is {getattr(plan, name)!r}, expected {value!r}"
        sigma = plan.noise_multiplier
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma)
                and sigma > 0):
            return None, f"its noise multiplier {sigma!r} is not a positive number"
        epsilon = plan.planned_epsilon()
        if not epsilon <= plan.target_epsilon * (1 + _EPSILON_SLACK):
            return None, f"it spends ε = {epsilon:.6g} over the target {plan.target_epsilon:g}"
        return plan, ""
    except Exception as exc:  # noqa: BLE001 - a malformed entry of any kind is recalculated
        return None, f"malformed entry ({exc.__class__.__name__}: {exc})"
