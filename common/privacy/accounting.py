"""Privacy accounting: thin, validated wrappers around opacus's accountants.

Nothing here does privacy analysis of its own. Every figure comes from opacus
(``RDPAccountant`` / ``PRVAccountant`` via ``opacus.accountants.create_accountant``, and
``opacus.accountants.utils.get_noise_multiplier``); this module only validates arguments,
turns failures into one-line ``ConfigError`` messages, and fixes the conventions:

* a *history* is a sequence of ``(noise_multiplier, sample_rate, steps)`` triples, one per
  run of Poisson-subsampled Gaussian steps, exactly opacus's ``accountant.history`` format;
* consecutive triples with the same ``(noise_multiplier, sample_rate)`` are merged, which is
  what opacus's own ``accountant.step()`` does, so a ledger rebuilt from many rounds gives
  the same figure as an accountant that was stepped through the same training;
* accountant defaults (RDP orders, PRV ``eps_error``) are opacus's and are used identically
  by :func:`calibrate_noise` and :func:`epsilon_of`, so calibrated noise reproduces exactly.

opacus (and so torch) is imported lazily, on the first computation.
"""

from __future__ import annotations

import functools
import math
import warnings
from numbers import Integral, Real
from typing import Iterable

from common.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")

# get_noise_multiplier's binary search stops once ε is within this fraction below the target.
_CALIBRATION_REL_TOLERANCE = 1e-3


def default_delta(n_records: int) -> float:
    """δ for a client holding ``n_records`` records: ``min(1e-5, 1 / (10 * n_records))``."""
    if isinstance(n_records, bool) or not isinstance(n_records, Integral) or n_records < 1:
        raise ConfigError(
            f"cannot derive δ from n_records={n_records!r}: it must be a whole number ≥ 1 "
            "(the number of private records the client holds)."
        )
    return min(1e-5, 1.0 / (10 * int(n_records)))


# A pure function of its arguments that costs seconds (opacus's search): a simulation actor
# serving many sites, round after round, calibrates each distinct plan once.
@functools.lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier σ (to opacus's search precision) with ε(σ) ≤ target_epsilon.

    ``steps`` is the WHOLE planned run (all rounds × local steps per round) at
    ``sample_rate``. The search tolerance is ``0.001 * target_epsilon``, so
    ``epsilon_of([(σ, sample_rate, steps)], delta, accountant)`` lies in
    ``[0.999 * target_epsilon, target_epsilon)``.
    """
    _check_epsilon(target_epsilon, "target_epsilon")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_accountant(accountant)

    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # The search probes large σ where opacus warns that the best RDP order is the
            # largest one; that is about the probe, not the returned σ, so it is silenced here
            # (epsilon_of, which reports real figures, does not silence it).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=float(target_epsilon),
                target_delta=float(delta),
                sample_rate=float(sample_rate),
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=_CALIBRATION_REL_TOLERANCE * float(target_epsilon),
            )
    except ValueError as exc:
        if "budget is too low" in str(exc):
            raise ConfigError(
                f"ε={target_epsilon:g} at δ={delta:g} cannot be met with sample rate "
                f"{sample_rate:g} over {steps} steps (noise multiplier would exceed 1e6); "
                "raise ε or δ, or plan fewer steps or a smaller sample rate."
            ) from exc
        raise _accountant_failure(accountant, exc) from exc
    except (RuntimeError, ArithmeticError) as exc:
        raise _accountant_failure(accountant, exc) from exc
    return float(sigma)


def epsilon_of(
    history: Iterable[tuple[float, float, int]],
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε spent at ``delta`` by a history of ``(noise_multiplier, sample_rate, steps)`` triples.

    Builds a fresh opacus accountant, sets its history and returns ``get_epsilon(delta)``.
    An empty history spends nothing: 0.0.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    merged: list[tuple[float, float, int]] = []
    for i, triple in enumerate(history):
        try:
            sigma, q, steps = triple
        except (TypeError, ValueError):
            raise ConfigError(
                f"history item {i} is {triple!r}; each item must be a "
                "(noise_multiplier, sample_rate, steps) triple."
            ) from None
        _check_noise_multiplier(sigma)
        _check_sample_rate(q)
        _check_steps(steps)
        sigma, q, steps = float(sigma), float(q), int(steps)
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    if not merged:
        return 0.0

    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = merged
    try:
        eps = acc.get_epsilon(delta=float(delta))
    except (RuntimeError, ValueError, ArithmeticError) as exc:
        raise _accountant_failure(accountant, exc) from exc
    eps = float(eps)
    if math.isnan(eps) or eps < 0:
        raise _accountant_failure(accountant, ValueError(f"it returned ε={eps!r}"))
    return eps


# --- validation -------------------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_epsilon(eps, name: str = "epsilon") -> None:
    if not _is_real(eps) or eps <= 0:
        raise ConfigError(f"{name}={eps!r} is invalid: it must be a finite number > 0.")


def _check_delta(delta) -> None:
    if not _is_real(delta) or not 0 < delta < 1:
        raise ConfigError(
            f"delta={delta!r} is invalid: it must be in (0, 1), typically below 1/n_records "
            "(see default_delta)."
        )


def _check_sample_rate(q) -> None:
    if not _is_real(q) or not 0 < q <= 1:
        raise ConfigError(
            f"sample_rate={q!r} is invalid: it must be in (0, 1] (batch size / records)."
        )


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise ConfigError(f"steps={steps!r} is invalid: it must be a whole number ≥ 1.")


def _check_noise_multiplier(sigma) -> None:
    if not _is_real(sigma) or sigma <= 0:
        raise ConfigError(
            f"noise_multiplier={sigma!r} is invalid: it must be a finite number > 0."
        )


def _check_accountant(name) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(
            f"unknown accountant {name!r}; use one of: {', '.join(ACCOUNTANTS)}."
        )


def _accountant_failure(accountant: str, exc: BaseException) -> ConfigError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    hint = "use accountant 'rdp' for this configuration" if accountant == "prv" else (
        "check the noise multiplier, sample rate and steps"
    )
    return ConfigError(f"the opacus {accountant!r} accountant failed ({detail}); {hint}.")
