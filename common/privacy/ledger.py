"""Per-client privacy ledger: one JSON file that records every mechanism run on a client's data.

The entries are the source of truth. The running (ε, δ) is always rebuilt from them by the
ledger's accountant (:func:`common.privacy.accounting.epsilon_of_events`: dp-accounting's PLD
by default, opacus's PRV or RDP by choice); the ``spent`` figure in the file is written for
humans and for ``privdistill ledger verify``, and is ignored when loading.

File format (version 2): JSON with sorted keys, one entry per line (:func:`render`)::

    {
      "format": "privdistill-ledger",
      "version": 2,
      "client_id": "site-3",
      "accountant": "pld",
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
          "extra": {},
          "status": "released",
          "released_at": "2025-01-01T12:00:07.000000+00:00"
        }
      ]
    }

Each entry is a typed mechanism event (:mod:`common.privacy.charges`: ``dp-sgd``,
``gaussian``, ``laplace``, ``pure-epsilon``) with that mechanism's own ``params``. An entry
whose mechanism this version does not know makes the file unreadable (``LedgerError``), and
an entry the ledger's accountant cannot compose is refused when it is charged
(``UnsupportedMechanism``), so nothing is ever silently uncounted. ``status`` is
``"reserved"`` (the budget is held, the mechanism may be running) or ``"released"`` (its output
may have left the site); both count in ε.

Version 1 (no ``status``; only ``dp-sgd``) is still read: its entries are released ones and
its accountant (``"rdp"`` or ``"prv"``, opacus) is kept, so it reports exactly the figure it
reported before. The first write rewrites it as version 2 (with ``"migrated_from": 1``);
figures are unchanged by that.

What is guaranteed
------------------
* **Durability.** Every change is written to a temp file in the same directory, fsynced,
  renamed over the ledger with ``os.replace`` and the directory is fsynced: a crash at any
  point leaves the previous or the new committed ledger (plus, at worst, a stray
  ``.<name>.*.tmp`` file, which is never read). A reader never sees half a file.
* **No overrun, across processes.** Every write (create, :meth:`~PrivacyLedger.reserve`,
  :meth:`~PrivacyLedger.charge`, :meth:`~PrivacyLedger.release`,
  :meth:`~PrivacyLedger.cancel`) holds an exclusive ``fcntl.flock`` on ``<ledger>.lock``
  beside the ledger, for the read-check-write only, and re-reads the file under it. So the
  budget check of a reservation sees every entry, reserved or released, that any process
  committed before it, and the entries' ε never exceeds the budget, however many processes
  charge one ledger at once. The lock is advisory: it binds every privdistill process on
  file systems where ``flock`` works across processes (local ones; NFS emulates it with
  POSIX locks), not a process that writes the file by other means. The ``.lock`` file is
  empty and is left in place (deleting it while a process waits would split the lock).
* **Reserve before, release after.** A caller that reserves before running a mechanism and
  releases its output only after ``reserve`` returned can never release anything the budget
  did not cover. A crash between the two leaves the reservation in the file, counted
  (conservative); :meth:`~PrivacyLedger.cancel` removes a reservation, and must only be used
  when nothing of the mechanism's output left the site. :meth:`~PrivacyLedger.charge` is
  reserve + release in one locked step (for callers that charge after running the mechanism
  but before releasing its output: a refused charge then wastes the work, nothing leaks).
* **Idempotence.** Charging or reserving a charge id already recorded with the same mechanism
  and parameters is a no-op; with different ones it is refused (``LedgerError``).
* **Fresh reads.** Queries (``spent_epsilon()``, ``entries``, ``has_charge()``, ...) re-read the
  file when it changed on disk, so they reflect other processes' charges; ``check()`` is a
  read-only pre-flight and reserves nothing: only ``reserve``/``charge`` decide.

Not guaranteed: a ledger file that is deleted, truncated to an older backup or edited by
hand loses what it recorded (a deleted one resets the budget; privdistill never deletes or
"repairs" one). ``privdistill ledger verify`` detects a ``spent`` figure below what the entries
give, not removed entries.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.errors import BudgetExceeded, ConfigError, LedgerError
from common.privacy.accounting import (
    ACCOUNTANT_DESCRIPTIONS,
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    _check_delta,
    _check_epsilon,
    delta_meaning,
    epsilon_of_events,
    epsilons_by_accountant,
)
from common.privacy.charges import (
    CHARGE_TYPES,
    DPSGDCharge,
    GaussianCharge,
    LaplaceCharge,
    PureEpsilonCharge,
)

__all__ = [
    "DPSGDCharge",
    "GaussianCharge",
    "LaplaceCharge",
    "LEDGER_VERSION",
    "PrivacyLedger",
    "PureEpsilonCharge",
    "Reservation",
    "epsilon_by_accountant",
    "lock_path",
]

LEDGER_FORMAT = "privdistill-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)
RESERVED = "reserved"
RELEASED = "released"

# v1 names the registry _CHARGE_TYPES; kept for code that imported it.
_CHARGE_TYPES = CHARGE_TYPES

_ENTRY_KEYS_V1 = {"charge_id", "run_id", "round", "timestamp", "mechanism", "params", "extra"}
_ENTRY_KEYS = _ENTRY_KEYS_V1 | {"status", "released_at"}


def lock_path(path) -> Path:
    """The lock file beside a ledger: ``<ledger>.lock`` (e.g. ``site-3.json.lock``)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@dataclass(frozen=True)
