"""Knowledge-distillation losses: teacher soft targets, the DistilDP KD loss, hidden-state
alignment, and the generalised JSD of GKD / DP-OPD. See ``common.distill.losses``."""

from common.distill.losses import (
    HiddenProjector,
    KDLoss,
    SoftTargets,
    generalized_jsd,
    generalized_jsd_per_example,
    kd_loss,
    soft_targets,
    uniform_layer_map,
)

__all__ = [
    "HiddenProjector",
    "KDLoss",
    "SoftTargets",
    "generalized_jsd",
    "generalized_jsd_per_example",
    "kd_loss",
    "soft_targets",
    "uniform_layer_map",
]
