"""Privacy accounting: thin, validated wrappers around opacus's and dp-accounting's accountants.

Nothing here does privacy analysis of its own. Every figure comes from a standard library;
this module validates arguments, maps the ledger's mechanisms onto each library's objects,
turns failures into one-line ``ConfigError`` messages, and fixes the conventions.

Accountants (chosen per ledger, by name)
----------------------------------------
* ``"pld"`` (:data:`DEFAULT_ACCOUNTANT`): Google's ``dp-accounting`` ``PLDAccountant``
  (privacy loss distributions, pessimistic discretisation, so its figure is an upper bound).
  It composes every mechanism the ledger records (subsampled Gaussian, Gaussian, Laplace,
  pure ε) in one code path. It is the default because it is tight (at the demo's plan, 6.86
  against RDP's 8.00), it is the only tight one that composes mechanisms of different kinds,
  and at ``PLD_DISCRETIZATION`` it is fast and stable for histories of hundreds of DP-SGD steps
  at q ≈ 0.07 (0.1-0.3 s per figure; opacus's PRV takes 0.2-0.9 s, grows with the steps and
  knows only the subsampled Gaussian).
* ``"prv"``: opacus ``PRVAccountant`` (tight; Gaussian mechanisms only).
* ``"rdp"``: opacus ``RDPAccountant`` (a valid but looser upper bound, ~15% above the tight
  figure for DP-SGD; Gaussian mechanisms only). Version-1 ledgers recorded it; they keep it,
  and their figures are computed exactly as before.

An accountant that cannot handle a mechanism refuses it (:class:`UnsupportedMechanism`, a
``ConfigError``); nothing is ever skipped.

Events
------
A history is a sequence of ``(event, count)`` pairs, where an event is a tuple:

* ``("subsampled-gaussian", σ, q)``: one Poisson-subsampled Gaussian step (DP-SGD, central DP);
  a sample rate of 1 is normalised to ``("gaussian", σ)``, which it is;
* ``("gaussian", σ)``: the Gaussian mechanism, σ = noise std / L2 sensitivity;
* ``("laplace", b)``: the Laplace mechanism, b = noise scale / L1 sensitivity (ε = 1/b);
* ``("pure-epsilon", ε)``: any ε-DP mechanism (dp-accounting's PLD of an (ε, 0)-DP mechanism,
  its worst case, so it holds for the exponential mechanism).

All are with respect to add/remove-one-record neighbouring datasets (opacus's and
dp-accounting's convention for Poisson subsampling). Consecutive events that are equal are
merged (their counts added), which is what opacus's own ``accountant.step()`` does, so a
ledger rebuilt from many rounds gives the same figure as an accountant stepped through the
same training, and as the plan that calibrated σ for all those steps at once.

The legacy :func:`epsilon_of` takes opacus's ``(noise_multiplier, sample_rate, steps)``
triples; :func:`epsilon_of_events` takes events. Both give, for the opacus accountants, the
very figures version 1 gave (same opacus call on the same merged triples).

opacus (and so torch) and dp-accounting are imported lazily, on the first computation.
"""

from __future__ import annotations

import functools
import math
import warnings
from numbers import Integral, Real
from typing import Iterable

from common.errors import ConfigError

ACCOUNTANTS = ("pld", "prv", "rdp")
DEFAULT_ACCOUNTANT = "pld"
TIGHT_ACCOUNTANTS = ("pld", "prv")

ACCOUNTANT_DESCRIPTIONS = {
    "pld": "dp-accounting PLD: tight, composes every mechanism",
    "prv": "opacus PRV: tight, Gaussian mechanisms only",
    "rdp": "opacus RDP: an upper bound, looser than PLD/PRV; Gaussian mechanisms only",
}

SUBSAMPLED_GAUSSIAN = "subsampled-gaussian"
GAUSSIAN = "gaussian"
LAPLACE = "laplace"
PURE_EPSILON = "pure-epsilon"
EVENT_KINDS = (SUBSAMPLED_GAUSSIAN, GAUSSIAN, LAPLACE, PURE_EPSILON)

