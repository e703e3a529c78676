"""One draw of the augmentation of a batch (:class:`AugmentSample`) and its sampling (:func:`sample_augment`).

Sampling follows torchvision's SimCLR pipeline: ``RandomResizedCrop.get_params`` (10 attempts, then a centre-crop
fallback), flip, ``ColorJitter`` with a per-image random op order, ``RandomGrayscale``, ``GaussianBlur`` and
``RandomSolarize``. Everything is drawn from one ``torch.Generator`` on the generator's device with tensor ops only
(no host read), so a seed fixes views and parameters, and drawing on a GPU never waits for it.

Axis legend: B batch; packed layout (17 float64 columns): crop 4, flip, jitter, factors 4, order 4, grayscale,
sigma, solarize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from star_heads._checks import check_int
from star_heads._value_checks import value_checks_enabled
from star_heads.augment._params import (
    PARAM_DIM,
    AugmentConfig,
    CropUnits,
    _pair,
    check_units,
)

__all__ = ["AugmentSample", "sample_augment", "check_generator", "params_to_pixels", "pixels_to_params"]

_PACKED = 17


def check_generator(generator: object) -> torch.Generator | None:
    """``generator`` if it is a ``torch.Generator`` or None (TypeError otherwise)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")
    return generator


@dataclass(frozen=True)
class AugmentSample:
    """The augmentation drawn for a batch, everything on one device, and the config it was drawn with.

    The views are a function of the images and the sample alone: :meth:`STARAugment.replay` re-applies it with
    ``config``'s view size, interpolation, blur kernel and set of jitter ops, so a replay reproduces the views exactly
    whichever augment replays it.

    Attributes:
        crop: ``[B, 4]`` int64 crop box ``(top, left, height, width)`` in source pixels.
        flip: ``[B]`` bool.
        jitter: ``[B]`` bool, whether colour jitter was applied.
        factors: ``[B, 4]`` float brightness, contrast, saturation, hue; ``(1, 1, 1, 0)`` where ``jitter`` is False.
        order: ``[B, 4]`` int64 permutation of the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue).
        grayscale: ``[B]`` bool.
        sigma: ``[B]`` float blur sigma, 0 where blur is not applied.
        image_size: Source ``(H, W)``.
        solarize: ``[B]`` bool.
        config: The settings the sample was drawn with (and is applied with).
    """

    crop: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    sigma: torch.Tensor
    image_size: tuple[int, int]
    solarize: torch.Tensor
    config: AugmentConfig

    @property
    def batch_size(self) -> int:
        """Number of images ``B``."""
        return int(self.crop.shape[0])

    @property
    def device(self) -> torch.device:
        """The device of the sample's tensors."""
        return self.crop.device

    def vector(self, crop_units: CropUnits = "normalized", *, solarize: bool | None = None) -> torch.Tensor:
        """The ``[B, 11]`` float32 STAR parameter vector (order: :data:`PARAM_NAMES`), ``[B, 12]`` with the
        solarize flag appended when ``solarize`` (default: when ``config.solarize_p > 0``)."""
        crop_units = check_units(crop_units)
        with_solarize = self.config.solarize_p > 0 if solarize is None else bool(solarize)
        cols = [
            self.crop.double(),
            self.flip.double()[:, None],
            self.factors.double(),
            self.grayscale.double()[:, None],
            self.sigma.double()[:, None],
        ]
        if with_solarize:
            cols.append(self.solarize.double()[:, None])
        px = torch.cat(cols, dim=1)
        if crop_units == "normalized":
            px = pixels_to_params(px, self.image_size)
        return px.float()

    def pack(self) -> torch.Tensor:
        """All tensors in one ``[B, 17]`` float64 tensor (exact: integers and flags are small)."""
        cols = [self.crop, self.flip[:, None], self.jitter[:, None], self.factors, self.order,
                self.grayscale[:, None], self.sigma[:, None], self.solarize[:, None]]
        return torch.cat([c.double() for c in cols], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, image_size: tuple[int, int], config: AugmentConfig) -> AugmentSample:
        """Inverse of :meth:`pack`."""
        c = packed
        return cls(crop=c[:, 0:4].round().long(), flip=c[:, 4] > 0.5, jitter=c[:, 5] > 0.5, factors=c[:, 6:10],
                   order=c[:, 10:14].round().long(), grayscale=c[:, 14] > 0.5, sigma=c[:, 15], image_size=image_size,
                   solarize=c[:, 16] > 0.5, config=config)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> AugmentSample:
        """The sample on ``device``, moved as one packed tensor (one transfer)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return AugmentSample.unpack(self.pack().to(device, non_blocking=non_blocking), self.image_size, self.config)

    def validate(self, *, values: bool | None = None) -> AugmentSample:
        """Checks types, shapes and devices (Python values only, always) and, when ``values``, the crop boxes
        (inside the image, positive size), the op orders and finite, non-negative sigmas and factors.

        ``values=None`` reads the values when they are on the CPU (no device sync) or when value checks are on
        (``star_heads.set_value_checks``); reading a GPU sample's values is a host sync.
        """
        if not isinstance(self.config, AugmentConfig):
            raise TypeError(f"sample.config must be an AugmentConfig, got {type(self.config).__name__}")
        H, W = _pair(self.image_size, "sample.image_size")
        if not isinstance(self.crop, torch.Tensor) or self.crop.ndim != 2 or self.crop.shape[1] != 4:
            raise ValueError(f"sample.crop must be a [B, 4] tensor, got {_describe(self.crop)}")
        B = self.batch_size
        spec = {"crop": ((B, 4), "int"), "flip": ((B,), "bool"), "jitter": ((B,), "bool"),
                "factors": ((B, 4), "float"), "order": ((B, 4), "int"), "grayscale": ((B,), "bool"),
                "sigma": ((B,), "float"), "solarize": ((B,), "bool")}
        for name, (shape, kind) in spec.items():
            t = getattr(self, name)
            ok_kind = isinstance(t, torch.Tensor) and {
                "int": t.dtype == torch.int64, "bool": t.dtype == torch.bool, "float": t.is_floating_point()}[kind]
            if not ok_kind:
                raise TypeError(f"sample.{name} must be a {kind} tensor of shape {list(shape)}, got {_describe(t)}")
            if tuple(t.shape) != shape:
                raise ValueError(f"sample.{name} must have shape {list(shape)} (B = {B}), got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"sample.{name} is on {t.device}, sample.crop on {self.device}: one device expected")
        if values is None:
            values = self.device.type == "cpu" or value_checks_enabled()
        if values:
            self._check_values(H, W)
        return self

    def _check_values(self, H: int, W: int) -> None:
        top, left, h, w = self.crop.unbind(1)
        inside = (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= H) & (left + w <= W)
        if not bool(inside.all()):
            i = int((~inside).long().argmax())
            raise ValueError(f"sample.crop[{i}] = {self.crop[i].tolist()} (top, left, height, width) is not a box of "
                             f"positive size inside the {H}x{W} image")
        perm = self.order.sort(dim=1).values == torch.arange(4, device=self.device)
        if not bool(perm.all()):
            raise ValueError("sample.order rows must be permutations of (0, 1, 2, 3)")
        if not bool(torch.isfinite(self.sigma).all() & (self.sigma >= 0).all() & torch.isfinite(self.factors).all()):
            raise ValueError("sample.sigma must be finite and >= 0, and sample.factors finite")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"dtype {t.dtype} shape {tuple(t.shape)}"
    return f"{type(t).__name__}"


def _uniform(n: tuple[int, ...], lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device, dtype=torch.float64)


def sample_augment(
    config: AugmentConfig,
    batch: int,
    image_size: tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> AugmentSample:
    """Draws one augmentation per image of a batch (torchvision's SimCLR sampling, vectorised, no host read).

    Args:
        config: Pipeline settings.
        batch: Number of images ``B``.
        image_size: Source ``(H, W)``.
        generator: Random source; None uses torch's default generator of ``device``.
        device: Where to draw when ``generator`` is None (default CPU); ignored otherwise.

    Returns:
        An :class:`AugmentSample` on the generator's device (``device`` when None).
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    check_int(batch, "batch", minimum=1)
    H, W = _pair(tuple(image_size) if isinstance(image_size, (list, torch.Size)) else image_size, "image_size")
    g = check_generator(generator)
    dev = g.device if g is not None else torch.device(device if device is not None else "cpu")
    B = batch
    # RandomResizedCrop.get_params: 10 attempts, first valid one wins, else centre crop (validity tested in float64,
    # before any integer conversion).
    area = H * W * _uniform((B, 10), config.scale[0], config.scale[1], g, dev)
    log_r = _uniform((B, 10), math.log(config.ratio[0]), math.log(config.ratio[1]), g, dev)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
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
    fh, fw = min(max(fh, 1), H), min(max(fw, 1), W)
    ok = valid.any(dim=1)
    h = torch.where(ok, h, float(fh)).long()
    w = torch.where(ok, w, float(fw)).long()
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
    identity = torch.cat([raw.new_ones(3), raw.new_zeros(1)])
    factors = torch.where(jitter[:, None], raw, identity)
    order = torch.rand((B, 4), generator=g, device=dev).argsort(dim=1)
    grayscale = torch.rand(B, generator=g, device=dev) < config.grayscale_p
    blur = torch.rand(B, generator=g, device=dev) < config.blur_p
    sigma = _uniform((B,), config.blur_sigma[0], config.blur_sigma[1], g, dev)
    sigma = torch.where(blur, sigma, torch.zeros_like(sigma))
    solarize = torch.rand(B, generator=g, device=dev) < config.solarize_p
    return AugmentSample(crop, flip, jitter, factors, order, grayscale, sigma, (H, W), solarize, config)


def _scale_crop(params: torch.Tensor, image_size: int | tuple[int, int], to_pixels: bool) -> torch.Tensor:
    if not isinstance(params, torch.Tensor) or not params.is_floating_point():
        what = f"dtype {params.dtype}" if isinstance(params, torch.Tensor) else type(params).__name__
        raise TypeError(f"params must be a floating-point tensor, got {what}")
    if params.ndim < 1 or params.shape[-1] not in (PARAM_DIM, PARAM_DIM + 1):
        raise ValueError(f"params must have shape [..., {PARAM_DIM}] or [..., {PARAM_DIM + 1}] (with solarize), "
                         f"got {tuple(params.shape)}")
    H, W = _pair(image_size, "image_size")
    sh, sw = (float(H), float(W)) if to_pixels else (1.0 / H, 1.0 / W)
    box = params[..., :4]
    scaled = torch.stack([box[..., 0] * sh, box[..., 1] * sw, box[..., 2] * sh, box[..., 3] * sw], dim=-1)
    return torch.cat([scaled, params[..., 4:]], dim=-1)


def params_to_pixels(params: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Converts the crop box of ``[..., 11]`` (or ``[..., 12]``) parameters from fractions of ``(H, W)`` to pixels."""
    return _scale_crop(params, image_size, to_pixels=True)


def pixels_to_params(params: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """Converts the crop box of ``[..., 11]`` (or ``[..., 12]``) parameters from pixels to fractions of ``(H, W)``."""
    return _scale_crop(params, image_size, to_pixels=False)
