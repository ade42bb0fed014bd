"""Differential-privacy accounting for privdistill.

``accounting``: calibrate noise and compute ε with opacus's accountants (no analysis of our own).
``ledger``: the per-client privacy ledger file, the record every mechanism run is charged to.
"""

from common.privacy.accounting import ACCOUNTANTS, calibrate_noise, default_delta, epsilon_of
from common.privacy.ledger import DPSGDCharge, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "DPSGDCharge",
    "PrivacyLedger",
    "calibrate_noise",
    "default_delta",
    "epsilon_of",
]