_SUPPORTED = {
    "pld": frozenset(EVENT_KINDS),
    "prv": frozenset({SUBSAMPLED_GAUSSIAN, GAUSSIAN}),
    "rdp": frozenset({SUBSAMPLED_GAUSSIAN, GAUSSIAN}),
}

# Width of dp-accounting's privacy-loss grid. The discretisation is pessimistic (losses are
# rounded up), so a coarser grid only over-reports; at 1e-3 the figure differs from the 1e-4
# one by ~1e-5 at the demo's plan while costing ~10x less (0.1-0.3 s against 1-4 s).
PLD_DISCRETIZATION = 1e-3
# The σ search first brackets the root on this coarser grid (4-5x cheaper per figure), then
# refines on PLD_DISCRETIZATION; only the final grid decides the returned σ.
_PLD_SEARCH_DISCRETIZATION = 1e-2

# Stated error between the two tight accountants: opacus's PRV figure is an upper bound within
# eps_error = 0.01 of its estimate, dp-accounting's PLD is pessimistic by its grid (1e-3 per
# composition). Measured differences are 0.01 or below (demo plan: PRV 6.868, PLD 6.858).
TIGHT_TOLERANCE_ABS = 0.02
TIGHT_TOLERANCE_REL = 0.005

# get_noise_multiplier's binary search stops once ε is within this fraction below the target;
# the PLD search stops within this fraction of σ (ε moves by about as much or less).
_CALIBRATION_REL_TOLERANCE = 1e-3
_PLD_SIGMA_REL_TOLERANCE = 1e-4


class UnsupportedMechanism(ConfigError):
    """The chosen accountant cannot account for a mechanism; it is refused, never skipped."""


def tight_tolerance(epsilon: float) -> float:
    """How far two tight accountants' figures may differ at ``epsilon`` (their stated error)."""
    return TIGHT_TOLERANCE_ABS + TIGHT_TOLERANCE_REL * abs(epsilon)


def default_delta(n_records: int) -> float:
    """δ for a client holding ``n_records`` records: ``min(1e-5, 1 / (10 * n_records))``.

    δ bounds the probability mass on which the ε guarantee may fail; below 1/(10·n) it cannot
    cover revealing one whole record of the n (the reference code's δ = 1/n could).
    """
    if isinstance(n_records, bool) or not isinstance(n_records, Integral) or n_records < 1:
        raise ConfigError(
            f"cannot derive δ from n_records={n_records!r}: it must be a whole number ≥ 1 "
            "(the number of private records the client holds)."
        )
    return min(1e-5, 1.0 / (10 * int(n_records)))


def delta_meaning(delta: float) -> str:
    """One line on what δ means, for ledger views and the privacy card."""
    return (
        f"δ={delta:g} is the probability with which the ε bound may fail; privdistill keeps it "
        "≤ min(1e-5, 1/(10·n)) for n records, so it cannot cover revealing a whole record"
    )


# A pure function of its arguments that costs seconds: a simulation actor serving many sites,
# round after round, calibrates each distinct plan once.
@functools.lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """Smallest noise multiplier σ (to the search's precision) with ε(σ) ≤ target_epsilon.

    ``steps`` is the WHOLE planned run (all rounds × local steps per round) at
    ``sample_rate``. ``epsilon_of([(σ, sample_rate, steps)], delta, accountant)`` lies in
    ``[0.999 * target_epsilon, target_epsilon]`` for "rdp"/"prv" (opacus's
    ``get_noise_multiplier``, tolerance 0.001·ε) and within 0.1% below the target for "pld"
    (dp-accounting's ``calibrate_dp_mechanism``, σ to 0.01%).
    """
    _check_epsilon(target_epsilon, "target_epsilon")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_accountant(accountant)
    if accountant == "pld":
        return _calibrate_pld(float(target_epsilon), float(delta), float(sample_rate), int(steps))

    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # The search probes large σ where opacus warns that the best RDP order is the
            # largest one; that is about the probe, not the returned σ, so it is silenced here
            # (epsilon_of, which reports real figures, does not silence it).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            warnings.filterwarnings("ignore", category=RuntimeWarning)  # PRV at q = 1: log(0)
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
            raise _unreachable(target_epsilon, delta, sample_rate, steps) from exc
        raise _accountant_failure(accountant, exc) from exc
    except (RuntimeError, ArithmeticError) as exc:
        raise _accountant_failure(accountant, exc) from exc
    return float(sigma)


