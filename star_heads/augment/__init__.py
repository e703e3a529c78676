"""Batched SimCLR/STAR augmentation that returns each view and its 11-D STAR parameter vector.

Optional extra: ``pip install "star-heads[augment]"`` (kornia). This package imports without kornia; building a
:class:`STARAugment` raises an ImportError naming the extra when kornia is missing. See docs/augment.md.
"""

from star_heads.augment._module import STARAugment
from star_heads.augment._ops import crop_resize
from star_heads.augment._params import (
    CROP_UNITS,
    PARAM_DIM,
    PARAM_NAMES,
    AugmentConfig,
    AugmentSample,
    params_to_pixels,
    pixels_to_params,
    sample_augment,
)

__all__ = [
    "PARAM_NAMES",
    "PARAM_DIM",
    "CROP_UNITS",
    "AugmentConfig",
    "AugmentSample",
    "STARAugment",
    "sample_augment",
    "crop_resize",
    "params_to_pixels",
    "pixels_to_params",
]
