"""A site's one release of its label histogram (the control-code counts for synthesis).

Gaussian noise on the counts over the server's public label set (common/privacy/histogram.py),
checked against and charged to the site's ledger before anything leaves; released once per
run: a repeated request re-sends the same noisy counts and costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.atomic import atomic_write_json
from common.data.loading import load_records
from common.errors import BudgetExceeded
from common.privacy.histogram import histogram_noise_multiplier, noisy_label_histogram
from common.privacy.ledger import GaussianCharge, PrivacyLedger


def release_histogram(site, settings, labels: list[str], run_name: str) -> tuple[list[float], str]:
    """(noisy counts in ``labels`` order, refusal reason or "")."""
    from client.dp_lora import plan_for

    plan = plan_for(site.train_path, settings.dp)[1]  # the ledger's δ is the DP-SGD plan's (fixed per site)
    ledger = PrivacyLedger.open(site.ledger_path, site.client_id, site.epsilon_budget, plan.delta,
                                settings.dp.accountant)
    charge_id = f"{run_name}/label-histogram"
    release = Path(site.ledger_path).parent / f"{Path(site.ledger_path).stem}.releases" / f"{run_name}-label-histogram.json"
    if ledger.status_of(charge_id) == "released":
        if release.is_file():
            saved = json.loads(release.read_text())
            if saved["labels"] == labels:
                return saved["counts"], ""
        return [], f"the label histogram of run {run_name!r} was already released but not kept; not releasing it twice"
    sigma = histogram_noise_multiplier(settings.synthesis.histogram_epsilon, plan.delta, ledger.accountant)
    charge = GaussianCharge(sigma, sensitivity=1.0)  # L2 sensitivity 1: add/remove one record moves one count
    try:
        ledger.reserve(charge_id, charge, run_id=run_name, extra={"labels": len(labels)})
    except BudgetExceeded as refusal:
        return [], str(refusal)
    records = load_records(site.train_path, field=settings.dp.text_field, label_field=settings.dp.label_field)
    noisy = noisy_label_histogram([r.label for r in records], labels, sigma)
    counts = [float(noisy[k]) for k in labels]
    release.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(release, {"labels": labels, "counts": counts})  # kept first: a replay re-sends these
    ledger.release(charge_id)
    return counts, ""
