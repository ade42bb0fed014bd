"""The token-level exponential mechanism against its definition, computed here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.errors import ConfigError
from common.privacy.exponential import TokenExponentialMechanism, check_epsilon, guarantee

VOCAB, DIM = 9, 3
SPECIAL = frozenset({0})          # e.g. EOS: passes through, never an output
TEMPLATE = frozenset({1})         # an allow-listed template word


def table(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(VOCAB, DIM))


def mechanism(epsilon, utility="euclidean", seed=1, **kw) -> TokenExponentialMechanism:
    return TokenExponentialMechanism(table(), epsilon, passthrough_ids=SPECIAL | TEMPLATE, special_ids=SPECIAL,
                                     utility=utility, seed=seed, **kw)


def reference(epsilon: float, utility: str, clip: float) -> np.ndarray:
    """P(y | x) straight from the definition, loops and all: rows x ∈ vocab, columns y ∈ O."""
    e = table()
    outputs = [y for y in range(VOCAB) if y not in SPECIAL]
    p = np.zeros((VOCAB, len(outputs)))
    for x in range(VOCAB):
        for j, y in enumerate(outputs):
            if utility == "euclidean":
                u, delta = -min(math.dist(e[x], e[y]), clip), clip
            else:
                u, delta = float(e[x] @ e[y] / (np.linalg.norm(e[x]) * np.linalg.norm(e[y]))), 2.0
            p[x, j] = math.exp(epsilon * u / (2 * delta))
        p[x] /= p[x].sum()
    return p


@pytest.mark.parametrize("utility", ["euclidean", "cosine"])
def test_exact_distribution_is_the_softmax(utility):
    m = mechanism(2.0, utility)
    np.testing.assert_allclose(m.probabilities(range(VOCAB)), reference(2.0, utility, m.sensitivity), rtol=1e-10)


@pytest.mark.parametrize("utility", ["euclidean", "cosine"])
def test_empirical_distribution_of_1e5_draws(utility):
    m = mechanism(3.0, utility)
    n, x = 100_000, 5
    draws = np.array(m.perturb_batch([[x] * n])[0])
    counts = np.array([(draws == y).sum() for y in m.output_ids])
    assert counts.sum() == n  # every draw is in the output set
    p = reference(3.0, utility, m.sensitivity)[x]
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert stats.chi2.sf(chi2, df=len(p) - 1) > 1e-4, (counts, n * p)
    # and per cell, within 5 standard errors
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n))


def test_ratio_bounded_by_e_epsilon_exhaustively():
    for utility in ("euclidean", "cosine"):
        for eps in (0.1, 1.0, 4.0, 16.0):
            p = mechanism(eps, utility).probabilities(range(VOCAB))
            worst = max((p[x] / p[x2]).max() for x in range(VOCAB) for x2 in range(VOCAB))
            assert worst <= math.exp(eps) * (1 + 1e-9), (utility, eps, worst)


def test_the_ratio_check_can_fail():
    # A mis-scaled mechanism (ε/Δu instead of ε/(2Δu)) breaks the e^ε bound on this table.
    p = reference(2 * 16.0, "euclidean", mechanism(16.0).sensitivity)
    worst = max((p[x] / p[x2]).max() for x in range(VOCAB) for x2 in range(VOCAB))
    assert worst > math.exp(16.0)


def test_large_epsilon_returns_the_original_token():
    m = mechanism(1e5)
    prompt = list(range(2, VOCAB)) * 50
    assert m.perturb_batch([prompt]) == [prompt]
    none = mechanism(math.inf)
    assert none.perturb_batch([prompt]) == [prompt]
    assert guarantee(math.inf).startswith("none")


def test_epsilon_zero_is_uniform_over_the_output_set():
    m = mechanism(0.0)
    np.testing.assert_allclose(m.probabilities(range(VOCAB)), 1 / (VOCAB - 1))
    draws = np.array(m.perturb_batch([[4] * 40_000])[0])
    assert set(draws) == set(m.output_ids.tolist())
    assert 0 not in draws  # the special token is not an output


def test_special_and_allow_listed_tokens_pass_through():
    m = mechanism(0.5)
    prompts = [[0, 4, 1, 7, 0], [1, 1, 3]]
    out = m.perturb_batch(prompts)
    assert [o[i] for o, p in zip(out, prompts) for i in range(len(p)) if p[i] in (0, 1)] == [0, 1, 0, 1, 1]
    assert [m.tokens_perturbed(p) for p in prompts] == [2, 1]


def test_batch_is_one_draw_and_unseeded_draws_differ():
    a = TokenExponentialMechanism(table(), 1.0)  # no seed: OS entropy
    b = TokenExponentialMechanism(table(), 1.0)
    prompt = [[3, 4, 5, 6, 7, 8] * 30]
    assert a.perturb_batch(prompt) != b.perturb_batch(prompt)
    seeded = [mechanism(1.0, seed=9).perturb_batch(prompt) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_public_output_subset():
    m = TokenExponentialMechanism(table(), 1e5, output_ids=np.array([2, 3, 4]), seed=0)
    out = m.perturb_batch([[2, 3, 4, 5, 6]])[0]
    assert out[:3] == [2, 3, 4] and set(out) <= {2, 3, 4}  # x ∉ O goes to its nearest output


def test_knn_candidates_state_their_weaker_guarantee():
    m = mechanism(2.0, candidates="knn", knn=3)
    p = m.probabilities(range(VOCAB))
    assert ((p > 0).sum(axis=1) == 3).all()
    assert "weaker" in m.guarantee() and "no bound" in m.guarantee()
    assert "2-DP per perturbed token" in mechanism(2.0).guarantee()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "4", True])
def test_bad_epsilon_is_one_line(bad):
    with pytest.raises(ConfigError, match="per-token epsilon must be > 0"):
        check_epsilon(bad)
    if bad != 0:
        with pytest.raises(ConfigError):
            mechanism(bad)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="perturb-utility"):
        mechanism(1.0, utility="dot")
    with pytest.raises(ConfigError, match="perturb-knn"):
        mechanism(1.0, candidates="knn", knn=0)


def test_a_fixed_length_prompt_perturbed_at_every_token_is_length_times_epsilon_dp_for_any_two_inputs():
    """A rewrite (every token a function of the private input) is cut or padded to L and perturbed at
    every position: two inputs of different lengths and skeletons are then e^(ε·L)-indistinguishable,
    checked exactly on every output sequence of a small case."""
    import itertools

    from common.privacy.exponential import fixed_length, fixed_length_guarantee

    eps, length, filler = 0.7, 3, 4
    m = mechanism(eps).perturbing_every_token()
    assert not any(m.passes(t) for t in range(VOCAB)) and m.special_ids == SPECIAL  # same output set
    assert fixed_length([5, 6, 7, 8], length, filler) == [5, 6, 7] and fixed_length([1], length, filler) == [1, 4, 4]
    a, b = fixed_length([1, 0], length, filler), fixed_length([7, 8, 2, 3], length, filler)  # template + special
    assert m.tokens_perturbed(a) == m.tokens_perturbed(b) == length
    p_a, p_b = m.probabilities(a), m.probabilities(b)
    worst = max(np.prod([p_a[i, j] / p_b[i, j] for i, j in enumerate(out)])
                for out in itertools.product(range(len(m.output_ids)), repeat=length))
    assert 1.0 < worst <= math.exp(eps * length) * (1 + 1e-12)
    draws = m.perturb_batch([a] * 2000)
    assert all(t in set(m.output_ids.tolist()) for d in draws for t in d)  # nothing passed as it was
    assert f"{eps * length:g}-DP with respect to any two inputs" in fixed_length_guarantee(eps, length)
