"""Per-client privacy ledger: one JSON file that records every mechanism run on a client's data.

The entries are the source of truth. The running (ε, δ) is always rebuilt from them with the
opacus accountant (:func:`common.privacy.accounting.epsilon_of`); the ``spent`` figure in
the file is written for humans reading it and is ignored when loading.

File format (version 1), pretty-printed with ``indent=2, sort_keys=True``::

    {
      "format": "privdistill-ledger",
      "version": 1,
      "client_id": "site-3",
      "accountant": "rdp",
      "budget": {"epsilon": 8.0, "delta": 1e-05},
      "spent": {"epsilon": 7.1, "delta": 1e-05},
      "entries": [
        {
          "charge_id": "run-a/round-3",
          "run_id": "run-a",
          "round": 3,
          "timestamp": "2025-01-01T12:00:00.000000+00:00",
          "mechanism": "dp-sgd",
          "params": {"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 50,
                     "max_grad_norm": 1.0},
          "extra": {}
        }
      ]
    }

Each entry names its ``mechanism`` and carries that mechanism's own ``params``; a charge
type is registered in ``_CHARGE_TYPES``. An entry whose mechanism this version does not
know makes the file unreadable (``LedgerError``) rather than silently uncounted.

Durability: every change is written to a temp file in the same directory, fsynced, renamed
over the ledger with ``os.replace`` and the directory is fsynced, so a crash at any point
leaves either the previous or the new committed ledger (plus, at worst, a stray
``.<name>.*.tmp`` file, which is never read).

Concurrency: exactly one process per client owns that client's ledger (the client process
that trains on its data). There is no file locking; two processes charging the same ledger
file concurrently could lose an entry. Do not share a ledger file between processes.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

from common.atomic import atomic_write_json
from common.errors import BudgetExceeded, ConfigError, LedgerError
from common.privacy.accounting import (
    ACCOUNTANTS,
    _check_delta,
    _check_epsilon,
    _check_noise_multiplier,
    _check_sample_rate,
    _check_steps,
    epsilon_of,
)

LEDGER_FORMAT = "privdistill-ledger"
LEDGER_VERSION = 1


@dataclass(frozen=True)
class DPSGDCharge:
    """A DP-SGD run: ``steps`` Poisson-subsampled Gaussian steps at (σ, q), clipped to C."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    mechanism: ClassVar[str] = "dp-sgd"

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_steps(self.steps)
        if not _is_real(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ConfigError(
                f"max_grad_norm={self.max_grad_norm!r} is invalid: it must be a finite "
                "number > 0."
            )

    def params(self) -> dict[str, Any]:
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "max_grad_norm": float(self.max_grad_norm),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DPSGDCharge":
        expected = {"noise_multiplier", "sample_rate", "steps", "max_grad_norm"}
        if set(params) != expected:
            raise ValueError(f"params must have exactly the keys {sorted(expected)}")
        return cls(**params)

    def accountant_history(self) -> list[tuple[float, float, int]]:
        """This charge as opacus accountant history: ``[(σ, q, steps)]``."""
        return [(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))]


# mechanism name -> charge type. A new mechanism adds its class here; it must provide
# ``mechanism``, ``params()``, ``from_params()`` and ``accountant_history()``.
_CHARGE_TYPES: dict[str, type] = {DPSGDCharge.mechanism: DPSGDCharge}

_ENTRY_KEYS = {"charge_id", "run_id", "round", "timestamp", "mechanism", "params", "extra"}


