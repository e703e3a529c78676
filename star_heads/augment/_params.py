"""STAR's 11-D augmentation parameter layout, the pipeline configuration and parameter sampling.

The parameter vector follows the STAR encoding (STAR, arXiv 2510.27222, the 11-D augmentation encoding of its released code): crop top, crop left,
crop height, crop width, horizontal flip {0, 1}, brightness, contrast, saturation and hue factors ((1, 1, 1, 0) when
colour jitter is not applied), grayscale {0, 1} and blur sigma (0 when blur is not applied). STAR writes the crop
box in pixels of the source image; here it is a fraction of the source height/width by default, which transfers
across resolutions, and pixels on request.

Sampling follows torchvision's SimCLR pipeline: ``RandomResizedCrop.get_params`` (10 attempts, then a centre-crop
fallback), flip, ``ColorJitter`` with a per-image random op order, ``RandomGrayscale`` and ``GaussianBlur``.
Everything is drawn from one ``torch.Generator`` so that a seed fixes views and parameters on any device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

from star_heads._checks import check_bool, check_float, check_int, check_probability

__all__ = [
    "PARAM_NAMES",
    "PARAM_DIM",
    "CROP_UNITS",
    "AugmentConfig",
    "AugmentSample",
    "sample_augment",
    "params_to_pixels",
    "pixels_to_params",
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
PARAM_DIM = 11
CROP_UNITS = ("normalized", "pixels")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints, each >= 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
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
        scale: RandomResizedCrop area fraction range.
        ratio: RandomResizedCrop aspect-ratio (width / height) range.
        flip_p: Horizontal-flip probability.
        jitter_p: Probability of colour jitter (the four ops in a random order per image).
        brightness, contrast, saturation: Factor drawn from ``[max(0, 1 - v), 1 + v]``.
        hue: Hue shift drawn from ``[-v, v]`` (fraction of a full turn, torchvision's convention); ``v <= 0.5``.
        grayscale_p: RandomGrayscale probability.
        blur_p: Gaussian-blur probability.
        blur_sigma: Blur sigma range.
        blur_kernel_size: Odd kernel size; None picks SimCLR's rule (10 % of the view side, made odd, at least 3).
        antialias: Antialiased resize when the crop is shrunk (as ``F.interpolate(..., antialias=True)``).
        check_range: Raise when input values leave [0, 1] (one device sync per batch).
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
    antialias: bool = True
    check_range: bool = True

    def __post_init__(self) -> None:
        """Validates every field (TypeError for a wrong type, ValueError for a wrong value; NaN/inf refused)."""
        _pair(self.output_size, "output_size")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            check_probability(getattr(self, name), name)
        for name in ("brightness", "contrast", "saturation", "hue"):
            check_float(getattr(self, name), name, minimum=0.0)
        if self.hue > 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (fraction of a turn), got {self.hue}")
        for name in ("scale", "ratio", "blur_sigma"):
            _range(getattr(self, name), name)
        for name in ("antialias", "check_range"):
            check_bool(getattr(self, name), name)
        if self.scale[1] > 1.0:
            raise ValueError(f"scale must lie in (0, 1], got {self.scale!r}")
        k = self.blur_kernel_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0):
            raise ValueError(f"blur_kernel_size must be a positive odd int or None, got {k!r}")

    @property
    def size(self) -> tuple[int, int]:
        """Output size as ``(h, w)``."""
        return _pair(self.output_size, "output_size")

    @property
    def kernel_size(self) -> int:
        """Blur kernel size actually used."""
        if self.blur_kernel_size is not None:
            return self.blur_kernel_size
        k = int(0.1 * min(self.size))
        return max(3, k + 1 - k % 2)

    @property
    def needs_rgb(self) -> bool:
        """Whether the pipeline needs 3-channel RGB input (saturation, hue or grayscale can fire)."""
        colour = self.jitter_p > 0 and (self.saturation > 0 or self.hue > 0)
        return colour or self.grayscale_p > 0

    def replace(self, **overrides: object) -> AugmentConfig:
        """Returns a copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown AugmentConfig field(s) {unknown}; known: {sorted(known)}")
        return AugmentConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **overrides})