class Reservation:
    """A charge held in the ledger (``reserve``): release it after the output left, or cancel it."""

    charge_id: str
    charge: Any
    status: str      # "reserved", or "released" when the id had been released before
    epsilon: float   # the ledger's ε with this charge counted
    new: bool        # False: the id was already recorded and reserving it again changed nothing
    ledger: "PrivacyLedger" = field(repr=False, compare=False)

    def release(self) -> bool:
        return self.ledger.release(self.charge_id)

    confirm = release

    def cancel(self) -> bool:
        return self.ledger.cancel(self.charge_id)


@dataclass
class _State:
    """What one read of the file says."""

    client_id: str
    epsilon_budget: float
    delta: float
    accountant: str
    entries: list[dict]
    charges: list
    version: int
    migrated_from: int | None
    recorded_spent: float | None  # the file's "spent" epsilon (informational)


class PrivacyLedger:
    """One client's privacy ledger. Create or resume with :meth:`open`; inspect with :meth:`load`."""

    def __init__(self, path: Path, state: _State, read_only: bool, signature=None) -> None:
        # Use open() or load(); this constructor does no validation or I/O.
        self.path = path
        self.client_id = state.client_id
        self.epsilon_budget = state.epsilon_budget
        self.delta = state.delta
        self.accountant = state.accountant
        self._read_only = read_only
        self._thread_lock = threading.Lock()
        self._adopt(state, signature)

    def _adopt(self, state: _State, signature) -> None:
        self._entries = state.entries
        self._charges = state.charges
        self._version_on_disk = state.version
        self._migrated_from = state.migrated_from
        self.recorded_spent = state.recorded_spent
        self._signature = signature
        self._spent: float | None = None

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path,
        client_id: str,
        epsilon_budget: float,
        delta: float,
        accountant: str | None = None,
        grow_budget: bool = False,
    ) -> "PrivacyLedger":
        """Resume the ledger at ``path``, or create it (atomically, under the lock) if absent.

        ``grow_budget``: an existing ledger whose budget is below ``epsilon_budget`` has it
        raised to it (never lowered; every recorded entry still counts). For a run planned on
        top of the ones recorded, e.g. a dp-opd student of a DP teacher: the site's lifetime
        budget becomes the teacher's plus the student's, and the teacher's charges count once.

        An existing ledger must match ``client_id``, ``epsilon_budget``, ``delta`` and, when
        given, ``accountant`` exactly; the file's values are never silently overridden.
        ``accountant=None`` means: the file's accountant for an existing ledger (so a
        version-1 "rdp" ledger keeps reporting what it did), :data:`DEFAULT_ACCOUNTANT` for a
        new one.
        """
        path = Path(path)
        if not isinstance(client_id, str) or not client_id.strip():
            raise ConfigError(f"client_id={client_id!r} is invalid: it must be a non-empty string.")
        _check_epsilon(epsilon_budget, "epsilon_budget")
        _check_delta(delta)
        if accountant is not None and accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {accountant!r}; use one of: {', '.join(ACCOUNTANTS)}."
            )

        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            state = _State(client_id, float(epsilon_budget), float(delta), accountant or DEFAULT_ACCOUNTANT,
                           [], [], LEDGER_VERSION, None, 0.0)
            ledger = cls(path, state, read_only=False)
            with ledger._exclusive():
                if not path.exists():  # another process may have created it while we waited
                    ledger._commit([], [], 0.0)
                    return ledger

        ledger = cls.load(path)
        if grow_budget and ledger.epsilon_budget < float(epsilon_budget):
            ledger._read_only = False
            with ledger._exclusive():
                ledger._reload_locked()
                if ledger.epsilon_budget < float(epsilon_budget):
                    ledger.epsilon_budget = float(epsilon_budget)
                    ledger._commit(ledger._entries, ledger._charges, ledger._spent_now())
        mismatches = [
            ("client_id", ledger.client_id, client_id),
            ("accountant", ledger.accountant, accountant if accountant is not None else ledger.accountant),
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
        state, signature = _read(path)
        return cls(path, state, read_only=True, signature=signature)

    # --- queries (each reflects the file as it is now) -----------------------------------

    @property
    def entries(self) -> list[dict]:
        """A copy of the recorded entries (reserved and released), oldest first."""
        self._refresh()
        return copy.deepcopy(self._entries)

    @property
    def version_on_disk(self) -> int:
        """The file's format version (1 until a version-1 ledger is first written)."""
        self._refresh()
        return self._version_on_disk

    def spent_epsilon(self) -> float:
        """ε spent so far at the ledger's δ (reserved + released), rebuilt from the entries."""
        self._refresh()
        return self._spent_now()

    def remaining_epsilon(self) -> float:
        return max(0.0, self.epsilon_budget - self.spent_epsilon())

    def has_charge(self, charge_id: str) -> bool:
        """True if ``charge_id`` is recorded, reserved or released."""
        return self.status_of(charge_id) is not None

    def status_of(self, charge_id: str) -> str | None:
        """"reserved", "released", or None if ``charge_id`` is not recorded."""
        self._refresh()
        entry = self._entry(charge_id)
        return None if entry is None else entry["status"]

    def cost_of(self, charge) -> float:
        """ε the ledger would show after adding ``charge`` (not ε of the charge alone)."""
        _check_charge_type(charge)
        self._refresh()
        return self._epsilon_of([*self._charges, charge])

    def epsilon_by_accountant(self) -> dict[str, float]:
        """{accountant: ε of the entries} for every accountant that can compose them, the
        ledger's own first (the privacy card shows the tight figure beside RDP's)."""
        return self.accountant_figures()[0]

    def accountant_figures(self) -> tuple[dict[str, float], dict[str, str]]:
        """({accountant: ε}, {accountant: why it has no figure}) for the entries as they are now."""
        self._refresh()
        order = [self.accountant, *(a for a in ACCOUNTANTS if a != self.accountant)]
        return epsilons_by_accountant(self._events(self._charges), self.delta, order)

    def check(self, charge, charge_id: str) -> None:
        """Raise ``BudgetExceeded`` if recording ``charge`` now would exceed the budget.

        A read-only pre-flight (it reserves nothing): call :meth:`reserve` before running the
        mechanism to hold the budget. A ``charge_id`` already recorded with the same
        mechanism and parameters passes (charging it again is a no-op); recorded with
        different ones it raises ``LedgerError``.
        """
        _check_charge_id(charge_id)
        _check_charge_type(charge)
        self._refresh()
        if self._recorded(charge_id, charge) is None:
            self._check_new(charge, charge_id)

    # --- recording -----------------------------------------------------------------------

    def reserve(self, charge_id: str, charge, run_id: str, round: int | None = None,
                extra: dict | None = None) -> Reservation:
        """Check the budget against the file as it is now and record ``charge`` as reserved.

        Atomic under the ledger's lock: of two processes reserving the last of a budget, one
        is refused. Call it BEFORE running the mechanism; :meth:`release` once its output
        left the site, or :meth:`cancel` if nothing did. Raises ``BudgetExceeded``, writing
        nothing, if the charge would exceed the budget. An id already recorded with the same
        charge returns its reservation with ``new=False`` (no-op).
        """
        extra = self._validate_request(charge_id, charge, run_id, round, extra)
        with self._exclusive():
            self._reload_locked()
            existing = self._recorded(charge_id, charge)
            if existing is not None:
                return Reservation(charge_id, charge, existing["status"], self._spent_now(), False, self)
            would_be = self._check_new(charge, charge_id)
            entry = _new_entry(charge_id, charge, run_id, round, extra, RESERVED)
            self._commit([*self._entries, entry], [*self._charges, charge], would_be)
        return Reservation(charge_id, charge, RESERVED, would_be, True, self)

    def release(self, charge_id: str) -> bool:
        """Mark the reservation ``charge_id`` released (its output may leave the site).

        Returns False if it was already released; ``LedgerError`` if it is not recorded.
        """
        self._writable()
        _check_charge_id(charge_id)
        with self._exclusive():
            self._reload_locked()
            entry = self._entry(charge_id)
            if entry is None:
                raise LedgerError(
                    f"client {self.client_id!r}: no reservation {charge_id!r} in {self.path} to release; "
                    "reserve it (PrivacyLedger.reserve) before running the mechanism."
                )
            if entry["status"] == RELEASED:
                return False
            entries = [_released(e) if e["charge_id"] == charge_id else e for e in self._entries]
            self._commit(entries, self._charges, self._spent_now())
        return True

    confirm = release

    def cancel(self, charge_id: str) -> bool:
        """Remove the reservation ``charge_id``: only when NOTHING of the mechanism's output left.

        Returns False if ``charge_id`` is not recorded; ``LedgerError`` if it was released
        (a released charge's cost is permanent).
        """
        self._writable()
        _check_charge_id(charge_id)
        with self._exclusive():
            self._reload_locked()
            entry = self._entry(charge_id)
            if entry is None:
                return False
            if entry["status"] == RELEASED:
                raise LedgerError(
                    f"client {self.client_id!r}: charge {charge_id!r} in {self.path} was released; its "
                    "privacy cost is permanent and cannot be cancelled."
                )
            keep = [i for i, e in enumerate(self._entries) if e["charge_id"] != charge_id]
            charges = [self._charges[i] for i in keep]
            self._commit([self._entries[i] for i in keep], charges, self._epsilon_of(charges))
        return True

    def charge(
        self,
        charge_id: str,
        charge,
        run_id: str,
        round: int | None = None,
        extra: dict | None = None,
    ) -> bool:
        """Record ``charge`` as released under ``charge_id``: reserve + release in one locked step.

        Returns False if ``charge_id`` is already recorded with the same mechanism and
        parameters (a reservation of it is marked released; nothing else is written);
        different ones raise ``LedgerError``. Raises ``BudgetExceeded``, writing nothing, if
        the charge would exceed the budget as the file stands now.
        """
        extra = self._validate_request(charge_id, charge, run_id, round, extra)
        with self._exclusive():
            self._reload_locked()
            existing = self._recorded(charge_id, charge)
            if existing is not None:
                if existing["status"] == RESERVED:
                    entries = [_released(e) if e["charge_id"] == charge_id else e for e in self._entries]
                    self._commit(entries, self._charges, self._spent_now())
                return False
            would_be = self._check_new(charge, charge_id)
            entry = _released(_new_entry(charge_id, charge, run_id, round, extra, RESERVED))
            self._commit([*self._entries, entry], [*self._charges, charge], would_be)
        return True

    # --- rendering -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        self._refresh()
        return copy.deepcopy(self._as_dict(self._entries, self._spent_now()))

    def describe(self) -> str:
        self._refresh()
        spent = self._spent_now()
        reserved = sum(e["status"] == RESERVED for e in self._entries)
        figures, unavailable = self.accountant_figures()
        others = [f"{name} ε={eps:.4f}" for name, eps in figures.items() if name != self.accountant]
        others += [f"{name}: n/a ({why})" for name, why in unavailable.items() if name != self.accountant]
        lines = [
            f"privacy ledger {self.path}",
            f"client:     {self.client_id}",
            f"accountant: {self.accountant} ({ACCOUNTANT_DESCRIPTIONS[self.accountant]})",
            f"budget:     ε={self.epsilon_budget:g}, δ={self.delta:g}",
            f"spent:      ε={spent:.4f} ({len(self._entries)} entries, {reserved} reserved); "
            f"remaining ε={self.remaining_epsilon():.4f}",
            f"also:       {'; '.join(others) if others else '-'}",
            f"meaning:    {delta_meaning(self.delta)}",
        ]
        if self._version_on_disk != LEDGER_VERSION:
            lines.append(f"format:     version {self._version_on_disk} on disk; rewritten as version "
                         f"{LEDGER_VERSION} on its next write, with the same accountant and figures")
        for e in self._entries:
            params = ", ".join(f"{k}={v:g}" if _is_real(v) else f"{k}={v}"
                               for k, v in sorted(e["params"].items()))
            rnd = "-" if e["round"] is None else e["round"]
            lines.append(
                f"  {e['timestamp']}  {e['charge_id']}  run={e['run_id']} round={rnd}  "
                f"{e['mechanism']}({params})  {e['status']}"
            )
        return "\n".join(lines)

    def _as_dict(self, entries: list[dict], spent: float) -> dict:
        data = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": self.accountant,
            "budget": {"epsilon": self.epsilon_budget, "delta": self.delta},
            # Informational only: always recomputed from the entries when loaded (and
            # checked against them by `privdistill ledger verify`).
            "spent": {"epsilon": spent, "delta": self.delta if entries else 0.0},
            "entries": entries,  # serialised as is; entries are never mutated in place
        }
        if self._migrated_from is not None:
            data["migrated_from"] = self._migrated_from
        return data

    # --- internals -----------------------------------------------------------------------

    @staticmethod
    def _events(charges: list) -> list:
        return [ev for c in charges for ev in c.events()]

    def _epsilon_of(self, charges: list) -> float:
        return epsilon_of_events(self._events(charges), self.delta, self.accountant)

    def _spent_now(self) -> float:
        if self._spent is None:
            self._spent = self._epsilon_of(self._charges)
        return self._spent

    def _check_new(self, charge, charge_id: str) -> float:
        """Refuse ``charge`` if over budget (or not composable); otherwise return ε after it."""
        would_be = self._epsilon_of([*self._charges, charge])  # UnsupportedMechanism if it cannot
        if not would_be <= self.epsilon_budget:  # written so that a NaN is refused too
            a, b, c = _fmt_figures(self._spent_now(), would_be, self.epsilon_budget)
            raise BudgetExceeded(
                f"client {self.client_id!r}: request {charge_id!r} would raise ε from {a} to "
                f"{b}, over the budget of {c} (δ={self.delta:g}); nothing was run or charged. "
                "Raise the budget or plan fewer rounds / more noise."
            )
        return would_be

    def _entry(self, charge_id: str) -> dict | None:
        for e in self._entries:
            if e["charge_id"] == charge_id:
                return e
        return None

    def _recorded(self, charge_id: str, charge) -> dict | None:
        """The entry of ``charge_id`` if recorded with this charge; LedgerError if with another."""
        e = self._entry(charge_id)
        if e is not None and (e["mechanism"] != charge.mechanism or e["params"] != charge.params()):
            raise LedgerError(
                f"client {self.client_id!r}: charge {charge_id!r} is already recorded "
                f"in {self.path} as {e['mechanism']} {e['params']}, not "
                f"{charge.mechanism} {charge.params()}; use a new charge id for a "
                "different run."
            )
        return e

    def _writable(self) -> None:
        if self._read_only:
            raise RuntimeError(
                "this ledger was opened with PrivacyLedger.load (read-only); "
                "use PrivacyLedger.open to charge it"
            )

    def _validate_request(self, charge_id, charge, run_id, round, extra) -> dict:
        self._writable()
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
            return json.loads(json.dumps(extra, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"extra is not JSON-serialisable: {_one_line(exc)}.") from None

    @contextmanager
    def _exclusive(self):
        """Hold the ledger's OS lock (and this object's thread lock) for one read-check-write."""
        with self._thread_lock:
            fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until no other process holds it
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the lock (also on a crash)

    def _reload_locked(self) -> None:
        """Re-read the file; called with the lock held, so nobody else can change it now.

        Always read and adopted, never skipped on an unchanged stat signature: on a file
        system with coarse timestamps a reused inode could look unchanged, and the budget
        check must see the file as it is.
        """
        state, signature = _read(self.path)
        self._take(state, signature, force=True)

    def _refresh(self) -> None:
        """Re-read the file if it changed since it was last read (no lock: writes are atomic)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise LedgerError(
                f"privacy ledger {self.path} has disappeared; restore it from a backup (its charges "
                "are the client's privacy record; a new ledger would reset the budget)."
            ) from None
        if _signature(st) != self._signature:
            state, signature = _read(self.path)
            self._take(state, signature)

    def _take(self, state: _State, signature, force: bool = False) -> None:
        for what, mine, theirs in (("client_id", self.client_id, state.client_id),
                                   ("accountant", self.accountant, state.accountant),
                                   ("delta", self.delta, state.delta),
                                   ("epsilon budget", self.epsilon_budget, state.epsilon_budget)):
            if mine != theirs:
                raise LedgerError(
                    f"privacy ledger {self.path} was replaced by one with {what} {theirs!r} (this process "
                    f"opened it with {mine!r}); find out who replaced it before charging it again."
                )
        if force or signature != self._signature:
            self._adopt(state, signature)

    def _commit(self, entries: list[dict], charges: list, spent: float) -> None:
        """Write the ledger atomically (lock held), then adopt the new state in memory."""
        atomic_write_bytes(self.path, render(self._as_dict(entries, spent)).encode("utf-8"))
        # Only now, with the new ledger committed on disk, update the in-memory state.
        self._entries, self._charges, self._spent = entries, charges, spent
        self._version_on_disk = LEDGER_VERSION
        self.recorded_spent = spent
        self._signature = _signature(os.stat(self.path))


def ledger_paths(directory) -> list[Path]:
    """The privacy ledgers in ``directory`` (sorted), told apart from other JSON kept beside them
    (σ plans, releases) by their ``format`` field, not by their names."""
    found = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("format") == LEDGER_FORMAT:
                found.append(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # not a ledger (a ledger that became unreadable is reported when opened by name)
    return found


def epsilon_by_accountant(path) -> dict[str, float]:
    """{accountant: ε} of the ledger at ``path``, its own accountant first (for the privacy card)."""
    return PrivacyLedger.load(path).epsilon_by_accountant()


# --- reading -----------------------------------------------------------------------------


def _signature(st: os.stat_result) -> tuple:
    # os.replace gives every committed version a new inode; size and times catch the rest.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(path: Path) -> tuple[_State, tuple]:
    try:
        with open(path, "rb") as f:
            signature = _signature(os.fstat(f.fileno()))
            raw = f.read()
    except FileNotFoundError:
        raise LedgerError(
            f"no privacy ledger at {path}; check the path (a ledger is created by the "
            "client's first run)."
        ) from None
    except OSError as exc:
        raise LedgerError(f"cannot read privacy ledger {path}: {_one_line(exc)}.") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LedgerError(f"cannot read privacy ledger {path}: {_one_line(exc)}.") from None
    except json.JSONDecodeError as exc:
        raise LedgerError(
            f"privacy ledger {path} is corrupt or truncated ({_one_line(exc)}); restore it "
            "from a backup: never delete it, that would reset the client's privacy budget."
        ) from None
    return _parse(data, path), signature


def _parse(data: Any, path: Path) -> _State:
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
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise LedgerError(
            f"privacy ledger {path} has version {version!r}, but this privdistill reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}; use the privdistill release that wrote it."
        )
    client_id = data.get("client_id")
    if not isinstance(client_id, str) or not client_id.strip():
        raise bad("'client_id' must be a non-empty string")
    accountant = data.get("accountant")
    if accountant not in ACCOUNTANTS or (version == 1 and accountant == "pld"):
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
    migrated_from = data.get("migrated_from", 1 if version == 1 else None)
    if migrated_from is not None and migrated_from not in READABLE_VERSIONS[:-1]:
        raise bad(f"'migrated_from' is {migrated_from!r}")
    spent = data.get("spent")
    recorded = spent.get("epsilon") if isinstance(spent, dict) else None
    recorded = float(recorded) if _is_real(recorded) else None

    required = _ENTRY_KEYS_V1 if version == 1 else _ENTRY_KEYS
    normalised: list[dict] = []
    charges: list = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"entry {i} is not an object")
        missing = required - set(entry)
        if missing:
            raise bad(f"entry {i} lacks {', '.join(sorted(missing))}")
        mechanism = entry["mechanism"]
        if mechanism not in CHARGE_TYPES or (version == 1 and mechanism != DPSGDCharge.mechanism):
            raise LedgerError(
                f"privacy ledger {path}: entry {i} ({entry.get('charge_id')!r}) uses "
                f"mechanism {mechanism!r}, which this privdistill cannot account for "
                f"(known: {', '.join(sorted(CHARGE_TYPES))}); upgrade privdistill."
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
            charges.append(_charge_from_entry(entry))
        except (ConfigError, ValueError, TypeError) as exc:
            raise bad(f"entry {i} ({charge_id!r}) has bad params: {_one_line(exc)}") from None
        # (the parsed data belongs to this function: entries are taken over without a copy)
        if version == 1:  # a version-1 entry was written after its run: released
            entry = {**entry, "status": RELEASED, "released_at": entry["timestamp"]}
        status, released_at = entry["status"], entry["released_at"]
        if status not in (RESERVED, RELEASED):
            raise bad(f"entry {i} ({charge_id!r}) has status {status!r}, expected {RESERVED!r} or {RELEASED!r}")
        if (status == RELEASED) != isinstance(released_at, str):
            raise bad(f"entry {i} ({charge_id!r}): 'released_at' must be a timestamp exactly when released")
        normalised.append(entry)

    return _State(client_id, float(eps_budget), float(delta), accountant, normalised, charges, version,
                  migrated_from, recorded)


# --- helpers -----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _new_entry(charge_id, charge, run_id, round, extra, status) -> dict:
    return {
        "charge_id": charge_id,
        "run_id": run_id,
        "round": None if round is None else int(round),
        "timestamp": _now(),
        "mechanism": charge.mechanism,
        "params": charge.params(),
        "extra": extra,
        "status": status,
        "released_at": None,
    }


def _released(entry: dict) -> dict:
    return {**entry, "status": RELEASED, "released_at": _now()}


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _charge_from_entry(entry: dict):
    params = entry["params"]
    try:
        key = tuple(sorted(params.items()))
        hash(key)
    except TypeError:  # unhashable values: bad params, reported by from_params
        return CHARGE_TYPES[entry["mechanism"]].from_params(params)
    return _charge_of(entry["mechanism"], key)


# Charges are immutable and a ledger holds many equal ones (every round of a plan): each
# distinct (mechanism, params) is validated and built once per process, not on every re-read.
@functools.lru_cache(maxsize=4096)
def _charge_of(mechanism: str, params: tuple):
    return CHARGE_TYPES[mechanism].from_params(dict(params))


def render(data: dict) -> str:
    """The ledger file's text: JSON, keys sorted, two-space indent, one entry per line.

    Equivalent JSON to ``json.dumps(data, indent=2, sort_keys=True)`` (version 1's layout)
    but each entry on its own line: the file stays readable and line-diffable, and encoding it
    with the C encoder keeps the locked write short (indent=2 forces Python's pure encoder,
    ~40 ms for 300 entries, paid by every process waiting for the lock).
    """
    def dump(value) -> str:
        return json.dumps(value, sort_keys=True, allow_nan=False, ensure_ascii=True)

    lines = []
    for key in sorted(data):
        value = data[key]
        if key == "entries" and value:
            body = ",\n".join(f"    {dump(e)}" for e in value)
            lines.append(f'  {dump(key)}: [\n{body}\n  ]')
        else:
            lines.append(f"  {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _check_charge_type(charge) -> None:
    if type(charge) not in CHARGE_TYPES.values():
        raise TypeError(
            f"cannot account for a {type(charge).__name__}; known charge types: "
            f"{', '.join(t.__name__ for t in CHARGE_TYPES.values())}"
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
