"""Equivariant predictors and the augmentation-parameter normaliser."""

from star_heads.equivariance.normalizer import (
    STL10_PARAM_MEAN,
    STL10_PARAM_STD,
    AugParamNormalizer,
)
from star_heads.equivariance.predictor import EquivariantPredictor

__all__ = ["STL10_PARAM_MEAN", "STL10_PARAM_STD", "AugParamNormalizer", "EquivariantPredictor"]
