"""star-heads: STAR projection heads for joint invariant/equivariant self-supervised learning.

STAR (Soft Task-Aware Routing of experts, NeurIPS 2025) replaces the separate invariant and equivariant
projection heads of a joint SSL trainer with a bank of shared MLP experts and one soft router per task.
"""

from star_heads._value_checks import set_value_checks, value_checks
from star_heads._version import __version__
from star_heads.adapters import AdapterOutput, EquiModAdapter, JointAdapter, SimCLRAdapter, VICRegAdapter, build_head
from star_heads.augment import PARAM_DIM, PARAM_NAMES, AugmentConfig, STARAugment, params_to_pixels, pixels_to_params
from star_heads.baselines import SeparateHeads, SharedSpecificHead
from star_heads.equivariance import STL10_PARAM_MEAN, STL10_PARAM_STD, AugParamNormalizer, EquivariantPredictor
from star_heads.experts import ExpertBank
from star_heads.heads import (
    HeadOutput,
    MMoEHead,
    STARHead,
    STARSimCLRProjectionHead,
    STARVICRegProjectionHead,
    TaskHead,
)
from star_heads.losses import (
    EquivariantNTXentLoss,
    NTXentLoss,
    VICRegLoss,
    VICRegOutput,
    equivariant_nt_xent,
    nt_xent,
    vicreg,
)
from star_heads.metrics import (
    AugmentationR2,
    CCAMeter,
    CCAMonitor,
    CCAResult,
    augmentation_r2,
    canonical_correlations,
    mean_canonical_correlation,
)
from star_heads.optim import param_groups
from star_heads.routing import ROUTER_INITS, RoutingStats, SoftRouter, routing_stats
from star_heads.sizing import count_parameters, linear_macs

__all__ = [
    "set_value_checks",
    "value_checks",
    "__version__",
    # heads and their parts
    "ExpertBank",
    "SoftRouter",
    "ROUTER_INITS",
    "MMoEHead",
    "STARHead",
    "STARSimCLRProjectionHead",
    "STARVICRegProjectionHead",
    "SeparateHeads",
    "SharedSpecificHead",
    "TaskHead",
    "HeadOutput",
    "routing_stats",
    "RoutingStats",
    "param_groups",
    "count_parameters",
    "linear_macs",
    # losses
    "nt_xent",
    "equivariant_nt_xent",
    "vicreg",
    "NTXentLoss",
    "EquivariantNTXentLoss",
    "VICRegLoss",
    "VICRegOutput",
    # adapters
    "SimCLRAdapter",
    "VICRegAdapter",
    "EquiModAdapter",
    "JointAdapter",
    "AdapterOutput",
    "build_head",
    # redundancy metric
    "canonical_correlations",
    "mean_canonical_correlation",
    "CCAMeter",
    "CCAResult",
    "CCAMonitor",
    "augmentation_r2",
    "AugmentationR2",
    # augmentation (kornia is imported only when STARAugment is built)
    "STARAugment",
    "AugmentConfig",
    "PARAM_NAMES",
    "PARAM_DIM",
    "params_to_pixels",
    "pixels_to_params",
    # equivariance
    "AugParamNormalizer",
    "EquivariantPredictor",
    "STL10_PARAM_MEAN",
    "STL10_PARAM_STD",
]
