"""The DP label histogram: noise scale (statistical test), bins, calibration, prompt weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.privacy.accounting import epsilon_of
from common.privacy.histogram import (
    exact_label_counts,
    histogram_noise_multiplier,
    noisy_label_histogram,
    prompt_weights,
    sum_histograms,
)

LABEL_SET = ["billing", "cards", "loans", "fraud"]
# 5 billing, 0 cards, 2 loans, 9 fraud; plus records outside the label set and unlabelled ones
LABELS = ["billing"] * 5 + ["loans"] * 2 + ["fraud"] * 9 + ["canary", "other", "other"] + [None] * 3
EXACT = np.array([5.0, 0.0, 2.0, 9.0])
DRAWS = 20_000


def test_noise_has_the_configured_scale():
    """Empirical noise std within 3 % of σ and mean within 4σ/√n, per bin, over 20,000 draws.

    For n i.i.d. normal draws the sample std s has std ≈ σ/√(2(n−1)) (chi-square with n−1
    degrees of freedom, normal approximation): 0.50 % of σ at n = 20,000, so 3 % is 6 standard
    errors (two-sided chance of a false failure ≈ 2e-9 per bin). The sample mean has std σ/√n,
    so 4σ/√n is 4 standard errors (≈ 6e-5 per bin). The generator is seeded, so the test is
    also deterministic.
    """
    sigma = 2.5
    rng = np.random.default_rng(20240517)
    draws = np.array([[h[label] for label in LABEL_SET]
                      for h in (noisy_label_histogram(LABELS, LABEL_SET, sigma, rng) for _ in range(DRAWS))])
    noise = draws - EXACT
    std = noise.std(axis=0, ddof=1)
    mean = noise.mean(axis=0)
    assert np.all(np.abs(std / sigma - 1) < 0.03), std
    assert np.all(np.abs(mean) < 4 * sigma / math.sqrt(DRAWS)), mean
    # bins are independent: off-diagonal correlations are noise-sized (|r| ≲ 4/√n = 0.028)
    corr = np.corrcoef(noise.T)
    assert np.all(np.abs(corr[~np.eye(4, dtype=bool)]) < 0.03)


def test_labels_outside_the_label_set_are_not_counted():
    assert exact_label_counts(LABELS, LABEL_SET) == {"billing": 5, "cards": 0, "loans": 2, "fraud": 9}
    hist = noisy_label_histogram(LABELS, LABEL_SET, 1e-9, np.random.default_rng(0))
    assert list(hist) == LABEL_SET  # every public bin, in order, also the empty one; no "other", no None
    assert np.allclose([hist[label] for label in LABEL_SET], EXACT, atol=1e-6)
    # adding records outside the label set changes nothing
    more = noisy_label_histogram(LABELS + ["other"] * 50 + [None] * 50, LABEL_SET, 1e-9, np.random.default_rng(0))
    assert more == hist


def test_default_rng_is_os_seeded():
    np.random.seed(0)
    a = noisy_label_histogram(LABELS, LABEL_SET, 1.0)
    np.random.seed(0)
    b = noisy_label_histogram(LABELS, LABEL_SET, 1.0)
    assert a != b  # neither numpy's global seed nor anything in the config fixes the noise


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_calibration_matches_the_accountant(accountant):
    """σ is one Gaussian step at sample rate 1: the accountant's ε(σ) is the target, to 0.1 %."""
    sigma = histogram_noise_multiplier(1.0, 1e-5, accountant)
    eps = epsilon_of([(sigma, 1.0, 1)], 1e-5, accountant)
    assert 0.998 <= eps <= 1.0
    assert histogram_noise_multiplier(4.0, 1e-5, accountant) < sigma  # more budget, less noise
    # at least as tight as the classic Gaussian-mechanism bound √(2 ln(1.25/δ))/ε
    assert sigma <= math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0


@pytest.mark.parametrize("eps,delta", [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1.0), (float("nan"), 1e-5)])
def test_bad_budgets_are_value_errors(eps, delta):
    with pytest.raises(ValueError):
        histogram_noise_multiplier(eps, delta)


def test_bad_histogram_arguments_are_value_errors():
    with pytest.raises(ValueError, match="noise_multiplier"):
        noisy_label_histogram(LABELS, LABEL_SET, 0.0)
    with pytest.raises(ValueError, match="twice"):
        noisy_label_histogram(LABELS, ["a", "a"], 1.0)
    with pytest.raises(ValueError, match="label_set"):
        noisy_label_histogram(LABELS, [], 1.0)
    with pytest.raises(ValueError, match="None"):
        noisy_label_histogram(LABELS, ["a", None], 1.0)


def test_prompt_weights_clamp_and_normalise():
    assert prompt_weights({"a": 3.0, "b": -2.0, "c": 1.0}) == {"a": 0.75, "b": 0.0, "c": 0.25}
    assert prompt_weights({"a": -1.0, "b": -0.5}) == {"a": 0.5, "b": 0.5}
    assert prompt_weights({"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    with pytest.raises(ValueError):
        prompt_weights({"a": float("nan")})


def test_sum_histograms_over_sites():
    total = sum_histograms([{"a": 1.5, "b": -0.5}, {"a": 2.0, "b": 1.0}], ["a", "b"])
    assert total == {"a": 3.5, "b": 0.5}
    with pytest.raises(ValueError, match="label set"):
        sum_histograms([{"a": 1.0}], ["a", "b"])
