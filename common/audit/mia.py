"""Membership-inference scores and the metrics that judge them.

Convention: every score is "higher = more likely a member". Score functions take the
per-token log-probabilities of one record (``common.audit.scoring.token_logprobs``) and
return a float (NaN for a record with no scored tokens; the metrics refuse NaN).
The metrics follow the usual thresholding rule: a record is called a member when its
score is >= the threshold.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from common.errors import UserError


class AuditError(UserError):
    """An audit cannot be computed as asked (too few records, overlapping splits, ...)."""


# --- scores (one record each; higher = member) -------------------------------------------

def loss_score(logprobs) -> float:
    """Loss attack (Yeom et al.): ``-mean NLL = mean log p``."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(np.mean(lp)) if lp.size else float("nan")


def zlib_score(text: str, logprobs) -> float:
    """zlib calibration (Carlini et al. 2021): the ratio of log-perplexity to zlib entropy, negated.

    ``score = -(mean NLL) / len(zlib.compress(text.encode("utf-8")))`` where mean NLL is the
    mean next-token negative log-likelihood (natural log) and the zlib entropy is the length
    in bytes of the text compressed at zlib's default level.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if not lp.size:
        return float("nan")
    return float(np.mean(lp)) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logprobs, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest ``ceil(k * n)`` token log-probs."""
    if not 0 < k <= 1:
        raise AuditError(f"Min-K% needs 0 < k <= 1, got k={k}; use e.g. k=0.2 for Min-20%")
    lp = np.sort(np.asarray(logprobs, dtype=np.float64))
    if not lp.size:
        return float("nan")
    count = max(1, math.ceil(k * lp.size - 1e-9))  # 1e-9: 0.2 * 15 must give 3, not 4
    return float(np.mean(lp[:count]))


def reference_score(logprobs_target, logprobs_reference) -> float:
    """Reference-model attack: ``mean NLL_reference - mean NLL_target`` (target fits it better)."""
    return loss_score(logprobs_target) - loss_score(logprobs_reference)


# --- metrics --------------------------------------------------------------------------------

def _scores(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not arr.size:
        raise AuditError(f"no {what} scores given; an attack needs at least one member and one non-member")
    bad = int(np.sum(~np.isfinite(arr)))
    if bad:
        raise AuditError(f"{bad} of {arr.size} {what} scores are NaN/inf (records with no scored tokens?); "
                         "drop texts shorter than two tokens before scoring")
    return arr


def roc_auc(member_scores, nonmember_scores) -> float:
    """P(member score > non-member score) + 0.5 P(equal): the rank (Mann-Whitney) AUC."""
    m = _scores(member_scores, "member")
    n = np.sort(_scores(nonmember_scores, "non-member"))
    below = np.searchsorted(n, m, side="left")
    ties = np.searchsorted(n, m, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (m.size * n.size))


def roc_points(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ROC point: ``(fpr, tpr, thresholds)``, one point per distinct score, thresholds
    descending and starting at +inf (the (0, 0) point). Identical to scikit-learn's
    ``roc_curve(..., drop_intermediate=False)`` with members as the positive class."""
    m = np.sort(_scores(member_scores, "member"))
    n = np.sort(_scores(nonmember_scores, "non-member"))
    thresholds = np.r_[np.inf, np.unique(np.r_[m, n])[::-1]]
    tpr = (m.size - np.searchsorted(m, thresholds, side="left")) / m.size
    fpr = (n.size - np.searchsorted(n, thresholds, side="left")) / n.size
    return fpr, tpr, thresholds


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float) -> float:
    """The largest TPR over ROC points (``roc_points``) whose FPR is <= ``fpr``: no interpolation.

    Refuses (``AuditError``) when there are fewer than ``1 / fpr`` non-members: the
    smallest non-zero FPR they can show is ``1 / n_nonmembers``.
    """
    if not 0 < fpr < 1:
        raise AuditError(f"FPR must lie strictly between 0 and 1, got {fpr}")
    n_non = np.asarray(nonmember_scores).size
    needed = math.ceil(1 / fpr - 1e-9)
    if n_non < needed:
        raise AuditError(f"TPR at FPR {fpr:g} is not resolvable with {n_non} non-members: it needs at least "
                         f"{needed}; add held-out records or report a larger FPR")
    fprs, tprs, _ = roc_points(member_scores, nonmember_scores)
    return float(tprs[fprs <= fpr].max())


def bootstrap_ci(member, nonmember, metric_fn, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(member, nonmember)``, resampling members and
    non-members independently (with replacement, same sizes) ``n_boot`` times."""
    if not 0 < level < 1 or n_boot < 1:
        raise AuditError(f"bootstrap needs 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    m, n = _scores(member, "member"), _scores(nonmember, "non-member")
    rng = np.random.default_rng(seed)
    stats = [metric_fn(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
             for _ in range(n_boot)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def membership_report(members: dict, nonmembers: dict, fprs=(0.01, 0.001), n_boot: int = 200,
                      seed: int = 0, level: float = 0.95) -> dict:
    """Per attack: ``{"auc", "auc_ci": (low, high), "tpr_at_fpr": {fpr: tpr or None},
    "notes": [str], "n_members", "n_nonmembers"}``. A TPR that too few non-members cannot
    resolve is ``None`` with a "not resolvable with N non-members" note."""
    if set(members) != set(nonmembers):
        raise AuditError(f"member and non-member scores cover different attacks: {sorted(members)} vs "
                         f"{sorted(nonmembers)}; score both splits with every attack")
    report = {}
    for attack in members:
        m, n = _scores(members[attack], "member"), _scores(nonmembers[attack], "non-member")
        entry = {"auc": roc_auc(m, n), "auc_ci": bootstrap_ci(m, n, roc_auc, n_boot, seed, level),
                 "tpr_at_fpr": {}, "notes": [], "n_members": int(m.size), "n_nonmembers": int(n.size)}
        for fpr in fprs:
            try:
                entry["tpr_at_fpr"][fpr] = tpr_at_fpr(m, n, fpr)
            except AuditError as err:
                entry["tpr_at_fpr"][fpr] = None
                entry["notes"].append(str(err))
        report[attack] = entry
    return report


def check_disjoint(member_texts, nonmember_texts) -> None:
    """Refuse an audit whose non-members include member texts (exact string match)."""
    shared = set(member_texts) & set(nonmember_texts)
    if shared:
        example = min(shared)
        prefix = example[:40] + ("..." if len(example) > 40 else "")
        raise AuditError(f"{len(shared)} text(s) are both members and non-members (e.g. {prefix!r}); "
                         "draw non-members from records never used in training")
