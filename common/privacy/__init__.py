"""Differential-privacy accounting for privdistill.

``accounting``: calibrate noise and compute ε with opacus's and dp-accounting's accountants
(no analysis of our own); ``charges``: the typed mechanism events a ledger records;
``ledger``: the per-client privacy ledger file, the record every mechanism run is charged to
(check-and-reserve under a file lock); ``verify``: an independent re-check of a ledger file.
"""

from common.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    UnsupportedMechanism,
    calibrate_noise,
    default_delta,
    epsilon_of,
    epsilon_of_events,
)
from common.privacy.charges import DPSGDCharge, GaussianCharge, LaplaceCharge, PureEpsilonCharge
from common.privacy.ledger import PrivacyLedger, Reservation, epsilon_by_accountant

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "DPSGDCharge",
    "GaussianCharge",
    "LaplaceCharge",
    "PrivacyLedger",
    "PureEpsilonCharge",
    "Reservation",
    "UnsupportedMechanism",
    "calibrate_noise",
    "default_delta",
    "epsilon_by_accountant",
    "epsilon_of",
    "epsilon_of_events",
]
