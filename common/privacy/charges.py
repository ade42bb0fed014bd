"""The mechanisms a ledger records: one typed charge per kind of mechanism run on private data.

Each charge names its ``mechanism`` (the ledger entry's ``mechanism`` field), carries its own
``params`` (the entry's ``params``, exactly the constructor's keyword arguments) and says how an
accountant composes it (:meth:`events`: ``(event, count)`` pairs of
:mod:`common.privacy.accounting`). All guarantees are record-level, with respect to adding or
removing one record (the convention of opacus's and dp-accounting's Poisson subsampling).

* :class:`DPSGDCharge`: ``steps`` Poisson-subsampled Gaussian steps (DP-SGD; one round of
  user-level central DP is a step at q = sites per round / sites).
* :class:`GaussianCharge`: ``count`` releases of the Gaussian mechanism, noise std
  σ·sensitivity (e.g. a DP label histogram: L2 sensitivity 1 under add/remove).
* :class:`LaplaceCharge`: ``count`` releases of the Laplace mechanism, noise scale ``scale``
  for a query of L1 ``sensitivity`` (ε = sensitivity / scale each).
* :class:`PureEpsilonCharge`: one pass of an ε-DP mechanism over disjoint records, e.g. the
  token-level exponential mechanism on prompts. A record whose k tokens are each perturbed
  at ε_token spends ε_token·k (sequential composition over its tokens); different records
  are disjoint parts of the data set, so they compose in parallel: the pass costs every
  record at most the largest per-record ε, and that maximum is what is charged
  (``epsilon_per_record``; :meth:`PureEpsilonCharge.from_tokens` computes it).
  ``records`` is recorded for the reader and does not change the charge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar, Iterable

from common.errors import ConfigError
from common.privacy.accounting import (
    LAPLACE,
    PURE_EPSILON,
    _check_noise_multiplier,
    _check_sample_rate,
    _check_steps,
    subsampled_gaussian,
)


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _positive(value, name: str) -> None:
    if not _is_real(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid: it must be a finite number > 0.")


def _count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid: it must be a whole number ≥ 1.")


class _Charge:
    """Shared (de)serialisation: ``params`` are the dataclass fields, by name."""

    mechanism: ClassVar[str]
    _fields: ClassVar[tuple[str, ...]]

    def params(self) -> dict[str, Any]:
        return {name: int(getattr(self, name)) if name in _WHOLE else float(getattr(self, name))
                for name in self._fields}

    @classmethod
    def from_params(cls, params: dict[str, Any]):
        if set(params) != set(cls._fields):
            raise ValueError(f"params must have exactly the keys {sorted(cls._fields)}")
        return cls(**params)

    def events(self) -> list[tuple[tuple, int]]:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


_WHOLE = frozenset({"steps", "count", "records"})  # whole-number params; every other one is a float


@dataclass(frozen=True)
class DPSGDCharge(_Charge):
    """A DP-SGD run: ``steps`` Poisson-subsampled Gaussian steps at (σ, q), clipped to C."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    mechanism: ClassVar[str] = "dp-sgd"
    _fields: ClassVar[tuple[str, ...]] = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm")

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_steps(self.steps)
        _positive(self.max_grad_norm, "max_grad_norm")

    def events(self) -> list[tuple[tuple, int]]:
        return [(subsampled_gaussian(self.noise_multiplier, self.sample_rate), int(self.steps))]

    def accountant_history(self) -> list[tuple[float, float, int]]:
        """This charge as opacus accountant history: ``[(σ, q, steps)]``."""
        return [(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))]


@dataclass(frozen=True)
class GaussianCharge(_Charge):
    """``count`` Gaussian-mechanism releases, noise std σ·sensitivity (L2 sensitivity).

    σ (``noise_multiplier``) is the noise std as a multiple of the sensitivity, so the
    privacy cost depends on σ alone; ``sensitivity`` is recorded to say what the noise was.
    """

    noise_multiplier: float
    sensitivity: float = 1.0
    count: int = 1
    mechanism: ClassVar[str] = "gaussian"
    _fields: ClassVar[tuple[str, ...]] = ("noise_multiplier", "sensitivity", "count")

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _positive(self.sensitivity, "sensitivity")
        _count(self.count, "count")

    def events(self) -> list[tuple[tuple, int]]:
        return [(subsampled_gaussian(self.noise_multiplier, 1.0), int(self.count))]


@dataclass(frozen=True)
class LaplaceCharge(_Charge):
    """``count`` Laplace-mechanism releases at noise scale ``scale`` (L1 ``sensitivity``)."""

    scale: float
    sensitivity: float = 1.0
    count: int = 1
    mechanism: ClassVar[str] = "laplace"
    _fields: ClassVar[tuple[str, ...]] = ("scale", "sensitivity", "count")

    def __post_init__(self) -> None:
        _positive(self.scale, "scale")
        _positive(self.sensitivity, "sensitivity")
        _count(self.count, "count")

    @property
    def epsilon(self) -> float:
        """ε of one release (pure DP): sensitivity / scale."""
        return float(self.sensitivity) / float(self.scale)

    def events(self) -> list[tuple[tuple, int]]:
        return [((LAPLACE, float(self.scale) / float(self.sensitivity)), int(self.count))]


@dataclass(frozen=True)
class PureEpsilonCharge(_Charge):
    """One ε-DP pass over disjoint records: charged the largest per-record ε (parallel composition)."""

    epsilon_per_record: float
    records: int = 1
    mechanism: ClassVar[str] = "pure-epsilon"
    _fields: ClassVar[tuple[str, ...]] = ("epsilon_per_record", "records")

    def __post_init__(self) -> None:
        _positive(self.epsilon_per_record, "epsilon_per_record")
        _count(self.records, "records")

    @classmethod
    def from_tokens(cls, epsilon_per_token: float, tokens_perturbed: Iterable[int]) -> "PureEpsilonCharge":
        """The charge of perturbing ``tokens_perturbed[i]`` tokens of record i at ``epsilon_per_token``.

        Per record: ε_token × its perturbed tokens (sequential); across records: the maximum
        (parallel, the records are disjoint). Records with no perturbed token cost nothing.
        """
        _positive(epsilon_per_token, "epsilon_per_token")
        counts = list(tokens_perturbed)
        for k in counts:
            if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
                raise ConfigError(f"tokens perturbed per record must be whole numbers ≥ 0, got {k!r}.")
        if not counts or max(counts) == 0:
            raise ConfigError("no token was perturbed: there is nothing to charge (and nothing to release).")
        return cls(float(epsilon_per_token) * max(counts), len(counts))

    def events(self) -> list[tuple[tuple, int]]:
        return [((PURE_EPSILON, float(self.epsilon_per_record)), 1)]


# mechanism name -> charge type. A new mechanism adds its class here; it must provide
# ``mechanism``, ``params()``, ``from_params()`` and ``events()``.
CHARGE_TYPES: dict[str, type] = {
    t.mechanism: t for t in (DPSGDCharge, GaussianCharge, LaplaceCharge, PureEpsilonCharge)
}
