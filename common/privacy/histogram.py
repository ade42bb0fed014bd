"""The DP label histogram each site releases once (Gaussian mechanism).

It decides how many synthetic records the server generates per control code, without the raw
private label counts (the DistilDP reference code reads those straight from the private
training set, outside its guarantee).

What the guarantee covers
-------------------------
* **The histogram alone**: one release of one site's label counts. It is composed with the
  site's DP-SGD by the caller (the site's ledger): ``histogram_noise_multiplier`` returns the σ
  of a single Gaussian-mechanism step at sample rate 1, so the charge is the accountant entry
  ``(σ, 1.0, 1)``.
* **Record-level, add/remove adjacency**: two data sets differ by one record added or removed.
  That changes exactly one bin by 1 (or none: see below), so the count vector has
  L2 sensitivity 1 and the noise std is ``σ = noise_multiplier × 1``. Under replace-one
  adjacency the sensitivity would be √2 (one bin −1, another +1); it is not what is used here.
  A person with several records is protected as several records (group privacy), not as one.
* **The label set is public**: fixed in advance (the run settings, a public split), never read
  off the private data. A bin exists for every label in ``label_set`` whether or not any record
  has it, so the released keys reveal nothing. Records whose label is not in ``label_set`` and
  records without a label (``None``) are counted in **no** bin; adding or removing one changes
  nothing, which is within sensitivity 1.
* Negative or fractional noisy counts are kept in the release; clamping them and turning them
  into prompt weights (``prompt_weights``) is post-processing and costs nothing.

Randomness: ``rng=None`` draws from ``numpy.random.default_rng()`` seeded by the operating
system. Production code must not pass a generator seeded from the run config: a reproducible
seed lets anyone who knows it subtract the noise.
"""

from __future__ import annotations

import math
from collections import Counter
from numbers import Real

import numpy as np

from common.data.control import validate_label
from common.errors import ConfigError
from common.privacy.accounting import calibrate_noise

SENSITIVITY = 1.0  # L2, add/remove adjacency, one record changes one bin by one


class HistogramError(ConfigError, ValueError):
    """A bad histogram argument (a ``ValueError`` and a one-line ``ConfigError``)."""


def histogram_noise_multiplier(epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """σ of the one-step Gaussian mechanism (sample rate 1) with ε(σ) ≤ ``epsilon`` at ``delta``.

    ``calibrate_noise(epsilon, delta, 1.0, 1, accountant)``; the site's ledger charges the entry
    ``(σ, 1.0, 1)``, which ``epsilon_of`` composes with its DP-SGD history.
    """
    if not _finite_real(epsilon) or epsilon <= 0:
        raise HistogramError(f"histogram epsilon={epsilon!r} is invalid: it must be a number > 0")
    if not _finite_real(delta) or not 0 < delta < 1:
        raise HistogramError(f"histogram delta={delta!r} is invalid: it must be in (0, 1)")
    return float(calibrate_noise(float(epsilon), float(delta), 1.0, 1, accountant))


def exact_label_counts(labels, label_set: list[str]) -> dict[str, int]:
    """Exact counts over ``label_set`` (in its order); other labels and ``None`` count nowhere.

    Private: never release or log this; it is the input of ``noisy_label_histogram``.
    """
    _check_label_set(label_set)
    counts = Counter(label for label in labels if label is not None)
    return {label: int(counts.get(label, 0)) for label in label_set}


def noisy_label_histogram(
    labels: list[str | None],
    label_set: list[str],
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """The released histogram: exact counts over ``label_set`` + N(0, σ²) in every bin.

    σ = ``noise_multiplier`` × sensitivity 1. Every label of ``label_set`` is a key (in its
    order), also those no record has. Records whose label is not in ``label_set``, and records
    with label ``None``, are counted in no bin. ``rng`` None → ``numpy.random.default_rng()``,
    seeded from the operating system (tests pass a seeded generator; production must not).
    """
    if not _finite_real(noise_multiplier) or noise_multiplier <= 0:
        raise HistogramError(f"noise_multiplier={noise_multiplier!r} is invalid: it must be a number > 0 "
                             "(σ = 0 would release the exact private counts)")
    exact = exact_label_counts(labels, label_set)
    if rng is None:
        rng = np.random.default_rng()
    sigma = float(noise_multiplier) * SENSITIVITY
    noise = rng.normal(0.0, sigma, size=len(label_set))
    return {label: float(exact[label] + noise[i]) for i, label in enumerate(label_set)}


def sum_histograms(histograms: list[dict[str, float]], label_set: list[str]) -> dict[str, float]:
    """The server's sum of the sites' released histograms, over the public ``label_set``."""
    _check_label_set(label_set)
    total = {label: 0.0 for label in label_set}
    for i, hist in enumerate(histograms):
        if set(hist) != set(label_set):
            extra, missing = sorted(set(hist) - set(label_set)), sorted(set(label_set) - set(hist))
            raise HistogramError(f"histogram {i} has bins {sorted(hist)}, not the label set "
                                 f"(extra {extra}, missing {missing}); every site must use the same public labels")
        for label in label_set:
            value = hist[label]
            if not _finite_real(value):
                raise HistogramError(f"histogram {i}: bin {label!r} is {value!r}, not a finite number")
            total[label] += float(value)
    return total


def prompt_weights(noisy_sum: dict[str, float]) -> dict[str, float]:
    """Prompt shares per label from a (summed) noisy histogram: negatives → 0, normalised to 1.

    All bins ≤ 0 → uniform. Post-processing of the release: costs no privacy.
    """
    if not noisy_sum:
        raise HistogramError("prompt_weights needs at least one label")
    for label, value in noisy_sum.items():
        if not _finite_real(value):
            raise HistogramError(f"bin {label!r} is {value!r}, not a finite number")
    clamped = {label: max(0.0, float(value)) for label, value in noisy_sum.items()}
    total = math.fsum(clamped.values())
    if total <= 0:
        return {label: 1.0 / len(clamped) for label in clamped}
    return {label: value / total for label, value in clamped.items()}


def _check_label_set(label_set) -> None:
    if isinstance(label_set, (str, bytes)) or not label_set:
        raise HistogramError(f"label_set={label_set!r} is invalid: give a non-empty list of public labels")
    seen = set()
    for label in label_set:
        if label is None:
            raise HistogramError("label_set contains None; unlabelled records get no bin, list only real labels")
        validate_label(label)
        if label in seen:
            raise HistogramError(f"label_set lists {label!r} twice; each public label once")
        seen.add(label)


def _finite_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))
