"""``STARAugment``: the SimCLR/STAR view generator that also returns each view's 11-D parameter vector."""

from __future__ import annotations

import torch
from torch import nn

from star_heads._checks import check_float_tensor, check_int
from star_heads.augment._ops import apply_augment, crop_resize, require_kornia
from star_heads.augment._params import (
    PARAM_DIM,
    AugmentConfig,
    AugmentSample,
    _check_units,
    _pair,
    sample_augment,
)

__all__ = ["STARAugment"]


class STARAugment(nn.Module):
    """Batched, device-side SimCLR/STAR augmentation returning views and their STAR parameters.

    Example:
        >>> aug = STARAugment(32)
        >>> g = torch.Generator().manual_seed(0)
        >>> views, params = aug(torch.rand(8, 3, 48, 48), generator=g)   # [8, 3, 32, 32], [8, 11]

    Args:
        output_size: View size (int or ``(h, w)``); overrides ``config.output_size``.
        config: Pipeline settings (default: :class:`AugmentConfig`, the paper's values).
        crop_units: ``"normalized"`` (crop box as fractions of the source ``H``/``W``, default) or ``"pixels"``
            (source pixels, STAR's original encoding).
        **overrides: Any :class:`AugmentConfig` field, e.g. ``blur_p=0.0``.

    Input: ``[B, C, H, W]`` floating point in [0, 1]. ``C`` must be 3 when saturation, hue or grayscale can fire
    (the defaults); otherwise any ``C``. Values outside [0, 1] raise ValueError when ``check_range`` (default).
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        config: AugmentConfig | None = None,
        *,
        crop_units: str = "normalized",
        **overrides: object,
    ) -> None:
        super().__init__()
        require_kornia()
        if config is not None and not isinstance(config, AugmentConfig):
            raise TypeError(f"config must be an AugmentConfig or None, got {type(config).__name__}")
        _pair(output_size, "output_size")
        self.config = (config or AugmentConfig()).replace(output_size=output_size, **overrides)
        self.crop_units = _check_units(crop_units)
        k, side = self.config.kernel_size, min(self.config.size)
        if self.config.blur_p > 0 and k // 2 >= side:
            raise ValueError(f"blur_kernel_size {k} is too large for a {side}-pixel view (need kernel_size // 2 < {side})")

    def extra_repr(self) -> str:
        return f"output_size={self.config.size}, crop_units={self.crop_units!r}"

    def _check(self, images: object, *, rgb: bool = True) -> torch.Tensor:
        x = check_float_tensor(images, "images", ndim=4)
        if x.shape[0] == 0:
            raise ValueError("images must hold at least one image, got batch size 0")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"images must be at least 1x1 pixels, got shape {tuple(x.shape)}")
        if rgb and self.config.needs_rgb and x.shape[1] != 3:
            raise ValueError(
                f"images must have 3 (RGB) channels for colour jitter/grayscale, got {x.shape[1]} "
                "(replicate channels, or pass saturation=0, hue=0, grayscale_p=0)"
            )
        if self.config.check_range:
            lo, hi = torch.aminmax(x.detach())
            lo, hi = float(lo), float(hi)
            if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons, so NaN images are refused too
                raise ValueError(f"images must lie in [0, 1] (before normalisation), got range [{lo:.4g}, {hi:.4g}]")
        return x

    def sample(
        self, batch: int, image_size: tuple[int, int], generator: torch.Generator | None = None
    ) -> AugmentSample:
        """Draws the augmentation of a batch without applying it (see :func:`sample_augment`)."""
        return sample_augment(self.config, batch, image_size, generator)

    def apply(self, fn_or_images, sample: AugmentSample | None = None):  # type: ignore[override]
        """``apply(fn)`` is :meth:`torch.nn.Module.apply` (so ``model.apply(init_fn)`` and Lightning still walk a
        model holding this module); ``apply(images, sample)`` is kept as an alias of :meth:`replay`."""
        if sample is None and callable(fn_or_images):
            return super().apply(fn_or_images)
        return self.replay(fn_or_images, sample)

    def replay(self, images: torch.Tensor, sample: AugmentSample) -> torch.Tensor:
        """Applies a previously drawn :class:`AugmentSample` to ``images``; returns the views."""
        if not isinstance(sample, AugmentSample):
            raise TypeError(f"sample must be an AugmentSample (from .sample()), got {type(sample).__name__}")
        x = self._check(images)
        if sample.crop.shape[0] != x.shape[0] or sample.image_size != tuple(x.shape[-2:]):
            raise ValueError(
                f"sample was drawn for {sample.crop.shape[0]} images of size {sample.image_size}, "
                f"got {x.shape[0]} of size {tuple(x.shape[-2:])}"
            )
        with torch.autocast(x.device.type, enabled=False):
            return apply_augment(x, sample, self.config)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments a batch.

        Args:
            images: ``[B, C, H, W]`` float in [0, 1], any device.
            generator: Random source (any device); the same seed gives identical views and parameters.
                None uses torch's global CPU generator.

        Returns:
            ``(views [B, C, h, w], params [B, 11])``; params are float32 on the images' device, in the order of
            :data:`PARAM_NAMES`, the crop box in ``self.crop_units``.
        """
        x = self._check(images)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        s = self.sample(x.shape[0], tuple(x.shape[-2:]), generator)
        with torch.autocast(x.device.type, enabled=False):  # views keep the input dtype under autocast
            views = apply_augment(x, s, self.config)
        return views, s.vector(self.crop_units).to(x.device)

    def original(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented view x0: the whole image resized to the output size, ``[B, C, h, w]``.

        Validated like :meth:`forward` (shape, dtype, at least one image, the [0, 1] range when
        ``check_range``), except that any channel count is accepted.
        """
        x = self._check(images, rgb=False)
        B, _, H, W = x.shape
        crop = torch.tensor([[0, 0, H, W]], dtype=torch.long).expand(B, 4)
        return crop_resize(x, crop, torch.zeros(B, dtype=torch.bool), self.config.size, self.config.antialias)

    def identity_params(self, batch: int, image_size: tuple[int, int], device=None) -> torch.Tensor:
        """The ``[batch, 11]`` parameter vector of :meth:`original` (full crop, no flip, neutral jitter)."""
        check_int(batch, "batch", minimum=0)
        H, W = _pair(tuple(image_size) if isinstance(image_size, (tuple, list)) else image_size, "image_size")
        box = [0.0, 0.0, 1.0, 1.0] if self.crop_units == "normalized" else [0.0, 0.0, float(H), float(W)]
        row = torch.tensor(box + [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=device)
        return row.expand(batch, PARAM_DIM).clone()
