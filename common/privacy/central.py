"""User-level central DP on the server: Flower's clipping + noise wrapper, opacus accounting.

Each sampled site's whole adapter update is clipped to norm C and the FedAvg mean gets
Gaussian noise of std σ·C / n: by the server (`DifferentialPrivacyServerSideFixedClipping`,
the default) or by each site before its update leaves (`central-clip-at = "site"`:
`DifferentialPrivacyClientSideFixedClipping` + `fixedclipping_mod`; always so under SecAgg+,
where the server never sees one update). With site clipping the server still checks that
every update's norm is ≤ C, so a site that did not clip cannot weaken the guarantee.
Accounting (the ledger's accountant, dp-accounting's PLD by default, or opacus's PRV/RDP; not
Flower's: Flower's assumes no subsampling amplification) treats a round as one step of the
subsampled Gaussian mechanism with q = sites per round / sites.

Two choices keep the guarantee honest:
- every site weighs the same ("unit-weight" = 1): with example weighting one site's
  influence on the mean would exceed C / n;
- n is `min-clients`, the fewest valid replies a round can be aggregated from, so the noise
  is never too small for the sensitivity C / (valid replies) of the round actually released.

Adaptive clipping (`central-clipping = "adaptive"`, Andrew et al. 2021) is Flower's
`DifferentialPrivacyServerSideAdaptiveClipping`: C follows a noisy quantile of the update
norms, and Flower raises the update noise so the update and the noisy count together are
as private as one Gaussian step at the configured σ, which is what the ledger charges.
Flower 1.41 moves C the wrong way (it shrinks C when most updates are clipped); the one-line
override below fixes the direction, and a test fails once Flower fixes it upstream.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

from common.errors import ConfigError
from common.privacy.accounting import DEFAULT_ACCOUNTANT, epsilon_of
from common.privacy.ledger import DPSGDCharge

UNIT_WEIGHT_KEY = "unit-weight"


@dataclass(frozen=True)
class CentralDPPlan:
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float          # sites per round / sites
    rounds: int
    min_clients: int            # n in the noise std σ·C / n
    delta: float
    epsilon_budget: float
    clipping: str = "fixed"           # or "adaptive" (C is then the initial norm)
    clip_at: str = "server"           # or "site": Flower's client-side clipping (fixedclipping_mod)
    target_quantile: float = 0.5      # adaptive: the share of updates that should be clipped
    clip_lr: float = 0.2              # adaptive: geometric learning rate of C
    count_stddev: float | None = None  # adaptive: noise std of the clipped count (None: n/20)
    accountant: str = DEFAULT_ACCOUNTANT  # plans (and should match) the server ledger's accountant

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clipping_norm / self.min_clients

    def round_charge(self) -> DPSGDCharge:
        """One round = one subsampled Gaussian step (same entry type as DP-SGD's, steps = 1)."""
        return DPSGDCharge(self.noise_multiplier, self.sample_rate, 1, self.clipping_norm)

    def planned_epsilon(self) -> float:
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.rounds)], self.delta, self.accountant)


# Every ClientApp message rebuilds the run settings, and validating them plans central DP:
# without the cache that is an accountant computation (0.1-0.3 s) per message. Plans are immutable.
@functools.lru_cache(maxsize=64)
def plan_central_dp(clients: int, per_round: int, rounds: int, min_clients: int, noise_multiplier: float,
                    clipping_norm: float, epsilon_budget: float, delta: float | None = None,
                    **adaptive) -> CentralDPPlan:
    """Validate and plan; refuses a run whose planned rounds would exceed the user-level budget."""
    if not noise_multiplier > 0:
        raise ConfigError(f"central-noise-multiplier must be > 0 for central DP, got {noise_multiplier}")
    if not clipping_norm > 0:
        raise ConfigError(f"central-clip must be > 0, got {clipping_norm}")
    delta = min(1e-5, 1 / (10 * clients)) if delta is None else delta
    plan = CentralDPPlan(noise_multiplier, clipping_norm, min(1.0, per_round / clients), rounds, min_clients,
                         delta, epsilon_budget, **adaptive)
    if plan.clipping not in ("fixed", "adaptive"):
        raise ConfigError(f"central-clipping must be fixed or adaptive, got {plan.clipping!r}")
    if plan.clip_at not in ("server", "site"):
        raise ConfigError(f"central-clip-at must be server or site, got {plan.clip_at!r}")
    if plan.clip_at == "site" and plan.clipping != "fixed":
        raise ConfigError("central-clip-at = site supports central-clipping = fixed only; clip at the server for "
                          "adaptive clipping")
    if plan.clipping == "adaptive":
        count_stddev = plan.count_stddev or min_clients / 20  # Flower's default
        if not noise_multiplier < 2 * count_stddev:
            raise ConfigError(
                f"adaptive clipping: central-noise-multiplier {noise_multiplier} must be below 2 × the clipped-count "
                f"noise std ({count_stddev:g}), or the update noise would be infinite; raise central-count-stddev "
                f"above {noise_multiplier / 2:g}")
    if epsilon_budget == math.inf:  # no budget (tests of the clipping only): nothing to account for
        return plan
    planned = plan.planned_epsilon()
    if not planned <= epsilon_budget:
        raise ConfigError(
            f"central DP: {rounds} rounds at σ={noise_multiplier}, q={plan.sample_rate:.3f} would spend user-level "
            f"ε={planned:.2f} (δ={delta:.1e}), over the server's budget of {epsilon_budget}; plan fewer rounds, "
            "more noise, or raise central-epsilon")
    return plan


def wrap_strategy(strategy, plan: CentralDPPlan):
    """Flower's clipping DP wrapper around ``strategy`` (no Flower accountant)."""
    from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                         DifferentialPrivacyServerSideFixedClipping)

    if getattr(strategy, "weighted_by_key", UNIT_WEIGHT_KEY) != UNIT_WEIGHT_KEY:
        raise ValueError("central DP needs equal site weights: build FedAvg with weighted_by_key='unit-weight'")
    if plan.clip_at == "site":  # the sites clip (Flower's fixedclipping_mod); the server only adds noise
        return DifferentialPrivacyClientSideFixedClipping(strategy, plan.noise_multiplier, plan.clipping_norm,
                                                          num_sampled_clients=plan.min_clients)
    if plan.clipping == "adaptive":
        return AdaptiveClipping(strategy, plan.noise_multiplier, num_sampled_clients=plan.min_clients,
                                initial_clipping_norm=plan.clipping_norm, target_clipped_quantile=plan.target_quantile,
                                clip_norm_lr=plan.clip_lr, clipped_count_stddev=plan.count_stddev)
    return DifferentialPrivacyServerSideFixedClipping(strategy, plan.noise_multiplier, plan.clipping_norm,
                                                      num_sampled_clients=plan.min_clients)


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with C moving the right way.

    Flower feeds its update the noisy share of *clipped* updates f but keeps the rule written
    for the share of *unclipped* ones, C ← C·exp(−η(f − γ)), so C shrinks when most updates
    are clipped. With f: C ← C·exp(η(f − γ)) (Andrew et al., with b̄ = 1 − f, γ' = 1 − γ).
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


def sites_per_round(clients: int, fraction: float, min_clients: int) -> int:
    """How many sites Flower's FedAvg samples per round (its own rule)."""
    return max(int(clients * fraction), min_clients) if math.isfinite(fraction) else clients
