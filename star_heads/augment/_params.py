"""STAR's augmentation parameter layout and the pipeline configuration (:class:`AugmentConfig`).

The parameter vector follows the STAR encoding (STAR, arXiv 2510.27222, the 11-D augmentation encoding of its
released code): crop top, crop left, crop height, crop width, horizontal flip {0, 1}, brightness, contrast,
saturation and hue factors ((1, 1, 1, 0) when colour jitter is not applied), grayscale {0, 1} and blur sigma (0 when
blur is not applied). STAR writes the crop box in pixels of the source image; here it is a fraction of the source
height/width by default, which transfers across resolutions, and pixels on request. An augmentation that can
solarize (BYOL's recipe) appends a 12th entry, ``solarize`` {0, 1}.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Literal

from star_heads._checks import check_bool, check_choice, check_float, check_probability

__all__ = [
    "MAX_STRENGTH",
    "PARAM_DIM",
    "PARAM_NAMES",
    "SOLARIZE_NAME",
    "SOLARIZE_THRESHOLD",
    "AugmentConfig",
    "CropUnits",
    "param_names",
]

PARAM_NAMES: tuple[str, ...] = (
    "crop_top",
    "crop_left",
    "crop_height",
    "crop_width",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
)
PARAM_DIM = len(PARAM_NAMES)
#: Name of the 12th parameter, present when an augmentation can solarize.
SOLARIZE_NAME = "solarize"
#: Units of the crop box in the parameter vector.
CropUnits = Literal["normalized", "pixels"]
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
#: Largest brightness / contrast / saturation strength. A factor of 256 already maps every 8-bit pixel that differs
#: from its reference (0, the mean or the gray value) to 0 or 1; far larger factors overflow float32 to inf and
#: give NaN views (inf * 0).
MAX_STRENGTH = 255.0
#: Solarization inverts pixels ``>= 0.5`` of a [0, 1] image (torchvision's RandomSolarize(0.5), as in BYOL).
SOLARIZE_THRESHOLD = 0.5


def param_names(solarize: bool) -> tuple[str, ...]:
    """The parameter names of an augmentation: :data:`PARAM_NAMES`, plus ``"solarize"`` when it can solarize."""
    return PARAM_NAMES + ((SOLARIZE_NAME,) if solarize else ())


def _pair(value: object, name: str) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints, each >= 1 (TypeError: wrong type, ValueError: wrong value)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{name} must be a positive int or a pair of positive ints (height, width), got "
                        f"{type(value).__name__} {value!r}")
    if len(value) != 2 or not all(v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _range(value: object, name: str) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers with ``0 < low <= high``, named in every error."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {type(value).__name__} {value!r}")
    lo, hi = (check_float(v, f"{name}[{i}]") for i, v in enumerate(value))
    if not (lo > 0 and hi >= lo):
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)!r}")
    return lo, hi


@dataclass(frozen=True)
class AugmentConfig:
    """STAR/SimCLR augmentation pipeline settings (defaults are the paper's, arXiv 2510.27222).

    Attributes:
        output_size: View size ``(h, w)`` (an int means square).
        scale: RandomResizedCrop area fraction range, within (0, 1].
        ratio: RandomResizedCrop aspect-ratio (width / height) range, within [1e-3, 1e3].
        flip_p: Horizontal-flip probability.
        jitter_p: Probability of colour jitter (the four ops in a random order per image).
        brightness, contrast, saturation: Factor drawn from ``[max(0, 1 - v), 1 + v]``, ``v <= MAX_STRENGTH`` (255).
        hue: Hue shift drawn from ``[-v, v]`` (fraction of a full turn, torchvision's convention); ``v <= 0.5``.
        grayscale_p: RandomGrayscale probability.
        blur_p: Gaussian-blur probability.
        blur_sigma: Blur sigma range.
        blur_kernel_size: Odd kernel size; None picks SimCLR's rule (10 % of the view side, made odd, at least 3).
        solarize_p: Solarization probability (pixels ``>= 0.5`` become ``1 - x``; BYOL, arXiv 2006.07733).
        antialias: Antialiased resize when the crop is shrunk (as ``F.interpolate(..., antialias=True)``).
        check_range: Raise when input values leave [0, 1]. A value read (one host-device sync per batch), so off
            by default; ``star_heads.set_value_checks(True)`` turns it on everywhere.
    """

    output_size: int | tuple[int, int] = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_p: float = 0.0
    antialias: bool = True
    check_range: bool = False

    def __post_init__(self) -> None:
        """Validates every field (TypeError for a wrong type, ValueError for a wrong value; NaN/inf refused)."""
        _pair(self.output_size, "output_size")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            check_probability(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation"):
            v = check_float(getattr(self, name), name, minimum=0.0)
            if v > MAX_STRENGTH:
                raise ValueError(f"{name} must be <= {MAX_STRENGTH:g} (a factor of 256 already saturates every 8-bit "
                                 f"pixel; far larger ones overflow float32 and give NaN views), got {v:g}")
        check_float(self.hue, "hue", minimum=0.0, maximum=0.5)
        for name in ("scale", "ratio", "blur_sigma"):
            _range(getattr(self, name), name)
        for name in ("antialias", "check_range"):
            check_bool(getattr(self, name), name)
        if self.scale[1] > 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        if self.ratio[0] < 1e-3 or self.ratio[1] > 1e3:
            raise ValueError(f"ratio must lie in [1e-3, 1e3] (width / height), got {self.ratio!r}")
        k = self.blur_kernel_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral)):
            raise TypeError(f"blur_kernel_size must be a positive odd int or None, got {type(k).__name__} {k!r}")
        if k is not None and (k < 1 or k % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd int or None, got {k!r}")

    @property
    def size(self) -> tuple[int, int]:
        """Output size as ``(h, w)``."""
        return _pair(self.output_size, "output_size")

    @property
    def kernel_size(self) -> int:
        """Blur kernel size actually used."""
        if self.blur_kernel_size is not None:
            return int(self.blur_kernel_size)
        k = int(0.1 * min(self.size))
        return max(3, k + 1 - k % 2)

    @property
    def needs_rgb(self) -> bool:
        """Whether the pipeline needs 3-channel RGB input (saturation, hue or grayscale can fire)."""
        colour = self.jitter_p > 0 and (self.saturation > 0 or self.hue > 0)
        return colour or self.grayscale_p > 0

    @property
    def jitter_ops(self) -> tuple[int, ...]:
        """The jitter ops that can change an image (0 brightness, 1 contrast, 2 saturation, 3 hue): those with a
        non-zero strength, none when ``jitter_p`` is 0. The others are skipped when the views are made."""
        if self.jitter_p == 0:
            return ()
        return tuple(i for i, name in enumerate(JITTER_OPS) if getattr(self, name) > 0)

    def replace(self, **overrides: object) -> AugmentConfig:
        """Returns a copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown AugmentConfig field(s) {unknown}; known: {sorted(known)}")
        return AugmentConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **overrides})

    def check_fits(self, what: str = "config") -> None:
        """Raises ValueError when the blur kernel cannot be reflect-padded in a view of this size."""
        k, side = self.kernel_size, min(self.size)
        if self.blur_p > 0 and k // 2 >= side:
            raise ValueError(f"{what}: blur_kernel_size {k} is too large for a {side}-pixel view "
                             f"(need kernel_size // 2 < {side})")


def check_units(crop_units: object) -> CropUnits:
    """``crop_units`` as one of :data:`CropUnits` (TypeError / ValueError otherwise)."""
    return check_choice(crop_units, "crop_units", CropUnits)
