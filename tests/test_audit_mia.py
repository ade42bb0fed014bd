"""Membership-inference scores and metrics: hand-computed values, scikit-learn agreement, refusals."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from common.audit.mia import (AuditError, bootstrap_ci, check_disjoint, loss_score, membership_report,
                              min_k_score, reference_score, roc_auc, roc_points, tpr_at_fpr, zlib_score)
from common.errors import UserError

LP = np.log([0.5, 0.25, 0.125, 1.0])  # NLLs: ln2, 2ln2, 3ln2, 0 -> mean NLL = 1.5 ln2
LN2 = math.log(2)


def test_loss_score_is_minus_mean_nll():
    assert loss_score(LP) == pytest.approx(-1.5 * LN2, abs=1e-15)
    assert math.isnan(loss_score([]))


def test_zlib_score_is_negated_ratio_of_log_perplexity_to_zlib_entropy():
    text = "aaaa"
    assert len(zlib.compress(b"aaaa")) == 12  # zlib header + deflate block + adler32
    assert zlib_score(text, LP) == pytest.approx(-1.5 * LN2 / 12, abs=1e-15)
    # UTF-8 bytes, not characters: "é" is 2 bytes
    assert zlib_score("é", [-1.0]) == pytest.approx(-1.0 / len(zlib.compress("é".encode("utf-8"))))


def test_min_k_score_means_the_lowest_ceil_k_n_logprobs():
    lp = np.log([0.5, 0.25, 0.125, 1.0])
    assert min_k_score(lp, k=0.2) == pytest.approx(-3 * LN2)  # ceil(0.8) = 1 token: ln 1/8
    assert min_k_score(lp, k=0.5) == pytest.approx(-2.5 * LN2)  # 2 lowest: 1/8, 1/4
    assert min_k_score(lp, k=1.0) == pytest.approx(loss_score(lp))
    fifteen = -np.arange(1.0, 16.0)  # 0.2 * 15 is 3.0000000000000004 in floats: still 3 tokens
    assert min_k_score(fifteen, k=0.2) == pytest.approx(-(15 + 14 + 13) / 3)
    with pytest.raises(AuditError):
        min_k_score(lp, k=0.0)


def test_reference_score_is_reference_nll_minus_target_nll():
    target = [-1.0, -2.0]  # mean NLL 1.5
    reference = [-3.0, -4.0, -5.0]  # mean NLL 4.0
    assert reference_score(target, reference) == pytest.approx(2.5)  # target fits better: positive


def test_roc_auc_hand_example_with_tie():
    # pairs (m > n): 3 > 1, 3 > 2, 2 > 1 -> 3 wins; 2 == 2 -> half; 1 vs 1 tie -> half; 1 < 2 -> loss
    assert roc_auc([3, 2, 1], [1, 2]) == pytest.approx((3 + 0.5 + 0.5) / 6)
    assert roc_auc([5, 6], [1, 2]) == 1.0 and roc_auc([1], [5]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_roc_points_and_tpr_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_m, n_n = 150, 1000
    # rounding makes many ties, within and across classes
    m = np.round(rng.normal(0.4, 1.0, n_m), 1 if seed % 2 else 3)
    n = np.round(rng.normal(0.0, 1.0, n_n), 1 if seed % 2 else 3)
    y = np.r_[np.ones(n_m), np.zeros(n_n)]
    s = np.r_[m, n]
    assert roc_auc(m, n) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr_sk, tpr_sk, thr_sk = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, thr = roc_points(m, n)
    np.testing.assert_allclose(fpr, fpr_sk, atol=1e-15)
    np.testing.assert_allclose(tpr, tpr_sk, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], thr_sk[1:])
    assert np.isinf(thr[0]) and np.isinf(thr_sk[0])
    for target in (0.001, 0.01, 0.05, 0.1, 0.5):
        expected = tpr_sk[fpr_sk <= target].max()
        assert tpr_at_fpr(m, n, target) == expected


def test_tpr_at_fpr_hand_example():
    members = [0.9, 0.8, 0.3]
    nonmembers = np.r_[[0.85], np.linspace(0.0, 0.5, 99)]  # 100 non-members, one of them scored high
    # threshold 0.9: fpr 0, tpr 1/3; threshold 0.85: fpr 0.01, tpr 1/3; 0.8: fpr 0.01, tpr 2/3
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(members, nonmembers * 0.1, 0.01) == 1.0


def test_tpr_at_fpr_refuses_too_few_nonmembers_and_says_how_many():
    with pytest.raises(AuditError, match=r"needs at least 1000.*999 non-members|999 non-members.*1000"):
        tpr_at_fpr(np.ones(50), np.zeros(999), 0.001)
    assert tpr_at_fpr(np.ones(50), np.zeros(1000), 0.001) == 1.0
    with pytest.raises(AuditError, match="100"):
        tpr_at_fpr([1.0], np.zeros(99), 0.01)
    assert issubclass(AuditError, UserError)


def test_metrics_refuse_nan_scores():
    with pytest.raises(AuditError, match="1 of 2 member scores"):
        roc_auc([0.1, float("nan")], [0.0])


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_samples():
    def widths(n_m, n_n, seed):
        rng = np.random.default_rng(seed)
        m, n = rng.normal(0.5, 1, n_m), rng.normal(0, 1, n_n)
        low, high = bootstrap_ci(m, n, roc_auc, n_boot=200, seed=0)
        assert low <= roc_auc(m, n) <= high
        return high - low

    small, large = widths(30, 30, 1), widths(1000, 1000, 2)
    assert large < small / 3
    # deterministic given the seed; a different seed resamples differently
    m, n = np.arange(20.0), np.arange(20.0) - 3
    assert bootstrap_ci(m, n, roc_auc, seed=4) == bootstrap_ci(m, n, roc_auc, seed=4)
    assert bootstrap_ci(m, n, roc_auc, seed=4) != bootstrap_ci(m, n, roc_auc, seed=5)


def test_membership_report_fields_and_unresolvable_note():
    rng = np.random.default_rng(0)
    members = {"loss": rng.normal(1, 1, 40), "zlib": rng.normal(0, 1, 40)}
    nonmembers = {"loss": rng.normal(0, 1, 200), "zlib": rng.normal(0, 1, 200)}
    report = membership_report(members, nonmembers, fprs=(0.01, 0.001), n_boot=50)
    assert set(report) == {"loss", "zlib"}
    loss = report["loss"]
    assert loss["auc"] == roc_auc(members["loss"], nonmembers["loss"])
    assert loss["auc_ci"][0] <= loss["auc"] <= loss["auc_ci"][1]
    assert loss["n_members"] == 40 and loss["n_nonmembers"] == 200
    assert loss["tpr_at_fpr"][0.01] == tpr_at_fpr(members["loss"], nonmembers["loss"], 0.01)
    assert loss["tpr_at_fpr"][0.001] is None
    assert len(loss["notes"]) == 1 and "not resolvable with 200 non-members" in loss["notes"][0]
    assert report["loss"]["auc"] > report["zlib"]["auc"]
    with pytest.raises(AuditError, match="different attacks"):
        membership_report({"loss": [1.0]}, {"zlib": [0.0]})


def test_check_disjoint_refuses_overlap_with_count_and_prefix():
    check_disjoint(["a", "b"], ["c"])
    long_text = "Patient John Carter, MRN 55120, seen for follow-up of hypertension"
    with pytest.raises(AuditError, match=r"2 text\(s\).*Patient John Carter") as err:
        check_disjoint([long_text, "b", "x"], ["b", long_text, "y"])
    assert "\n" not in str(err.value) and "hypertension" not in str(err.value)  # a short prefix only