class PrivacyLedger:
    """One client's privacy ledger. Create or resume with :meth:`open`; inspect with :meth:`load`."""

    def __init__(
        self,
        path: Path,
        client_id: str,
        epsilon_budget: float,
        delta: float,
        accountant: str,
        entries: list[dict],
        read_only: bool,
    ) -> None:
        # Use open() or load(); this constructor does no validation or I/O.
        self.path = path
        self.client_id = client_id
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.accountant = accountant
        self._entries = entries
        self._charges = [_charge_from_entry(e) for e in entries]
        self._read_only = read_only
        self._spent: float | None = None

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path,
        client_id: str,
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
    ) -> "PrivacyLedger":
        """Resume the ledger at ``path``, or create it (atomically) if it does not exist.

        An existing ledger must match ``client_id``, ``epsilon_budget``, ``delta`` and
        ``accountant`` exactly; the file's values are never silently overridden.
        """
        path = Path(path)
        if not isinstance(client_id, str) or not client_id.strip():
            raise ConfigError(f"client_id={client_id!r} is invalid: it must be a non-empty string.")
        _check_epsilon(epsilon_budget, "epsilon_budget")
        _check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {accountant!r}; use one of: {', '.join(ACCOUNTANTS)}."
            )

        if not path.exists():
            ledger = cls(path, client_id, float(epsilon_budget), float(delta), accountant, [], False)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, ledger.to_dict())
            return ledger

        ledger = cls.load(path)
        mismatches = [
            ("client_id", ledger.client_id, client_id),
            ("accountant", ledger.accountant, accountant),
            ("delta", ledger.delta, float(delta)),
            ("epsilon budget", ledger.epsilon_budget, float(epsilon_budget)),
        ]
        for what, in_file, requested in mismatches:
            if in_file != requested:
                raise LedgerError(
                    f"privacy ledger {path} has {what} {in_file!r} but {requested!r} was "
                    f"requested; the ledger's {what} is never changed: use the matching "
                    f"{what} or a different ledger path."
                )
        ledger._read_only = False
        return ledger

    @classmethod
    def load(cls, path) -> "PrivacyLedger":
        """Read the ledger at ``path`` without the right to charge it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LedgerError(
                f"no privacy ledger at {path}; check the path (a ledger is created by the "
                "client's first run)."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"cannot read privacy ledger {path}: {_one_line(exc)}.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(
                f"privacy ledger {path} is corrupt or truncated ({_one_line(exc)}); restore it "
                "from a backup: never delete it, that would reset the client's privacy budget."
            ) from None
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: Any, path: Path) -> "PrivacyLedger":
        def bad(what: str) -> LedgerError:
            return LedgerError(
                f"privacy ledger {path} is invalid: {what}; restore it from a backup "
                "(do not delete it: that would reset the client's privacy budget)."
            )

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format") != LEDGER_FORMAT:
            raise bad(f"'format' is {data.get('format')!r}, expected {LEDGER_FORMAT!r}")
        version = data.get("version")
        if version != LEDGER_VERSION or isinstance(version, bool):
            raise LedgerError(
                f"privacy ledger {path} has version {version!r}, but this privdistill reads "
                f"version {LEDGER_VERSION}; use the privdistill release that wrote it."
            )
        client_id = data.get("client_id")
        if not isinstance(client_id, str) or not client_id.strip():
            raise bad("'client_id' must be a non-empty string")
        accountant = data.get("accountant")
        if accountant not in ACCOUNTANTS:
            raise bad(f"'accountant' is {accountant!r}, expected one of {', '.join(ACCOUNTANTS)}")
        budget = data.get("budget")
        if not isinstance(budget, dict):
            raise bad("'budget' must be an object with 'epsilon' and 'delta'")
        eps_budget, delta = budget.get("epsilon"), budget.get("delta")
        if not _is_real(eps_budget) or eps_budget <= 0:
            raise bad(f"budget epsilon {eps_budget!r} must be a number > 0")
        if not _is_real(delta) or not 0 < delta < 1:
            raise bad(f"budget delta {delta!r} must be in (0, 1)")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise bad("'entries' must be a list")

        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise bad(f"entry {i} is not an object")
            missing = _ENTRY_KEYS - set(entry)
            if missing:
                raise bad(f"entry {i} lacks {', '.join(sorted(missing))}")
            mechanism = entry["mechanism"]
            if mechanism not in _CHARGE_TYPES:
                raise LedgerError(
                    f"privacy ledger {path}: entry {i} ({entry.get('charge_id')!r}) uses "
                    f"mechanism {mechanism!r}, which this privdistill cannot account for "
                    f"(known: {', '.join(sorted(_CHARGE_TYPES))}); upgrade privdistill."
                )
            charge_id = entry["charge_id"]
            if not isinstance(charge_id, str) or not charge_id:
                raise bad(f"entry {i} has charge_id {charge_id!r}, expected a non-empty string")
            if charge_id in seen:
                raise bad(f"charge_id {charge_id!r} appears twice")
            seen.add(charge_id)
            if not isinstance(entry["run_id"], str):
                raise bad(f"entry {i} ({charge_id!r}) 'run_id' must be a string")
            rnd = entry["round"]
            if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int)):
                raise bad(f"entry {i} ({charge_id!r}) 'round' must be a whole number or null")
            if not isinstance(entry["extra"], dict):
                raise bad(f"entry {i} ({charge_id!r}) 'extra' must be an object")
            if not isinstance(entry["params"], dict):
                raise bad(f"entry {i} ({charge_id!r}) 'params' must be an object")
            try:
                _charge_from_entry(entry)
            except (ConfigError, ValueError, TypeError) as exc:
                raise bad(f"entry {i} ({charge_id!r}) has bad params: {_one_line(exc)}") from None

        return cls(
            path, client_id, float(eps_budget), float(delta), accountant,
            copy.deepcopy(entries), read_only=True,
        )

    # --- queries -------------------------------------------------------------------------

    @property
    def entries(self) -> list[dict]:
        """A copy of the recorded entries, oldest first."""
        return copy.deepcopy(self._entries)

    def spent_epsilon(self) -> float:
        """ε spent so far at the ledger's δ, rebuilt from the entries by the opacus accountant."""
        if self._spent is None:
            self._spent = self._epsilon_of(self._charges)
        return self._spent

    def remaining_epsilon(self) -> float:
        return max(0.0, self.epsilon_budget - self.spent_epsilon())

    def has_charge(self, charge_id: str) -> bool:
        return any(e["charge_id"] == charge_id for e in self._entries)

    def cost_of(self, charge) -> float:
        """ε the ledger would show after adding ``charge`` (not ε of the charge alone)."""
        _check_charge_type(charge)
        return self._epsilon_of([*self._charges, charge])

    def check(self, charge, charge_id: str) -> None:
        """Raise ``BudgetExceeded`` if recording ``charge`` would exceed the budget.

        Call it BEFORE running the mechanism. A ``charge_id`` already recorded with the same
        mechanism and parameters passes (charging it again is a no-op); recorded with
        different ones it raises ``LedgerError``.
        """
        _check_charge_id(charge_id)
        _check_charge_type(charge)
        if not self._same_as_recorded(charge_id, charge):
            self._check_new(charge, charge_id)

    def _check_new(self, charge, charge_id: str) -> float:
        """Refuse ``charge`` if over budget; otherwise return ε after it."""
        spent = self.spent_epsilon()
        would_be = self.cost_of(charge)
        if not would_be <= self.epsilon_budget:  # written so that a NaN is refused too
            a, b, c = _fmt_figures(spent, would_be, self.epsilon_budget)
            raise BudgetExceeded(
                f"client {self.client_id!r}: request {charge_id!r} would raise ε from {a} to "
                f"{b}, over the budget of {c} (δ={self.delta:g}); nothing was run or charged. "
                "Raise the budget or plan fewer rounds / more noise."
            )
        return would_be

    # --- recording -----------------------------------------------------------------------

    def charge(
        self,
        charge_id: str,
        charge,
        run_id: str,
        round: int | None = None,
        extra: dict | None = None,
    ) -> bool:
        """Record ``charge`` under ``charge_id`` and write the ledger atomically.

        Returns False, writing nothing, if ``charge_id`` is already recorded (with the same
        mechanism and parameters; different ones raise ``LedgerError``). Raises
        ``BudgetExceeded``, writing nothing, if the charge would exceed the budget.
        """
        if self._read_only:
            raise RuntimeError(
                "this ledger was opened with PrivacyLedger.load (read-only); "
                "use PrivacyLedger.open to charge it"
            )
        _check_charge_id(charge_id)
        _check_charge_type(charge)
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"run_id={run_id!r} is invalid: it must be a non-empty string.")
        if round is not None and (
            isinstance(round, bool) or not isinstance(round, Integral) or round < 0
        ):
            raise ConfigError(f"round={round!r} is invalid: it must be a whole number ≥ 0 or None.")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise ConfigError(f"extra={extra!r} is invalid: it must be a dict or None.")
        try:
            extra = json.loads(json.dumps(extra, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra is not JSON-serialisable: {_one_line(exc)}.") from None

        if self._same_as_recorded(charge_id, charge):
            return False
        new_spent = self._check_new(charge, charge_id)

        entry = {
            "charge_id": charge_id,
            "run_id": run_id,
            "round": None if round is None else int(round),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "mechanism": charge.mechanism,
            "params": charge.params(),
            "extra": extra,
        }
        new_entries = [*self._entries, entry]
        new_charges = [*self._charges, charge]
        atomic_write_json(self.path, self._as_dict(new_entries, new_spent))
        # Only now, with the new ledger committed on disk, update the in-memory state.
        self._entries, self._charges, self._spent = new_entries, new_charges, new_spent
        return True

    # --- rendering -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return self._as_dict(self._entries, self.spent_epsilon())

    def describe(self) -> str:
        spent = self.spent_epsilon()
        lines = [
            f"privacy ledger {self.path}",
            f"client:     {self.client_id}",
            f"accountant: {self.accountant}",
            f"budget:     ε={self.epsilon_budget:g}, δ={self.delta:g}",
            f"spent:      ε={spent:.4f} ({len(self._entries)} entries); "
            f"remaining ε={self.remaining_epsilon():.4f}",
        ]
        for e in self._entries:
            params = ", ".join(f"{k}={v:g}" if _is_real(v) else f"{k}={v}"
                               for k, v in sorted(e["params"].items()))
            rnd = "-" if e["round"] is None else e["round"]
            lines.append(
                f"  {e['timestamp']}  {e['charge_id']}  run={e['run_id']} round={rnd}  "
                f"{e['mechanism']}({params})"
            )
        return "\n".join(lines)

    def _as_dict(self, entries: list[dict], spent: float) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": self.accountant,
            "budget": {"epsilon": self.epsilon_budget, "delta": self.delta},
            # Informational only: always recomputed from the entries when loaded.
            "spent": {"epsilon": spent, "delta": self.delta if entries else 0.0},
            "entries": copy.deepcopy(entries),
        }

    # --- internals -----------------------------------------------------------------------

    def _epsilon_of(self, charges: list) -> float:
        history = [t for c in charges for t in c.accountant_history()]
        return epsilon_of(history, self.delta, self.accountant)

    def _same_as_recorded(self, charge_id: str, charge) -> bool:
        """True if ``charge_id`` is recorded with this charge; LedgerError if with another."""
        for e in self._entries:
            if e["charge_id"] == charge_id:
                if e["mechanism"] != charge.mechanism or e["params"] != charge.params():
                    raise LedgerError(
                        f"client {self.client_id!r}: charge {charge_id!r} is already recorded "
                        f"in {self.path} as {e['mechanism']} {e['params']}, not "
                        f"{charge.mechanism} {charge.params()}; use a new charge id for a "
                        "different run."
                    )
                return True
        return False


# --- helpers -----------------------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _charge_from_entry(entry: dict):
    return _CHARGE_TYPES[entry["mechanism"]].from_params(entry["params"])


def _check_charge_type(charge) -> None:
    if type(charge) not in _CHARGE_TYPES.values():
        raise TypeError(
            f"cannot account for a {type(charge).__name__}; known charge types: "
            f"{', '.join(t.__name__ for t in _CHARGE_TYPES.values())}"
        )


def _check_charge_id(charge_id) -> None:
    if not isinstance(charge_id, str) or not charge_id:
        raise ConfigError(f"charge_id={charge_id!r} is invalid: it must be a non-empty string.")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fmt_figures(*values: float) -> tuple[str, ...]:
    """Format with 2 decimals, or more where needed to tell the figures apart."""
    for digits in range(2, 7):
        out = tuple(f"{v:.{digits}f}" for v in values)
        if len(set(out)) == len(set(values)):
            return out
    return tuple(f"{v!r}" for v in values)