def epsilon_of(
    history: Iterable[tuple[float, float, int]],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """ε spent at ``delta`` by a history of ``(noise_multiplier, sample_rate, steps)`` triples.

    Each triple is ``steps`` Poisson-subsampled Gaussian steps. An empty history spends
    nothing: 0.0.
    """
    events = []
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
        events.append((subsampled_gaussian(sigma, q), int(steps)))
    return epsilon_of_events(events, delta, accountant)


def epsilon_of_events(events: Iterable[tuple[tuple, int]], delta: float,
                      accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """ε spent at ``delta`` by a history of ``(event, count)`` pairs (see the module docstring).

    Raises :class:`UnsupportedMechanism` if ``accountant`` cannot handle one of the events.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    merged = _merge(events)
    if not merged:
        return 0.0
    return _epsilon_cached(merged, float(delta), accountant)


def unsupported_kinds(events: Iterable[tuple[tuple, int]], accountant: str) -> list[str]:
    """The kinds of mechanism in ``events`` that ``accountant`` cannot compose (sorted)."""
    _check_accountant(accountant)
    return sorted({event[0] for event, _ in _merge(events)} - _SUPPORTED[accountant])


def unsupported_reason(events: Iterable[tuple[tuple, int]], accountant: str) -> str | None:
    """Why ``accountant`` cannot handle ``events`` (one line), or None if it can."""
    kinds = unsupported_kinds(events, accountant)
    if not kinds:
        return None
    return (
        f"the {accountant!r} accountant ({ACCOUNTANT_DESCRIPTIONS[accountant]}) cannot account "
        f"for {', '.join(kinds)}; use accountant 'pld', which composes every mechanism"
    )


def epsilons_by_accountant(events: Iterable[tuple[tuple, int]], delta: float,
                           accountants: Iterable[str] = ACCOUNTANTS) -> tuple[dict[str, float], dict[str, str]]:
    """(ε by accountant for those that can compute it, reason by accountant for the others)."""
    events = list(events)
    figures: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for name in accountants:
        kinds = unsupported_kinds(events, name)
        if kinds:
            unavailable[name] = f"cannot compose {', '.join(kinds)}"
            continue
        try:
            figures[name] = epsilon_of_events(events, delta, name)
        except ConfigError as exc:  # a numerical failure of one library is reported, not hidden
            unavailable[name] = str(exc)
    return figures, unavailable


# --- events ------------------------------------------------------------------------------


def subsampled_gaussian(noise_multiplier: float, sample_rate: float) -> tuple:
    """One Poisson-subsampled Gaussian step (a sample rate of 1 is the plain Gaussian)."""
    _check_noise_multiplier(noise_multiplier)
    _check_sample_rate(sample_rate)
    if float(sample_rate) == 1.0:
        return (GAUSSIAN, float(noise_multiplier))
    return (SUBSAMPLED_GAUSSIAN, float(noise_multiplier), float(sample_rate))


def _merge(events: Iterable[tuple[tuple, int]]) -> tuple[tuple[tuple, int], ...]:
    merged: list[tuple[tuple, int]] = []
    for i, item in enumerate(events):
        try:
            event, count = item
        except (TypeError, ValueError):
            raise ConfigError(f"history item {i} is {item!r}; each item must be an (event, count) pair.") from None
        _check_event(event)
        _check_steps(count)
        if merged and merged[-1][0] == event:
            merged[-1] = (event, merged[-1][1] + int(count))
        else:
            merged.append((event, int(count)))
    return tuple(merged)


def _check_event(event) -> None:
    try:
        hash(event)
    except TypeError:
        raise ConfigError(f"unknown mechanism event {event!r}; kinds: {', '.join(EVENT_KINDS)}.") from None
    _check_hashable_event(event)


# A history repeats a few distinct events many times (every round of a plan): each is checked once.
@functools.lru_cache(maxsize=4096)
def _check_hashable_event(event) -> None:
    if not isinstance(event, tuple) or not event or event[0] not in EVENT_KINDS:
        raise ConfigError(f"unknown mechanism event {event!r}; kinds: {', '.join(EVENT_KINDS)}.")
    kind, *values = event
    arity = {SUBSAMPLED_GAUSSIAN: 2, GAUSSIAN: 1, LAPLACE: 1, PURE_EPSILON: 1}[kind]
    if len(values) != arity or not all(_is_real(v) and v > 0 for v in values):
        raise ConfigError(f"mechanism event {event!r} is invalid: it needs {arity} finite number(s) > 0.")
    if kind == SUBSAMPLED_GAUSSIAN and not values[1] < 1:
        raise ConfigError(f"mechanism event {event!r}: a sample rate of 1 is the event ('gaussian', σ).")


def _require_support(accountant: str, merged) -> None:
    reason = unsupported_reason(merged, accountant)
    if reason is not None:
        raise UnsupportedMechanism(reason + ".")
    if accountant == "pld":
        _check_pld_feasible(merged)


# dp-accounting represents each privacy loss on a grid of PLD_DISCRETIZATION; a mechanism with
# almost no noise has losses in the thousands and needs gigabytes (σ = 0.05 over 1,000 steps at
# q = 0.5: 4 GB). Such mechanisms give no meaningful guarantee (ε in the hundreds or more), so
# the PLD accountant refuses them with a message instead of exhausting memory; opacus's RDP
# accountant handles them.
PLD_MIN_SUBSAMPLED_SIGMA = 0.2   # σ of a Poisson-subsampled Gaussian step
PLD_MIN_GAUSSIAN_SIGMA = 0.05    # σ / √count of the Gaussian releases (they compose to one)
PLD_MAX_PURE_LOSS = 1e4          # count × ε of Laplace (ε = 1/b) and pure-ε events


def _check_pld_feasible(merged) -> None:
    for event, count in merged:
        kind = event[0]
        if kind == SUBSAMPLED_GAUSSIAN and event[1] < PLD_MIN_SUBSAMPLED_SIGMA:
            problem = f"a subsampled Gaussian with σ={event[1]:g} < {PLD_MIN_SUBSAMPLED_SIGMA:g}"
        elif kind == GAUSSIAN and event[1] / math.sqrt(count) < PLD_MIN_GAUSSIAN_SIGMA:
            problem = (f"{count} Gaussian release(s) at σ={event[1]:g} (σ/√count < "
                       f"{PLD_MIN_GAUSSIAN_SIGMA:g})")
        elif kind in (LAPLACE, PURE_EPSILON) and count * _pure_epsilon(event) > PLD_MAX_PURE_LOSS:
            problem = f"{count} {kind} event(s) of ε={_pure_epsilon(event):g} each"
        else:
            continue
        raise UnsupportedMechanism(
            f"the 'pld' accountant cannot represent {problem}: its privacy loss is too large for "
            "dp-accounting's grid and the guarantee is void anyway; add noise, or use accountant 'rdp'."
        )


def _pure_epsilon(event) -> float:
    return 1.0 / event[1] if event[0] == LAPLACE else float(event[1])


# Pure: the same merged history always gives the same figure. A ledger asks for the figure of
# its entries (and of its entries plus one) on every query and every reservation.
@functools.lru_cache(maxsize=1024)
def _epsilon_cached(merged: tuple, delta: float, accountant: str) -> float:
    _require_support(accountant, merged)
    if accountant == "pld":
        eps = _pld_epsilon(merged, delta, PLD_DISCRETIZATION)
    else:
        eps = _opacus_epsilon(merged, delta, accountant)
    if math.isnan(eps) or eps < 0:
        raise _accountant_failure(accountant, ValueError(f"it returned ε={eps!r}"))
    return eps


def _opacus_epsilon(merged, delta: float, accountant: str) -> float:
    triples: list[tuple[float, float, int]] = []
    for event, count in merged:
        sigma, q = (event[1], event[2]) if event[0] == SUBSAMPLED_GAUSSIAN else (event[1], 1.0)
        if triples and triples[-1][0] == sigma and triples[-1][1] == q:
            triples[-1] = (sigma, q, triples[-1][2] + count)
        else:
            triples.append((sigma, q, count))

    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = triples
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning)  # PRV at q = 1: log(0)
            return float(acc.get_epsilon(delta=float(delta)))
    except (RuntimeError, ValueError, ArithmeticError) as exc:
        raise _accountant_failure(accountant, exc) from exc


# --- dp-accounting ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pld_classes():
    """dp-accounting's PLD accountant, extended with one event: an ε-DP mechanism.

    dp-accounting has no DpEvent for a pure-ε mechanism, but its PLD library builds the PLD of
    any (ε, δ)-DP mechanism (``from_privacy_parameters``, the worst case) and composes it with
    the others; the subclass only routes the new event to it. Everything else is
    ``PLDAccountant`` unchanged (pinned to dp-accounting 0.6; tests cover the private
    ``_pld`` it composes into).
    """
    import attr
    from dp_accounting import dp_event
    from dp_accounting.pld import common as pld_common
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    @attr.s(frozen=True, slots=True, auto_attribs=True)
    class PureEpsilonDpEvent(dp_event.DpEvent):
        """An ε-DP mechanism (e.g. the exponential mechanism) applied once."""

        epsilon: float

    class LedgerPLDAccountant(pld_privacy_accountant.PLDAccountant):
        def _maybe_compose(self, event, count, do_compose):
            if isinstance(event, PureEpsilonDpEvent):
                if do_compose:
                    pure = pld_lib.from_privacy_parameters(
                        pld_common.DifferentialPrivacyParameters(float(event.epsilon), 0.0),
                        value_discretization_interval=self._value_discretization_interval,
                    )
                    self._pld = self._pld.compose(pure.self_compose(count) if count > 1 else pure)
                return None
            return super()._maybe_compose(event, count, do_compose)

    return PureEpsilonDpEvent, LedgerPLDAccountant


def _dp_event(event: tuple):
    from dp_accounting import dp_event

    pure_event, _ = _pld_classes()
    kind = event[0]
    if kind == SUBSAMPLED_GAUSSIAN:
        return dp_event.PoissonSampledDpEvent(event[2], dp_event.GaussianDpEvent(event[1]))
    if kind == GAUSSIAN:
        return dp_event.GaussianDpEvent(event[1])
    if kind == LAPLACE:
        return dp_event.LaplaceDpEvent(event[1])
    return pure_event(event[1])


def _pld_accountant(discretization: float):
    _, accountant_cls = _pld_classes()
    return accountant_cls(value_discretization_interval=discretization)


def _pld_epsilon(merged, delta: float, discretization: float) -> float:
    from dp_accounting import UnsupportedEventError

    acc = _pld_accountant(discretization)
    try:
        for event, count in merged:
            acc.compose(_dp_event(event), count)
        return float(acc.get_epsilon(delta))
    except (UnsupportedEventError, ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        raise _accountant_failure("pld", exc) from exc


def _calibrate_pld(target: float, delta: float, q: float, steps: int) -> float:
    """σ by dp-accounting's ``calibrate_dp_mechanism`` (Brent's method; ε(σ) ≤ target)."""
    from dp_accounting import ExplicitBracketInterval, SelfComposedDpEvent, calibrate_dp_mechanism

    def event(sigma: float):
        return SelfComposedDpEvent(_dp_event(subsampled_gaussian(sigma, q)), steps)

    def gap(sigma: float, grid: float) -> float:
        return _pld_accountant(grid).compose(event(sigma)).get_epsilon(delta) - target

    def search(lo: float, hi: float, grid: float) -> float:
        return float(calibrate_dp_mechanism(
            lambda: _pld_accountant(grid), event, target, delta,
            ExplicitBracketInterval(lo, hi), tol=_PLD_SIGMA_REL_TOLERANCE * lo))

    try:
        # 1. bracket and solve on the coarse grid; 2. re-bracket tightly around that σ and
        # solve on the reporting grid. Brackets are found by doubling/halving from σ = 1.
        # The floor is the least noise the PLD accountant represents (_check_pld_feasible).
        floor = PLD_MIN_GAUSSIAN_SIGMA * math.sqrt(steps) if q == 1 else PLD_MIN_SUBSAMPLED_SIGMA
        lo, hi = _bracket(lambda s: gap(s, _PLD_SEARCH_DISCRETIZATION), max(1.0, floor), floor,
                          target, delta, q, steps)
        rough = search(lo, hi, _PLD_SEARCH_DISCRETIZATION)
        lo, hi = _bracket(lambda s: gap(s, PLD_DISCRETIZATION), rough, floor, target, delta, q, steps,
                          factor=1.02)
        return search(lo, hi, PLD_DISCRETIZATION)
    except ConfigError:
        raise
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        raise _accountant_failure("pld", exc) from exc


_SIGMA_MAX = 1e6   # as opacus's search: a plan that needs more noise than this is refused


def _bracket(gap, sigma: float, floor: float, target, delta, q, steps,
             factor: float = 2.0) -> tuple[float, float]:
    """(lo, hi) with gap(lo) > 0 ≥ gap(hi), stepping geometrically from ``sigma``, never below ``floor``.

    A narrow first step (``factor`` < 2, used around a known estimate) is squared after each
    miss, so the bracket widens quickly when the estimate was off.
    """
    widen = factor < 2
    step = factor
    if gap(sigma) > 0:  # too little noise: step up
        lo = sigma
        while True:
            hi = lo * step
            if hi > _SIGMA_MAX:
                raise _unreachable(target, delta, q, steps)
            if gap(hi) <= 0:
                return lo, hi
            lo, step = hi, (step * step if widen else step)
    hi = sigma
    while True:  # enough noise: step down until there is too little
        if hi <= floor:
            raise ConfigError(
                f"ε={target:g} at δ={delta:g} over {steps} steps at sample rate {q:g} would allow "
                f"noise below σ={floor:g}, which the 'pld' accountant does not represent (no "
                "meaningful guarantee lives there); plan a smaller ε, or use accountant 'rdp'."
            )
        lo = max(hi / step, floor)
        if gap(lo) > 0:
            return lo, hi
        hi, step = lo, (step * step if widen else step)


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


def _unreachable(target_epsilon, delta, sample_rate, steps) -> ConfigError:
    return ConfigError(
        f"ε={target_epsilon:g} at δ={delta:g} cannot be met with sample rate "
        f"{sample_rate:g} over {steps} steps (noise multiplier would exceed 1e6); "
        "raise ε or δ, or plan fewer steps or a smaller sample rate."
    )


def _accountant_failure(accountant: str, exc: BaseException) -> ConfigError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    library = "dp-accounting" if accountant == "pld" else "opacus"
    hint = {
        "prv": "use accountant 'pld' (or 'rdp') for this configuration",
        "pld": "check the noise multiplier, sample rate and steps, or use accountant 'prv'",
        "rdp": "check the noise multiplier, sample rate and steps",
    }[accountant]
    return ConfigError(f"the {library} {accountant!r} accountant failed ({detail}); {hint}.")
