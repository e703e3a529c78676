"""Redundancy metrics (canonical correlation analysis between two embeddings of the same samples), an equivariance
readout (held-out R² of the relative augmentation parameters) and collapse readouts."""

from star_heads.metrics.cca import canonical_correlations, mean_canonical_correlation, pwcca, svcca
from star_heads.metrics.collapse import CollapseStats, collapse_stats, effective_rank, embedding_std
from star_heads.metrics.equivariance import AugmentationR2, augmentation_r2, parameter_groups
from star_heads.metrics.meter import CCAMeter, CCAResult
from star_heads.metrics.monitor import CCAMonitor
from star_heads.metrics.null import null_mean_canonical_correlation
from star_heads.metrics.statistics import CCAStatistics
from star_heads.metrics.validation import DEFAULT_RANK_TOL, CCASampleSizeWarning, check_views

__all__ = [
    "AugmentationR2",
    "DEFAULT_RANK_TOL",
    "CCAMeter",
    "CCAMonitor",
    "CCAResult",
    "CCASampleSizeWarning",
    "CCAStatistics",
    "CollapseStats",
    "collapse_stats",
    "effective_rank",
    "embedding_std",
    "canonical_correlations",
    "check_views",
    "augmentation_r2",
    "mean_canonical_correlation",
    "null_mean_canonical_correlation",
    "parameter_groups",
    "pwcca",
    "svcca",
]
