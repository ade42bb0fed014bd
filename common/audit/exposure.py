"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is ``"the account number of {name} is {secret}"`` with a random 10-digit secret,
so the space of secrets R has |R| = 10^10. Its exposure says how many bits the model's
ranking gives away::

    exposure = log2 |R| - log2 rank(secret),   rank = 1 + #{r in R : logppl(r) < logppl(secret)}

Units: log-perplexity here is the *sum* of the secret's per-token negative log-likelihood,
in **bits** (log base 2), given the prefix ``"the account number of {name} is"``; exposure is
in bits too. Exposure depends only on the ordering (rank) or on a CDF, so the choice of base
does not change it; bits just make logppl and exposure read in the same unit.

Two estimates:

* ``exposure_by_rank``: the rank among candidates. With the whole space enumerated this is
  exact; with n sampled candidates (the canary not among them) it is log2(n+1) - log2 rank,
  which is capped at log2(n+1) bits. For a secret the model never saw the rank is uniform,
  so the expected exposure is about 1/ln 2 ~ 1.44 bits whatever n is.
* ``exposure_extrapolated``: the paper's extrapolation for a huge |R|: fit a skew-normal to
  the sampled candidates' log-perplexities and take -log2 CDF(canary). Not capped by n.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from common.audit.scoring import token_logprobs
from common.data.generate import CANARY_TEMPLATE, SECRET_DIGITS

SPACE_SIZE = 10 ** SECRET_DIGITS  # |R| for the canary template
CDF_FLOOR = 1e-300  # the extrapolated CDF is clipped here, so exposure is at most ~996.6 bits
METHODS = ("extrapolated", "rank")


def canary_prefix(name: str) -> str:
    """The conditioning text of a canary, without the trailing space: "the account number of NAME is"."""
    return CANARY_TEMPLATE.split("{secret}")[0].format(name=name).rstrip()


def secrets_logppl(model, tokenizer, names: list[str], secrets: list[str], batch_size: int = 64) -> np.ndarray:
    """Log-perplexity in bits (sum of -log2 p over the secret's tokens) of each secret after its prefix."""
    prefixes = [canary_prefix(n) for n in names]
    texts = [" " + s for s in secrets]  # byte-level BPE attaches the space to the first digit token
    logprobs = token_logprobs(model, tokenizer, texts, batch_size=batch_size, max_length=128, prefixes=prefixes)
    return np.array([-lp.sum() / math.log(2) for lp in logprobs])


def canary_logppl(model, tokenizer, canaries: list[dict], batch_size: int = 64) -> np.ndarray:
    """Log-perplexity (bits) of each canary's secret given its prefix; canaries need ``name`` and ``secret``."""
    return secrets_logppl(model, tokenizer, [c["name"] for c in canaries], [c["secret"] for c in canaries],
                          batch_size)


def random_secrets(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` uniform secrets from R (10-digit strings, leading zeros kept)."""
    return [f"{x:0{SECRET_DIGITS}d}" for x in rng.integers(0, SPACE_SIZE, size=n, dtype=np.int64)]


def candidate_logppls(model, tokenizer, name: str, n_candidates: int, rng: np.random.Generator,
                      batch_size: int = 64) -> np.ndarray:
    """Log-perplexities (bits) of ``n_candidates`` random secrets after the same prefix as ``name``'s canary.

    Candidates are drawn with replacement and may (with probability ~n/10^10) equal the canary.
    """
    secrets = random_secrets(n_candidates, rng)
    return secrets_logppl(model, tokenizer, [name] * n_candidates, secrets, batch_size)


def exposure_by_rank(canary_value: float, candidate_values, space_size: int | None = None) -> float:
    """log2(space_size) - log2(rank), rank = 1 + #candidates with a strictly lower log-perplexity.

    Enumerated space: pass every value of R (the canary's own included) and ``space_size=|R|``.
    Sampled candidates (the canary not among them): leave ``space_size`` None, it becomes n + 1.
    """
    values = np.asarray(candidate_values, dtype=float)
    size = len(values) + 1 if space_size is None else space_size
    rank = 1 + int(np.sum(values < canary_value))
    return math.log2(size) - math.log2(rank)


def exposure_extrapolated(canary_value: float, candidate_values) -> float:
    """-log2 CDF(canary_value) under a skew-normal fitted to the candidates (``scipy.stats.skewnorm.fit``).

    The CDF is clipped below at ``CDF_FLOOR`` (1e-300), so a canary far in the tail reads as
    ~996.6 bits rather than infinity.
    """
    a, loc, scale = stats.skewnorm.fit(np.asarray(candidate_values, dtype=float))
    cdf = stats.skewnorm.cdf(canary_value, a, loc=loc, scale=scale)
    return float(-math.log2(max(float(cdf), CDF_FLOOR)))


def exposure_table(model, tokenizer, canaries: list[dict], n_candidates: int = 1000, seed: int = 0,
                   method: str = "extrapolated", batch_size: int = 64) -> list[dict]:
    """One row per canary: {id, repeats, logppl (bits), exposure (bits), method}.

    ``method``: "extrapolated" (skew-normal tail; the paper's estimate for |R| = 10^10) or "rank"
    (rank among the sampled candidates; at most log2(n_candidates + 1) bits). Candidates come
    from one ``np.random.default_rng(seed)``, drawn canary after canary in the given order.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rng = np.random.default_rng(seed)
    values = canary_logppl(model, tokenizer, canaries, batch_size)
    rows = []
    for canary, value in zip(canaries, values):
        candidates = candidate_logppls(model, tokenizer, canary["name"], n_candidates, rng, batch_size)
        exposure = (exposure_extrapolated(value, candidates) if method == "extrapolated"
                    else exposure_by_rank(value, candidates))
        rows.append({"id": canary["id"], "repeats": canary.get("repeats"), "logppl": float(value),
                     "exposure": exposure, "method": method})
    return rows


def summarize_by_repeats(rows: list[dict]) -> dict:
    """{repeats: {mean, max, n}} of exposure, for each repeat count present (0 = never planted)."""
    summary = {}
    for repeats in sorted({r["repeats"] for r in rows}, key=lambda r: (r is None, r)):
        exposures = [r["exposure"] for r in rows if r["repeats"] == repeats]
        summary[repeats] = {"mean": float(np.mean(exposures)), "max": float(np.max(exposures)), "n": len(exposures)}
    return summary
