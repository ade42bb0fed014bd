"""DP-SGD wiring: plan the noise for a whole run, and hand a LoRA model to opacus.

Everything that decides how much privacy a client spends is here and in ``accounting.py``:
the sample rate (Poisson, exactly opacus's), the noise multiplier (calibrated once for all
planned rounds × local steps, never per round), and the clipping norm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch.utils.data import DataLoader, Dataset

from common.errors import ConfigError
from common.privacy.accounting import DEFAULT_ACCOUNTANT, calibrate_noise, default_delta, epsilon_of


def sample_rate_for(n_records: int, batch_size: int) -> float:
    """Poisson sample rate opacus uses for a loader of ``batch_size`` over ``n_records``."""
    if n_records < 1:
        raise ConfigError("DP-SGD needs at least one training record")
    if batch_size < 1:
        raise ConfigError(f"batch size must be ≥ 1, got {batch_size}")
    return 1.0 / math.ceil(n_records / batch_size)


@dataclass(frozen=True)
class DPSGDPlan:
    """The noise and sampling of a whole planned run (all rounds) for one client."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    def planned_epsilon(self) -> float:
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.total_steps)], self.delta, self.accountant)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_dp_sgd(n_records: int, batch_size: int, steps_per_round: int, rounds: int, target_epsilon: float,
                delta: float | None = None, max_grad_norm: float = 1.0,
                accountant: str = DEFAULT_ACCOUNTANT) -> DPSGDPlan:
    """Calibrate σ so that ``rounds × steps_per_round`` Poisson steps spend ``target_epsilon``."""
    if steps_per_round < 1 or rounds < 1:
        raise ConfigError(f"steps per round and rounds must be ≥ 1, got {steps_per_round} and {rounds}")
    if max_grad_norm <= 0:
        raise ConfigError(f"clipping norm must be > 0, got {max_grad_norm}")
    delta = default_delta(n_records) if delta is None else delta
    if delta > 1.0 / n_records:
        raise ConfigError(f"δ={delta:g} is above 1/n={1 / n_records:g} for {n_records} records; use a smaller δ")
    sample_rate = sample_rate_for(n_records, batch_size)
    sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps_per_round * rounds, accountant)
    return DPSGDPlan(target_epsilon, delta, sigma, sample_rate, steps_per_round, rounds, max_grad_norm, accountant)


def make_private(model, optimizer, dataset: Dataset, batch_size: int, plan: DPSGDPlan):
    """Wrap model/optimizer/loader with opacus: per-sample clipping of the trainable (LoRA)
    parameters, Gaussian noise σ·C, Poisson sampling at ``plan.sample_rate``."""
    from opacus import PrivacyEngine  # lazy: importing opacus costs seconds in every evaluate process

    # The engine's own accountant only logs steps; the ledger (plan.accountant) does the
    # accounting. opacus knows "rdp" and "prv", not dp-accounting's "pld".
    engine = PrivacyEngine(accountant=plan.accountant if plan.accountant in ("rdp", "prv") else "rdp")
    loader = DataLoader(dataset, batch_size=batch_size)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
    )
    if not math.isclose(loader.sample_rate, plan.sample_rate, rel_tol=1e-9):
        raise RuntimeError(f"opacus sample rate {loader.sample_rate} differs from the planned {plan.sample_rate}")
    return engine, model, optimizer, loader
