"""Client partitions: deterministic, exhaustive, and label-skewed as alpha shrinks."""

import math
from collections import Counter

import pytest

from common.data import partition_dirichlet, partition_iid
from common.errors import DataError

LABELS = [f"label{i % 5}" for i in range(500)]


def assert_exact_cover(parts, n):
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert all(part == sorted(part) for part in parts)


def test_iid_deterministic_exhaustive_balanced():
    parts = partition_iid(103, 4, seed=1)
    assert parts == partition_iid(103, 4, seed=1)
    assert parts != partition_iid(103, 4, seed=2)
    assert_exact_cover(parts, 103)
    assert sorted(map(len, parts)) == [25, 26, 26, 26]


def test_dirichlet_deterministic_exhaustive():
    parts = partition_dirichlet(LABELS, 6, alpha=0.5, seed=3)
    assert parts == partition_dirichlet(LABELS, 6, alpha=0.5, seed=3)
    assert parts != partition_dirichlet(LABELS, 6, alpha=0.5, seed=4)
    assert_exact_cover(parts, len(LABELS))
    assert min(map(len, parts)) >= 1


def test_dirichlet_min_per_client():
    parts = partition_dirichlet(LABELS, 10, alpha=0.3, seed=0, min_per_client=20)
    assert min(map(len, parts)) >= 20
    assert_exact_cover(parts, len(LABELS))


def mean_label_entropy(parts) -> float:
    """Average over clients of the entropy (bits) of the client's label histogram."""
    entropies = []
    for part in parts:
        counts = Counter(LABELS[i] for i in part)
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(entropies) / len(entropies)


def test_small_alpha_is_more_skewed_than_large_alpha():
    skewed = mean_label_entropy(partition_dirichlet(LABELS, 5, alpha=0.1, seed=0))
    near_iid = mean_label_entropy(partition_dirichlet(LABELS, 5, alpha=100.0, seed=0))
    assert near_iid > 2.2  # log2(5) = 2.32 is perfectly balanced
    assert skewed < near_iid - 1.0


@pytest.mark.parametrize("call, words", [
    (lambda: partition_iid(10, 0, seed=0), "at least 1"),
    (lambda: partition_iid(3, 4, seed=0), "only 3 records"),
    (lambda: partition_dirichlet(["a", "b"], 3, alpha=1.0, seed=0), "only 2 records"),
    (lambda: partition_dirichlet(["a", "b"], 1, alpha=0.0, seed=0), "alpha must be > 0"),
    (lambda: partition_dirichlet(["a", None, "b"], 2, alpha=1.0, seed=0), "record 2 has no label"),
    (lambda: partition_dirichlet(["a"] * 10, 2, alpha=1.0, seed=0, min_per_client=6), "6 records each"),
])
def test_bad_arguments(call, words):
    with pytest.raises(DataError, match=words):
        call()
