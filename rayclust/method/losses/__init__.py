"""One loss per module (lightly's shape): each docstring names the source, equation and shapes."""

from rayclust.method.losses.centre_consistency import CentreConsistencyLoss
from rayclust.method.losses.cluster_contrastive import ClusterContrastiveLoss
from rayclust.method.losses.dynamic_balance import DynamicBalanceRegulariser
from rayclust.method.losses.infonce import SymmetricInfoNCE, info_nce
from rayclust.method.losses.instance_consistency import InstanceConsistencyLoss
from rayclust.method.losses.marginal_entropy import marginal_entropy
from rayclust.method.losses.relational_consistency import relational_consistency

__all__ = [
    "CentreConsistencyLoss", "ClusterContrastiveLoss", "DynamicBalanceRegulariser",
    "InstanceConsistencyLoss", "SymmetricInfoNCE", "info_nce", "marginal_entropy",
    "relational_consistency",
]
