"""Batched SimCLR/STAR augmentation that returns each view and its STAR parameter vector (11-D, 12-D with
solarization): per-view settings (BYOL), multi-crop, sync-free on the images' device.

Optional extra: ``pip install "star-heads[augment]"`` (kornia). This package imports without kornia; building a
:class:`STARAugment` raises an ImportError naming the extra when kornia is missing. See docs/augment.md.
"""

from star_heads.augment._module import STARAugment
from star_heads.augment._multicrop import MultiCropViews
from star_heads.augment._ops import crop_resize, gaussian_blur
from star_heads.augment._params import (
    MAX_STRENGTH,
    PARAM_DIM,
    PARAM_NAMES,
    SOLARIZE_NAME,
    AugmentConfig,
    CropUnits,
    param_names,
)
from star_heads.augment._sample import AugmentSample, params_to_pixels, pixels_to_params, sample_augment

__all__ = [
    "PARAM_NAMES",
    "PARAM_DIM",
    "SOLARIZE_NAME",
    "MAX_STRENGTH",
    "CropUnits",
    "AugmentConfig",
    "AugmentSample",
    "MultiCropViews",
    "STARAugment",
    "sample_augment",
    "param_names",
    "crop_resize",
    "gaussian_blur",
    "params_to_pixels",
    "pixels_to_params",
]
