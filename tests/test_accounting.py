"""Accounting wrappers against opacus itself, the independent reference."""

from __future__ import annotations

import functools

import pytest

from common.errors import ConfigError, UserError
from common.privacy.accounting import ACCOUNTANTS, calibrate_noise, default_delta, epsilon_of

DELTA = 1e-5


# One planned run, calibrated at several budgets with both accountants. PRV calibration is the
# slow part of this file (seconds each), so each (accountant, ε) is calibrated once.
Q, STEPS = 0.08, 100
TARGETS = (1.0, 2.0, 8.0)


@functools.lru_cache(maxsize=None)
def _calibrated(accountant: str, target: float) -> float:
    return calibrate_noise(target, DELTA, Q, STEPS, accountant)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibrated_noise_meets_target(accountant, target):
    sigma = _calibrated(accountant, target)
    eps = epsilon_of([(sigma, Q, STEPS)], DELTA, accountant)
    assert eps <= target * 1.0001
    assert eps == pytest.approx(target, rel=0.01)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_larger_epsilon_needs_less_noise(accountant):
    sigmas = [_calibrated(accountant, t) for t in TARGETS]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_calibration_other_sampling_regime():
    sigma = calibrate_noise(2.0, 1e-6, 0.004, 2000, "rdp")
    eps = epsilon_of([(sigma, 0.004, 2000)], 1e-6, "rdp")
    assert 2.0 * 0.99 <= eps <= 2.0 * 1.0001
    # the whole planned run is what is calibrated: splitting it into rounds spends the same
    rounds = [(sigma, 0.004, 400)] * 5
    assert epsilon_of(rounds, 1e-6, "rdp") == pytest.approx(eps, rel=1e-12)


def _reference_epsilon(mechanism: str, history, delta: float) -> float:
    """Drive an opacus accountant step by step, the way DPOptimizer's hook does."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


HISTORY = [(1.1, 0.02, 30), (1.1, 0.02, 20), (0.9, 0.05, 10), (1.3, 0.01, 40), (0.9, 0.05, 5)]


def test_epsilon_of_matches_stepped_rdp_accountant():
    ref = _reference_epsilon("rdp", HISTORY, DELTA)
    assert epsilon_of(HISTORY, DELTA, "rdp") == pytest.approx(ref, rel=1e-9)
    # the split into entries does not matter: one entry of 50 steps == 30 + 20
    merged = [(1.1, 0.02, 50), *HISTORY[2:]]
    assert epsilon_of(merged, DELTA, "rdp") == pytest.approx(ref, rel=1e-9)


def test_epsilon_of_matches_stepped_prv_accountant():
    history = [(1.1, 0.05, 10), (1.1, 0.05, 15), (0.9, 0.05, 10)]
    ref = _reference_epsilon("prv", history, DELTA)
    assert epsilon_of(history, DELTA, "prv") == pytest.approx(ref, rel=1e-9)


def test_composition_only_adds_privacy_loss():
    one = epsilon_of(HISTORY[:1], DELTA)
    two = epsilon_of(HISTORY[:2], DELTA)
    assert 0 < one < two < epsilon_of(HISTORY, DELTA)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_empty_history_spends_nothing(accountant):
    assert epsilon_of([], DELTA, accountant) == 0.0


@pytest.mark.parametrize("n", [1, 7, 1000, 10_000, 99_999, 10**7])
def test_default_delta(n):
    d = default_delta(n)
    assert 0 < d <= 1 / (10 * n)
    assert d <= 1e-5


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "100"])
def test_default_delta_rejects_bad_counts(n):
    with pytest.raises(ConfigError):
        default_delta(n)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_epsilon=0.0),
        dict(target_epsilon=-1.0),
        dict(target_epsilon=float("inf")),
        dict(delta=0.0),
        dict(delta=1.0),
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(steps=0),
        dict(steps=2.5),
        dict(accountant="gdp"),
    ],
)
def test_calibrate_noise_validates(kwargs):
    args = dict(target_epsilon=2.0, delta=DELTA, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        calibrate_noise(**args)
    assert isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("history", "delta", "accountant"),
    [
        ([(0.0, 0.1, 10)], DELTA, "rdp"),
        ([(1.0, 0.0, 10)], DELTA, "rdp"),
        ([(1.0, 0.1, 0)], DELTA, "rdp"),
        ([(1.0, 0.1)], DELTA, "rdp"),
        ([(1.0, 0.1, 10)], 0.0, "rdp"),
        ([(1.0, 0.1, 10)], DELTA, "nope"),
    ],
)
def test_epsilon_of_validates(history, delta, accountant):
    with pytest.raises(ConfigError) as info:
        epsilon_of(history, delta, accountant)
    assert "\n" not in str(info.value)


def test_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be met"):
        calibrate_noise(1e-4, 1e-10, 1.0, 10_000, "rdp")


def test_calibration_is_computed_once_per_plan():
    # The simulation calls it for every site and round; the second call must be a cache hit
    # returning the very same σ (opacus's search is deterministic, but costs seconds).
    calibrate_noise.cache_clear()
    first = calibrate_noise(3.0, 1e-5, 0.05, 40)
    again = calibrate_noise(3.0, 1e-5, 0.05, 40)
    other = calibrate_noise(3.0, 1e-5, 0.05, 80)
    info = calibrate_noise.cache_info()
    assert first == again and other > first
    assert (info.hits, info.misses) == (1, 2)