@dataclass(frozen=True)
class AugmentSample:
    """Sampled augmentation of a batch, everything on the CPU (or the generator's device).

    Attributes:
        crop: ``[B, 4]`` int64 crop box ``(top, left, height, width)`` in source pixels.
        flip: ``[B]`` bool.
        jitter: ``[B]`` bool, whether colour jitter was applied.
        factors: ``[B, 4]`` brightness, contrast, saturation, hue; ``(1, 1, 1, 0)`` where ``jitter`` is False.
        order: ``[B, 4]`` int64 permutation of the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue).
        grayscale: ``[B]`` bool.
        sigma: ``[B]`` blur sigma, 0 where blur is not applied.
        image_size: Source ``(H, W)``.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    sigma: torch.Tensor
    image_size: tuple[int, int]

    def vector(self, crop_units: str = "normalized") -> torch.Tensor:
        """The ``[B, 11]`` float32 STAR parameter vector (order: :data:`PARAM_NAMES`)."""
        px = torch.cat(
            [
                self.crop.double(),
                self.flip.double()[:, None],
                self.factors.double(),
                self.grayscale.double()[:, None],
                self.sigma.double()[:, None],
            ],
            dim=1,
        )
        if _check_units(crop_units) == "normalized":
            px = pixels_to_params(px, self.image_size)
        return px.float()


def _check_units(crop_units: str) -> str:
    if crop_units not in CROP_UNITS:
        raise ValueError(f"crop_units must be one of {CROP_UNITS}, got {crop_units!r}")
    return crop_units


def _uniform(n: tuple[int, ...], lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device, dtype=torch.float64)


def sample_augment(
    config: AugmentConfig, batch: int, image_size: tuple[int, int], generator: torch.Generator | None = None
) -> AugmentSample:
    """Draws one augmentation per image of a batch (torchvision's SimCLR sampling, vectorised).

    Args:
        config: Pipeline settings.
        batch: Number of images ``B``.
        image_size: Source ``(H, W)``.
        generator: Random source; None uses torch's global CPU generator.

    Returns:
        An :class:`AugmentSample` on the generator's device (CPU when None).
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    check_int(batch, "batch", minimum=1)
    H, W = _pair(tuple(image_size) if isinstance(image_size, list) else image_size, "image_size")
    dev = generator.device if generator is not None else torch.device("cpu")
    g, B = generator, batch
    # RandomResizedCrop.get_params: 10 attempts, first valid one wins, else centre crop.
    area = H * W * _uniform((B, 10), config.scale[0], config.scale[1], g, dev)
    log_r = _uniform((B, 10), math.log(config.ratio[0]), math.log(config.ratio[1]), g, dev)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    valid = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = valid.long().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    in_ratio = W / H
    if in_ratio < min(config.ratio):
        fw, fh = W, int(round(W / min(config.ratio)))
    elif in_ratio > max(config.ratio):
        fh, fw = H, int(round(H * max(config.ratio)))
    else:
        fw, fh = W, H
    ok = valid.any(dim=1)
    h = torch.where(ok, h, torch.full_like(h, fh))
    w = torch.where(ok, w, torch.full_like(w, fw))
    u = torch.rand((B, 2), generator=g, device=dev, dtype=torch.float64)
    top = torch.minimum((u[:, 0] * (H - h + 1)).floor().long(), H - h)
    left = torch.minimum((u[:, 1] * (W - w + 1)).floor().long(), W - w)
    top = torch.where(ok, top, (H - h) // 2)
    left = torch.where(ok, left, (W - w) // 2)
    crop = torch.stack([top, left, h, w], dim=1)

    flip = torch.rand(B, generator=g, device=dev) < config.flip_p
    jitter = torch.rand(B, generator=g, device=dev) < config.jitter_p
    spans = [(max(0.0, 1 - v), 1 + v) for v in (config.brightness, config.contrast, config.saturation)]
    spans.append((-config.hue, config.hue))
    raw = torch.stack([_uniform((B,), lo, hi, g, dev) for lo, hi in spans], dim=1)
    identity = torch.tensor(_IDENTITY_FACTORS, dtype=torch.float64, device=dev)
    factors = torch.where(jitter[:, None], raw, identity)
    order = torch.rand((B, 4), generator=g, device=dev).argsort(dim=1)
    grayscale = torch.rand(B, generator=g, device=dev) < config.grayscale_p
    blur = torch.rand(B, generator=g, device=dev) < config.blur_p
    sigma = _uniform((B,), config.blur_sigma[0], config.blur_sigma[1], g, dev)
    sigma = torch.where(blur, sigma, torch.zeros_like(sigma))
    return AugmentSample(crop, flip, jitter, factors, order, grayscale, sigma, (H, W))


def _scale_crop(params: torch.Tensor, image_size: int | tuple[int, int], to_pixels: bool) -> torch.Tensor:
    if not isinstance(params, torch.Tensor) or not params.is_floating_point():
        raise TypeError(f"params must be a floating-point tensor, got {type(params).__name__}")
    if params.ndim < 1 or params.shape[-1] != PARAM_DIM:
        raise ValueError(f"params must have shape [..., {PARAM_DIM}], got {tuple(params.shape)}")
    H, W = _pair(image_size, "image_size")
    s = params.new_tensor([H, W, H, W])
    s = s if to_pixels else 1.0 / s
    return torch.cat([params[..., :4] * s, params[..., 4:]], dim=-1)


def params_to_pixels(params: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Converts the crop box of ``[..., 11]`` parameters from fractions of ``(H, W)`` to source pixels."""
    return _scale_crop(params, image_size, to_pixels=True)


def pixels_to_params(params: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Converts the crop box of ``[..., 11]`` parameters from source pixels to fractions of ``(H, W)``."""
    return _scale_crop(params, image_size, to_pixels=False)
