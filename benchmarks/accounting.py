"""Benchmark: the noise σ that DP-SGD needs for a target ε under RDP vs the tight accountant.

For each DP-SGD plan and target ε it calibrates σ with ``common.privacy.accounting.calibrate_noise``
under opacus's RDP accountant (version 1's default), dp-accounting's PLD (version 2's default)
and, unless ``--no-prv``, opacus's PRV, and prints them side by side with the ratio
σ_tight / σ_RDP (the share of the noise the tighter accounting keeps), the ε that RDP's σ really
spends according to the tight accountant, and the seconds each calibration took.

Plans (δ = min(1e-5, 1/(10·n)) = 1e-5 for both):

* demo: a site of the offline demo (simulations/configs/dp-lora.toml: 5 sites, batch 16,
  15 local steps × 3 rounds). The generated corpus gives each site 200 records plus its planted
  canaries (201-217 per site); for 209-224 records Poisson sampling runs at q = 1/14 = 0.0714,
  the issue's figure, over 45 steps.
* comparison: 1,000 records, batch 64 (q = 1/16 = 0.0625), 200 steps.

The held-out perplexity of a DP teacher trained with each σ (the other half of issue 11's
benchmark) needs the federation and is not measured here.

Usage (from the repository root):

    .venv/bin/python benchmarks/accounting.py
    .venv/bin/python benchmarks/accounting.py --epsilons 1 2 4 8 --no-prv
"""

from __future__ import annotations

import argparse
import math
import platform
import time

from common.privacy.accounting import calibrate_noise, default_delta, epsilon_of

PLANS = {
    # name: (records, batch, steps)
    "demo": (217, 16, 45),
    "comparison": (1000, 64, 200),
}


def sample_rate(records: int, batch: int) -> float:
    # common.privacy.dp_sgd.sample_rate_for's rule (imported there with torch; repeated here so
    # this script needs no torch): opacus's Poisson rate for a loader of `batch` over `records`.
    return 1.0 / math.ceil(records / batch)


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--no-prv", action="store_true", help="skip opacus's PRV (the slowest search)")
    args = parser.parse_args()

    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}")
    header = ["plan", "q", "steps", "target ε", "σ RDP", "σ PLD", "PLD/RDP"]
    if not args.no_prv:
        header += ["σ PRV", "PRV/RDP"]
    header += ["ε_PLD(σ RDP)", "seconds RDP / PLD" + ("" if args.no_prv else " / PRV")]
    rows = []
    for name, (records, batch, steps) in PLANS.items():
        q, delta = sample_rate(records, batch), default_delta(records)
        for eps in args.epsilons:
            rdp, t_rdp = timed(calibrate_noise, eps, delta, q, steps, "rdp")
            pld, t_pld = timed(calibrate_noise, eps, delta, q, steps, "pld")
            row = [name, f"{q:.4f}", str(steps), f"{eps:g}", f"{rdp:.4f}", f"{pld:.4f}", f"{pld / rdp:.3f}"]
            times = [t_rdp, t_pld]
            if not args.no_prv:
                prv, t_prv = timed(calibrate_noise, eps, delta, q, steps, "prv")
                row += [f"{prv:.4f}", f"{prv / rdp:.3f}"]
                times.append(t_prv)
            spent = epsilon_of([(rdp, q, steps)], delta, "pld")
            row += [f"{spent:.2f}", " / ".join(f"{t:.1f}" for t in times)]
            rows.append(row)
            print("  ".join(row), flush=True)

    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
