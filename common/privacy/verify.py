"""Independent re-check of a ledger file (``privdistill ledger verify LEDGER.json``).

The ε of a ledger is always rebuilt from its entries; this module rebuilds it with EVERY
accountant that can compose them (dp-accounting's PLD, opacus's PRV and RDP) and fails when:

* the ``spent`` ε written in the file is below what the file's own accountant gives from its
  entries (an edited or stale file: the figure a reader sees under-reports);
* the figure rebuilt by its own accountant is over the file's budget (an overrun);
* the accountants disagree beyond their stated error: the two tight ones (PLD, PRV) by more
  than :func:`~common.privacy.accounting.tight_tolerance`, or RDP (an upper bound, allowed to
  be higher) lower than the smaller tight figure by more than that tolerance;
* the file's own accountant cannot compose its entries.

An accountant that cannot handle a mechanism in the file (PRV and RDP know the Gaussian
mechanisms only) is listed with the reason and is not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.privacy.accounting import ACCOUNTANT_DESCRIPTIONS, TIGHT_ACCOUNTANTS, tight_tolerance
from common.privacy.ledger import RESERVED, PrivacyLedger

# The file's own figure is recomputed by the same code from the same entries: it must match
# to floating-point noise (JSON keeps floats exactly), so anything lower is an edit.
_SAME_FIGURE_REL = 1e-9


@dataclass
class VerifyReport:
    path: Path
    accountant: str
    epsilon_budget: float
    delta: float
    entries: int
    reserved: int
    recorded_epsilon: float | None          # "spent" epsilon as written in the file
    figures: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        recorded = "missing" if self.recorded_epsilon is None else f"{self.recorded_epsilon:.6f}"
        lines = [
            f"privacy ledger {self.path}",
            f"accountant: {self.accountant}; budget ε={self.epsilon_budget:g}, δ={self.delta:g}; "
            f"{self.entries} entries ({self.reserved} reserved)",
            f"written:    spent ε={recorded}",
        ]
        for name in sorted({*self.figures, *self.unavailable}, key=_order):
            own = "  (the ledger's accountant)" if name == self.accountant else ""
            if name in self.figures:
                lines.append(f"  {name:<4} ε={self.figures[name]:.6f}  {ACCOUNTANT_DESCRIPTIONS[name]}{own}")
            else:
                lines.append(f"  {name:<4} n/a: {self.unavailable[name]}{own}")
        if self.ok:
            lines.append("verified: the written ε matches the entries and the accountants agree")
        else:
            lines += [f"FAILED: {p}" for p in self.problems]
        return "\n".join(lines)


def _order(name: str) -> int:
    return ("pld", "prv", "rdp").index(name) if name in ("pld", "prv", "rdp") else 99


def verify_ledger(path) -> VerifyReport:
    """Re-check the ledger at ``path``; ``LedgerError`` if it cannot be read at all."""
    ledger = PrivacyLedger.load(path)
    entries = ledger.entries
    figures, unavailable = ledger.accountant_figures()
    report = VerifyReport(Path(path), ledger.accountant, ledger.epsilon_budget, ledger.delta, len(entries),
                          sum(e["status"] == RESERVED for e in entries), ledger.recorded_spent,
                          figures, unavailable)
    problems = report.problems

    own = figures.get(ledger.accountant)
    if own is None:
        problems.append(f"the ledger's own accountant {ledger.accountant!r} cannot compose its entries: "
                        f"{unavailable.get(ledger.accountant, 'no figure')}")
    else:
        recorded = ledger.recorded_spent
        if recorded is None:
            problems.append("the file has no numeric 'spent' epsilon")
        elif recorded < own * (1 - _SAME_FIGURE_REL) - 1e-12:
            problems.append(f"the file says spent ε={recorded:.6f}, but its entries give ε={own:.6f} with its "
                            f"own accountant {ledger.accountant!r}: the file was edited or is stale")
        if not own <= ledger.epsilon_budget * (1 + _SAME_FIGURE_REL):
            problems.append(f"its entries spend ε={own:.6f}, over the budget of {ledger.epsilon_budget:g}")

    tight = {name: figures[name] for name in TIGHT_ACCOUNTANTS if name in figures}
    names = sorted(tight, key=_order)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            tol = tight_tolerance(max(tight[a], tight[b]))
            if abs(tight[a] - tight[b]) > tol:
                problems.append(f"the tight accountants disagree: {a} ε={tight[a]:.6f}, {b} ε={tight[b]:.6f} "
                                f"(stated error {tol:.4f})")
    if "rdp" in figures and tight:
        lowest = min(tight.values())
        tol = tight_tolerance(lowest)
        if figures["rdp"] < lowest - tol:
            problems.append(f"RDP (an upper bound) gives ε={figures['rdp']:.6f}, below the tight figure "
                            f"{lowest:.6f} by more than the stated error {tol:.4f}")
    return report
